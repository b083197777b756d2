"""Where model weights come from, checked before a job starts and copied once per node.

A ``models.*`` value is one of:

- ``sim``: simulated models, never checked or staged;
- a local folder in diffusers layout (``local``): loaded as it is;
- an fsspec URL (``url``: ``s3://``, ``gs://``, ...): the first process of a node that needs it copies the
  folder into a node-local cache (``models.cache_dir``, env ``KBATCH_MODEL_CACHE``, else
  ``~/.cache/kbatch/models``) under a file lock; every other process of that node waits and loads the same
  copy. Why: hundreds of decoder actors that each download ~7 GB from a hub hit rate limits, and a transient
  429 would retire an actor for good; a fleet stages the weights once in its own bucket
  (``kbatch models pull``) and reads them from local disk.
- a hub id (``hub``: ``owner/name``): huggingface_hub downloads it into its own cache (which has its own
  locks), safetensors and configs only.

Only safetensors weights and the small json/txt/model files travel; ``.bin``/``.ckpt``/``.pt`` never do
(pickles run code when loaded). Nothing here imports torch: the driver checks models with it.
"""
from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kbatch.config import ConfigError

log = logging.getLogger("kbatch")

#: Files a model folder needs besides its weights; anything else is not copied.
CONFIG_SUFFIXES = (".json", ".txt", ".model")
#: Weight formats that unpickle (run code) when loaded: never copied, never loaded.
UNSAFE_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle", ".msgpack", ".h5")
#: What huggingface_hub fetches of a hub repo: the pipeline index and its components' safetensors + configs.
HUB_PATTERNS = ["model_index.json", "*/*.safetensors", "*/*.json", "*/*.txt", "*/*.model"]
#: Written by ``pull_model`` beside the files: their sizes and sha256, so staging can verify every byte.
PULL_MANIFEST = ".kbatch-manifest.json"
#: In a staged copy: the source, each verified file (size, source etag, sha256) and the completion flag.
JOURNAL = ".kbatch-stage.json"
HUB_TIMEOUT = 10.0  # seconds for one question to the hub from the driver

_CHUNK = 8 << 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MD5 = re.compile(r"^[0-9a-f]{32}$")

# Pipeline class a config key expects -> classes a model_index.json may name for it. The hub's
# kandinsky-2-1-inpaint names "KandinskyPipeline" although it is an inpaint model: its UNet tells them apart.
_ACCEPTED = {
    "KandinskyPriorPipeline": {"KandinskyPriorPipeline"},
    "KandinskyPipeline": {"KandinskyPipeline", "KandinskyImg2ImgPipeline"},
    "KandinskyInpaintPipeline": {"KandinskyInpaintPipeline", "KandinskyPipeline"},
}
_UNET_IN_CHANNELS = {"KandinskyPipeline": 4, "KandinskyInpaintPipeline": 9}
_ROLE = {"KandinskyPriorPipeline": "a prior (models.prior)", "KandinskyPipeline": "a decoder (models.decoder)",
         "KandinskyImg2ImgPipeline": "a decoder (models.decoder)",
         "KandinskyInpaintPipeline": "an inpaint model (models.inpaint)"}


# ------------------------------------------------------------------------------------------------------------
# What a model value is
# ------------------------------------------------------------------------------------------------------------


def is_sim(uri) -> bool:
    """``sim`` stands for simulated models: nothing to check, stage or load."""
    return isinstance(uri, str) and uri.strip() == "sim"


def model_kind(uri) -> str:
    """``"sim" | "local" | "url" | "hub"``.

    A folder that exists here is local even if it looks like ``owner/name`` (as diffusers decides); a value
    with a protocol is a URL (``file://`` is local); ``owner/name`` that is not a folder here is a hub id;
    anything else is a local path (that may not exist: ``check_model`` says so).
    """
    uri = str(uri)
    if is_sim(uri):
        return "sim"
    proto, sep, _ = uri.partition("://")
    if sep:
        return "local" if proto in ("file", "local") else "url"
    if os.path.isdir(os.path.expanduser(uri)):
        return "local"
    if _HUB_ID.match(uri) and ".." not in uri and "--" not in uri:
        return "hub"
    return "local"


def default_cache_dir() -> str:
    return os.environ.get("KBATCH_MODEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kbatch",
                                                                "models")


def _local_path(uri: str) -> str:
    uri = str(uri)
    if "://" in uri:
        uri = uri.split("://", 1)[1]
    return os.path.abspath(os.path.expanduser(uri))


def _fs(uri: str, storage_options: dict | None):
    import fsspec

    return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def safe_name(rel: str) -> bool:
    """A name from a listing that can become a path inside the model folder (and the node's cache): relative,
    no empty, ``.`` or ``..`` segment (``decoder//etc/x.json`` would name ``/etc/x.json``), no backslash."""
    from kbatch.storage import check_relative

    try:
        check_relative(rel)
    except ValueError:
        return False
    return True


def wanted(rel: str) -> bool:
    """Whether a file (path relative to the model folder) is part of a loadable, pickle-free copy."""
    if not safe_name(rel):
        return False
    parts = rel.split("/")
    if any(p.startswith(".") for p in parts):
        return False
    if len(parts) == 1:
        return rel == "model_index.json"
    return rel.endswith(".safetensors") or rel.endswith(CONFIG_SUFFIXES)


# ------------------------------------------------------------------------------------------------------------
# Retries
# ------------------------------------------------------------------------------------------------------------

_PERMANENT_NAMES = {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "RemoteEntryNotFoundError",
                    "EntryNotFoundError", "DisabledRepoError", "HFValidationError", "OfflineModeIsEnabled",
                    "NotASafetensorsRepoError", "NoCredentialsError", "PartialCredentialsError", "ConfigError",
                    "NotEnoughSpace"}
_TRANSIENT_NAMES = {"TransportError", "TimeoutException", "EndpointConnectionError", "ConnectionClosedError",
                    "ReadTimeoutError", "ConnectTimeoutError", "HTTPClientError", "ClientConnectionError",
                    "ServerDisconnectedError", "ClientPayloadError", "IncompleteRead", "ChunkedEncodingError",
                    "ChecksumMismatch"}
_TRANSIENT_AWS_CODES = {"Throttling", "ThrottlingException", "ThrottledException", "SlowDown", "RequestTimeout",
                        "RequestTimeoutException", "InternalError", "ServiceUnavailable", "RequestLimitExceeded",
                        "TooManyRequests", "TooManyRequestsException", "500", "502", "503", "504"}
_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EISDIR,
                     errno.ENOTDIR, errno.EINVAL, errno.ENOSYS, errno.ENAMETOOLONG, getattr(errno, "EDQUOT", -1)}


def _chain(exc: BaseException):
    seen = []
    while exc is not None and len(seen) < 12 and all(exc is not s for s in seen):
        seen.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return seen


def _aws_code(exc) -> str | None:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return (resp.get("Error") or {}).get("Code")
    return None


def _http_status(exc) -> int | None:
    for holder in (exc, getattr(exc, "response", None)):
        if holder is None or isinstance(holder, dict):
            continue
        for attr in ("status_code", "status"):
            value = getattr(holder, attr, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        value = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return value if isinstance(value, int) else None
    return None


def _verdict(exc: BaseException) -> bool | None:
    """True: transient, False: permanent, None: this exception alone does not say."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "LocalEntryNotFoundError" in names:  # the hub was unreachable and the file is not cached
        from huggingface_hub import constants

        return not constants.HF_HUB_OFFLINE
    if names & _PERMANENT_NAMES:
        return False
    code = _aws_code(exc)
    if code:
        return code in _TRANSIENT_AWS_CODES
    status = _http_status(exc)
    if status is not None:
        return status in (408, 429) or status >= 500
    if names & _TRANSIENT_NAMES:
        return True
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    if isinstance(exc, OSError):
        return None if exc.errno is None else exc.errno not in _PERMANENT_ERRNOS
    if isinstance(exc, (ValueError, TypeError, KeyError, AttributeError, ImportError, NotImplementedError,
                        MemoryError)):
        return False
    return None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: timeouts, dropped connections, HTTP 408/429/5xx, S3 throttling. Anything in the exception's
    chain that says "permanent" (not found, gated, no access, bad model, full disk) wins, since diffusers wraps
    hub errors in a plain ``OSError``; an error nothing says anything about is permanent."""
    verdicts = [_verdict(e) for e in _chain(exc)]
    return False not in verdicts and True in verdicts


def _retry_after(exc) -> float | None:
    for e in _chain(exc):
        headers = getattr(getattr(e, "response", None), "headers", None)
        try:
            value = headers.get("Retry-After") if headers is not None else None
            if value is not None:
                return float(value)
        except (TypeError, ValueError, AttributeError):
            pass
    return None


def with_retries(fn: Callable, *, what: str, attempts: int = 4, base_delay: float = 2.0, max_delay: float = 60.0,
                 sleep: Callable[[float], None] | None = None):
    """``fn()``, retried on transient errors with exponential backoff and jitter (``base_delay * 2**k``, times
    0.5-1.5, or the server's Retry-After, at most ``max_delay``). Permanent errors and the last attempt's error
    are raised as they are. Why: one 429 or dropped connection at actor start must not retire the actor."""
    jitter = random.Random(os.urandom(8))  # own generator: a worker that seeds `random` must not sync retries
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= attempts or not is_transient(exc):
                raise
            delay = _retry_after(exc)
            if delay is None:
                delay = base_delay * 2 ** (attempt - 1) * jitter.uniform(0.5, 1.5)
            delay = min(max_delay, max(0.0, delay))
            log.warning("%s failed (attempt %d of %d: %s: %s); retrying in %.1f s", what, attempt, attempts,
                        type(exc).__name__, exc, delay)
            (sleep or time.sleep)(delay)


# ------------------------------------------------------------------------------------------------------------
# Checking (driver, before any actor starts)
# ------------------------------------------------------------------------------------------------------------


def _layout_problem(names: set[str], read: Callable[[str], bytes], pipeline_class: str | None) -> str | None:
    """What is wrong with a model folder of these file ``names`` (relative paths), or None. Reads only
    model_index.json and unet/config.json."""
    if not names:
        return "nothing there (no such folder, or it is empty)"
    if "model_index.json" not in names:
        return "no model_index.json there (not a diffusers pipeline folder)"
    try:
        index = json.loads(read("model_index.json"))
    except ValueError as e:
        return f"model_index.json is not valid JSON ({e})"
    cls = index.get("_class_name")
    if pipeline_class is not None and cls not in _ACCEPTED.get(pipeline_class, {pipeline_class}):
        role = f" ({_ROLE[cls]})" if cls in _ROLE else ""
        return f"model_index.json names pipeline {cls!r}{role}, expected {pipeline_class!r}"
    for comp, spec in sorted(index.items()):
        if comp.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        files = [n for n in names if n.startswith(comp + "/")]
        if not files:
            return f"no {comp}/ folder, which model_index.json lists"
        unsafe = sorted(n for n in files if n.endswith(UNSAFE_WEIGHT_SUFFIXES))
        weighted = f"{comp}/config.json" in names or unsafe
        if weighted and not any(n.endswith(".safetensors") for n in files):
            found = f" (only {', '.join(unsafe)})" if unsafe else ""
            return f"{comp}/ has no .safetensors weights{found}; kbatch loads safetensors only"
    want = _UNET_IN_CHANNELS.get(pipeline_class or "")
    if want is not None and "unet/config.json" in names:
        try:
            channels = json.loads(read("unet/config.json")).get("in_channels")
        except ValueError as e:
            return f"unet/config.json is not valid JSON ({e})"
        if channels != want:
            kind = {4: " (a text-to-image decoder's UNet)", 9: " (an inpaint UNet)"}.get(channels, "")
            return f"unet/config.json has in_channels {channels}{kind}; {pipeline_class} needs {want}"
    return None


def _safetensors_problem(root: str, names: set[str]) -> str | None:
    """The first local ``*.safetensors`` file whose header does not parse (a truncated or overwritten copy):
    reads 8 bytes and the JSON header of each, never the tensors."""
    for rel in sorted(n for n in names if n.endswith(".safetensors")):
        path = os.path.join(root, rel)
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 2 <= n <= min(size - 8, 100 << 20):
                    raise ValueError(f"header length {n} in a file of {size} bytes")
                header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise ValueError(f"its tensors end at byte {8 + n + end}, the file has {size} (truncated)")
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            return f"{rel} is not a readable safetensors file ({e})"
    return None


def _local_names(root: str) -> set[str]:
    out = set()
    for dirpath, _, files in os.walk(root):
        for f in files:
            out.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return out


def _remote_listing(fs, root: str) -> dict[str, dict]:
    """{relative path: fsspec info} of every file under ``root``."""
    base = root.rstrip("/")
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for path, info in found.items():
        path = path.rstrip("/")
        if info.get("type") == "directory" or not path.startswith(base + "/"):
            continue
        rel = path[len(base) + 1:]
        if not safe_name(rel):  # a key like "decoder//etc/x.json": never a path outside the folder
            log.warning("ignoring %r under %s: not a relative name inside the model folder", rel, root)
            continue
        out[rel] = info
    return out


def check_model(key: str, uri: str, pipeline_class: str, storage_options: dict | None = None, *,
                revision: str | None = None) -> None:
    """Raise :class:`ConfigError` naming ``key`` and ``uri`` when the model there cannot be what ``key`` needs:
    nothing there, no model_index.json, another pipeline class, a weighted component without safetensors, or
    (decoder vs inpaint) the wrong UNet. Cheap: lists files, reads model_index.json (and unet/config.json),
    never weights. A hub id that the hub says does not exist is an error; a hub that cannot be reached is a
    warning (it cannot be told here)."""
    if is_sim(uri):
        return
    where = f"config key {key!r} is {uri!r}"
    kind = model_kind(uri)
    if kind == "hub":
        return _check_hub(where, uri, pipeline_class, revision)
    if kind == "local":
        root = _local_path(uri)
        if not os.path.isdir(root):
            raise ConfigError(f"{where}: no such folder here ({root}; a hub id is owner/name)")
        names = _local_names(root)
        problem = (_layout_problem(names, lambda rel: Path(root, rel).read_bytes(), pipeline_class)
                   or _safetensors_problem(root, names))
    else:
        try:
            fs, root = _fs(uri, storage_options)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"{where}: cannot be opened here ({e})") from e
        try:
            listing = with_retries(lambda: _remote_listing(fs, root), what=f"listing {uri}", attempts=3,
                                   base_delay=1.0)
        except Exception as e:
            raise ConfigError(f"{where}: cannot be listed ({type(e).__name__}: {e})") from e
        problem = _layout_problem(set(listing), lambda rel: fs.cat_file(f"{root.rstrip('/')}/{rel}"),
                                  pipeline_class)
    if problem:
        raise ConfigError(f"{where}: {problem}")


def _check_hub(where: str, repo: str, pipeline_class: str, revision: str | None) -> None:
    from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache

    names = None
    if not constants.HF_HUB_OFFLINE:
        try:
            info = HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT)
            names = {s.rfilename for s in (info.siblings or [])}
        except Exception as e:
            kinds = {c.__name__ for c in type(e).__mro__}
            if "RepositoryNotFoundError" in kinds:  # also GatedRepoError
                raise ConfigError(f"{where}: the hub has no such model, or it is private or gated and this "
                                  f"machine's token cannot read it ({type(e).__name__})") from e
            if "RevisionNotFoundError" in kinds:
                raise ConfigError(f"{where}: the hub has no revision {revision!r} of it") from e
            log.warning("%s: the hub cannot be asked from here (%s: %s); the model is checked only when the "
                        "actors load it", where, type(e).__name__, e)
    if names is None:  # no hub: what the local cache knows
        cached = try_to_load_from_cache(repo, "model_index.json", revision=revision)
        if isinstance(cached, str):
            problem = _layout_problem({"model_index.json"}, lambda rel: Path(cached).read_bytes(), pipeline_class)
            if problem and "model_index.json names" in problem:
                raise ConfigError(f"{where}: {problem}")
        return

    def read(rel: str) -> bytes:
        return Path(hf_hub_download(repo, rel, revision=revision, etag_timeout=HUB_TIMEOUT)).read_bytes()

    try:
        problem = _layout_problem(names, read, pipeline_class)
    except Exception as e:  # reading model_index.json failed: the hub went away meanwhile
        log.warning("%s: could not read its model_index.json (%s); not checked", where, e)
        return
    if problem:
        raise ConfigError(f"{where}: {problem}")


# ------------------------------------------------------------------------------------------------------------
# Staging (actors, at start)
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Staged:
    """A model folder ready for ``from_pretrained``, and what getting it here cost this process."""

    path: str
    kind: str
    files_copied: int = 0
    bytes_copied: int = 0
    seconds: float = 0.0


class ChecksumMismatch(OSError):
    """A downloaded file differs from the source's listing: downloaded again (transient)."""

    def __init__(self, msg: str):
        super().__init__(errno.EIO, msg)


class NotEnoughSpace(OSError):
    def __init__(self, msg: str):
        super().__init__(errno.ENOSPC, msg)


def stage_model(uri: str, storage_options: dict | None = None, cache_dir: str | None = None,
                revision: str | None = None) -> str:
    """A local folder that ``from_pretrained`` can load for ``uri`` (see :func:`stage`)."""
    return stage(uri, storage_options, cache_dir, revision).path


def stage(uri: str, storage_options: dict | None = None, cache_dir: str | None = None,
          revision: str | None = None) -> Staged:
    """Local folder: as is. Hub id: huggingface_hub's cache (safetensors + configs), with retries. fsspec URL:
    one verified copy per node in ``cache_dir`` (see the module docstring)."""
    uri = str(uri)
    kind = model_kind(uri)
    if kind == "sim":
        raise ValueError("'sim' stands for simulated models: there is nothing to load")
    if kind == "local":
        path = _local_path(uri)
        if not os.path.isdir(path):  # a local path must exist on every node (or be a shared mount)
            raise FileNotFoundError(f"model folder {uri!r} does not exist on this node ({path})")
        return Staged(path, kind)
    if kind == "hub":
        from huggingface_hub import snapshot_download

        t0 = time.perf_counter()
        path = with_retries(lambda: snapshot_download(uri, revision=revision, allow_patterns=HUB_PATTERNS),
                            what=f"downloading {uri} from the hub")
        return Staged(path, kind, seconds=time.perf_counter() - t0)
    return _stage_url(uri, storage_options, cache_dir)


def _cache_name(uri: str) -> str:
    """The prefix of every cached version of ``uri`` (and the name of its staging lock)."""
    uri = uri.rstrip("/")
    base = re.sub(r"[^A-Za-z0-9._-]", "_", uri.rsplit("/", 1)[-1])[:40] or "model"
    return f"{base}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"


def listing_signature(files: dict[str, dict]) -> str:
    """What identifies one version of a source folder: its files' names, sizes and versions (ETag,
    generation/md5, mtime). A changed source is staged into a new folder, never over one a process loads."""
    items = sorted((rel, info.get("size"), _signature(info)) for rel, info in files.items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _inside(dest: Path, rel: str) -> Path:
    """``dest / rel``, refused unless it stays inside ``dest`` (symlinks resolved)."""
    final = (dest / rel).resolve()
    root = dest.resolve()
    if final != root and root not in final.parents:
        raise ValueError(f"model file name {rel!r} points outside the cache folder {dest}")
    return dest / rel


def _stamp(path: Path) -> dict:
    """What a verified file is tied to: size, mtime and inode. A file changed in place (same size or not)
    no longer matches and is verified or copied again."""
    st = path.stat()
    return {"st_size": st.st_size, "st_mtime_ns": st.st_mtime_ns, "st_ino": st.st_ino}


_IN_USE: dict[str, object] = {}  # staged folder -> open lock file held shared while this process lives


def _hold_shared(dest: Path) -> None:
    """Hold a shared lock on ``dest`` for the rest of this process: loading reads its files after staging, and
    no other process may remove or re-stage it meanwhile (eviction takes the lock exclusively, non-blocking)."""
    import fcntl

    key = str(dest)
    if key in _IN_USE:
        return
    fh = open(f"{dest}.use.lock", "a+")
    fcntl.flock(fh, fcntl.LOCK_SH)
    _IN_USE[key] = fh


def _evict_old_versions(cache: Path, prefix: str, keep: Path) -> None:
    """Remove the cached versions of a source other than ``keep`` that no living process uses."""
    import fcntl

    for old in cache.glob(f"{prefix}-*"):
        if old == keep or not old.is_dir():
            continue
        try:
            with open(f"{old}.use.lock", "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(old, ignore_errors=True)
        except (BlockingIOError, OSError):
            continue  # a process of this node still loads or holds it
        Path(f"{old}.use.lock").unlink(missing_ok=True)


def _seed_from_previous(cache: Path, prefix: str, dest: Path, files: dict[str, dict], journal: dict) -> None:
    """Files unchanged since a previous version of the source was staged: hard-linked from it (verified there,
    same size and source version, stamp intact) instead of downloaded again."""
    for old in sorted(cache.glob(f"{prefix}-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        if old == dest or not old.is_dir():
            continue
        previous = _read_journal(old)
        for rel, entry in previous.get("files", {}).items():
            if rel in journal["files"] or rel not in files or not safe_name(rel):
                continue
            src = old / rel
            if not _have(src, files[rel], entry):
                continue
            final = _inside(dest, rel)
            final.parent.mkdir(parents=True, exist_ok=True)
            final.unlink(missing_ok=True)
            try:
                os.link(src, final)
            except OSError:
                shutil.copy2(src, final)
            journal["files"][rel] = {**entry, **_stamp(final)}


@contextlib.contextmanager
def _node_lock(path: Path, what: str):
    """Exclusive inter-process lock (``flock``; released by the OS when a holder dies)."""
    import fcntl

    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process on this node that is staging %s", what)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _signature(info: dict) -> str:
    """What identifies a source file's version, besides its size."""
    for k in ("ETag", "etag", "md5Hash", "LastModified", "mtime", "created"):
        if info.get(k) is not None:
            return f"{k}:{info[k]}"
    return ""


def _source_md5(info: dict) -> str | None:
    """The md5 a listing states, where it does: a single-part S3 ETag, GCS md5Hash."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"').lower()
    if _MD5.match(etag):
        return etag
    if info.get("md5Hash"):
        try:
            return base64.b64decode(info["md5Hash"]).hex()
        except ValueError:
            return None
    return None


def _read_journal(dest: Path) -> dict:
    try:
        return json.loads((dest / JOURNAL).read_text())
    except (OSError, ValueError):
        return {}


def _write_journal(dest: Path, journal: dict) -> None:
    tmp = dest / f"{JOURNAL}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(journal, indent=1, sort_keys=True))
    os.replace(tmp, dest / JOURNAL)


def _download(fs, src: str, tmp: Path) -> tuple[int, str, str]:
    """Stream ``src`` into ``tmp``; returns (bytes, md5, sha256) computed on the way."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    size = 0
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with fs.open(src, "rb", block_size=64 << 20) as r, open(tmp, "wb") as w:
        while chunk := r.read(_CHUNK):
            md5.update(chunk)
            sha.update(chunk)
            w.write(chunk)
            size += len(chunk)
        w.flush()
        os.fsync(w.fileno())
    return size, md5.hexdigest(), sha.hexdigest()


def _fetch(fs, src: str, dest: Path, rel: str, info: dict, want_sha: str | None) -> tuple[Path, dict]:
    """Download one file to a temp name beside its final name and verify it (size; md5 from the listing; the
    pull manifest's sha256). Returns the temp path and its journal entry."""
    tmp = dest / f"{rel}.part-{os.getpid()}"
    try:
        size, md5, sha = _download(fs, src, tmp)
        if size != info.get("size"):
            raise ChecksumMismatch(f"{src}: got {size} bytes, the listing says {info.get('size')}")
        if (expected := _source_md5(info)) and expected != md5:
            raise ChecksumMismatch(f"{src}: md5 {md5} differs from the source's {expected}")
        if want_sha and want_sha != sha:
            raise ChecksumMismatch(f"{src}: sha256 {sha} differs from {PULL_MANIFEST}'s {want_sha}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, {"size": size, "source": _signature(info), "sha256": sha}


def _pull_shas(fs, root: str, listing: dict) -> dict[str, str]:
    """{rel: sha256} from a ``pull_model`` manifest at the source, for the files whose size it matches."""
    if PULL_MANIFEST not in listing:
        return {}
    try:
        files = json.loads(fs.cat_file(f"{root.rstrip('/')}/{PULL_MANIFEST}"))["files"]
        return {rel: e["sha256"] for rel, e in files.items()
                if rel in listing and listing[rel].get("size") == e.get("size")}
    except Exception as e:  # a manifest we cannot read only loses a check
        log.warning("ignoring unreadable %s under %s (%s)", PULL_MANIFEST, root, e)
        return {}


def _stage_url(uri: str, storage_options: dict | None, cache_dir: str | None) -> Staged:
    t0 = time.perf_counter()
    fs, root = _fs(uri, storage_options)
    root = root.rstrip("/")
    cache = Path(cache_dir or default_cache_dir()).expanduser().absolute()
    cache.mkdir(parents=True, exist_ok=True)
    prefix = _cache_name(uri)
    with _node_lock(cache / f"{prefix}.lock", uri):
        try:
            listing = with_retries(lambda: _remote_listing(fs, root), what=f"listing {uri}")
        except Exception as e:
            staged = _last_complete(cache, prefix, uri)
            if staged is not None and is_transient(e):
                log.warning("cannot list %s (%s); loading the copy staged earlier at %s", uri, e, staged)
                _hold_shared(staged)
                return Staged(str(staged), "url", seconds=time.perf_counter() - t0)
            raise
        if "model_index.json" not in listing:
            raise FileNotFoundError(f"{uri}: no model_index.json there")
        files = {rel: info for rel, info in listing.items() if wanted(rel)}
        dest = cache / f"{prefix}-{listing_signature(files)}"  # one folder per version of the source
        dest.mkdir(exist_ok=True)
        journal = _read_journal(dest)
        shas = _pull_shas(fs, root, listing)
        for p in dest.rglob("*.part-*"):  # left by a process that died mid-copy (we hold the lock)
            p.unlink(missing_ok=True)
        done = journal.get("files", {}) if journal.get("uri") == uri else {}
        journal = {"uri": uri, "complete": False,
                   "files": {rel: e for rel, e in done.items() if rel in files and _have(dest / rel, files[rel], e)}}
        _seed_from_previous(cache, prefix, dest, files, journal)
        todo = [rel for rel in sorted(files) if rel not in journal["files"]]
        _write_journal(dest, journal)
        need = sum(files[rel].get("size") or 0 for rel in todo)
        free = shutil.disk_usage(dest).free
        if need > free:
            raise NotEnoughSpace(f"staging {uri} needs {need} more bytes in {dest}, {free} free: point "
                                 f"models.cache_dir (or KBATCH_MODEL_CACHE) at a larger disk")
        copied = 0
        for rel in todo:
            final = _inside(dest, rel)
            final.unlink(missing_ok=True)  # an older version must not pass for the new one after a kill
            tmp, entry = with_retries(
                lambda rel=rel: _fetch(fs, f"{root}/{rel}", dest, rel, files[rel], shas.get(rel)),
                what=f"downloading {uri}/{rel}")
            os.replace(tmp, final)  # verified; its journal entry is tied to the file as renamed into place
            journal["files"][rel] = {**entry, **_stamp(final)}
            _write_journal(dest, journal)
            copied += entry["size"]
        for p in list(dest.rglob("*")):  # files of an older version that the source no longer has
            rel = p.relative_to(dest).as_posix()
            if p.is_file() and rel != JOURNAL and rel not in files:
                p.unlink()
        journal["complete"] = True
        _write_journal(dest, journal)
        _hold_shared(dest)
        _evict_old_versions(cache, prefix, dest)
    seconds = time.perf_counter() - t0
    if todo:
        log.info("staged %s into %s: %d files, %.1f MB in %.1f s (%.1f MB/s)", uri, dest, len(todo), copied / 1e6,
                 seconds, copied / 1e6 / max(seconds, 1e-9))
    else:
        log.info("%s: using the copy staged at %s (%.2f s)", uri, dest, seconds)
    return Staged(str(dest), "url", len(todo), copied, seconds)


def _last_complete(cache: Path, prefix: str, uri: str) -> Path | None:
    """The newest completely staged version of ``uri`` (used when the source cannot be listed right now)."""
    for d in sorted(cache.glob(f"{prefix}-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        journal = _read_journal(d) if d.is_dir() else {}
        if journal.get("complete") and journal.get("uri") == uri:
            return d
    return None


def _have(path: Path, info: dict, entry: dict | None) -> bool:
    """A staged file is reused iff it was verified (journal entry), the source's version is the one it was
    copied from, and the file is the one verified: its size, mtime and inode as stamped after the copy (a file
    changed in place, even at the same size, fails this). An entry without a stamp (an older kbatch) is
    verified again by its sha256 once."""
    if not entry or not path.is_file():
        return False
    size = info.get("size")
    if entry.get("size") != size or entry.get("source") != _signature(info):
        return False
    st = path.stat()
    if "st_ino" in entry:
        return (st.st_size, st.st_mtime_ns, st.st_ino) == (entry["st_size"], entry["st_mtime_ns"], entry["st_ino"])
    if st.st_size != size or not entry.get("sha256"):
        return False
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
    if sha.hexdigest() != entry["sha256"]:
        return False
    entry.update(_stamp(path))
    return True


# ------------------------------------------------------------------------------------------------------------
# Same weights? (inpaint shares the decoder's text encoder and MoVQ when they are equal)
# ------------------------------------------------------------------------------------------------------------


def known_sha256(path: str | os.PathLike) -> str | None:
    """A file's sha256 where it is known without reading the file: the staging journal of a staged copy, or
    the blob name in huggingface_hub's cache (LFS blobs are named by their sha256)."""
    path = Path(path)
    size = path.stat().st_size
    for root in list(path.parents)[:3]:
        if (root / JOURNAL).is_file():
            entry = _read_journal(root).get("files", {}).get(path.relative_to(root).as_posix())
            if entry and entry.get("size") == size and entry.get("sha256"):
                return entry["sha256"]
    if path.is_symlink():
        blob = os.path.basename(os.path.realpath(path))
        if _SHA256.match(blob):
            return blob
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file: :func:`known_sha256`, else by reading it."""
    known = known_sha256(path)
    if known:
        return known
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _same_file_content(a: Path, b: Path) -> bool:
    """Equal bytes: by known hashes when both are known (no reading), else by reading both side by side and
    stopping at the first difference (memcmp speed; hashing both would cost ~3 s/GiB on a small CPU)."""
    if os.path.samefile(a, b):
        return True
    ha, hb = known_sha256(a), known_sha256(b)
    if ha and hb:
        return ha == hb
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(_CHUNK), fb.read(_CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


_IGNORED_CONFIG_KEYS = {"_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash"}


def _config_view(data: bytes):
    try:
        value = json.loads(data)
    except ValueError:
        return data
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in _IGNORED_CONFIG_KEYS}
    return value


def same_weights(folder_a: str | os.PathLike, folder_b: str | os.PathLike) -> bool:
    """Whether two component folders (e.g. ``decoder/text_encoder`` and ``inpaint/text_encoder``) hold the same
    module, decided without loading it: the same files; configs equal (up to version stamps); every safetensors
    file of the same size and the same bytes (by sha256 where known without reading: staged copies, the hub
    cache; else compared side by side)."""
    a, b = Path(folder_a), Path(folder_b)
    if not a.is_dir() or not b.is_dir():
        return False
    if a.resolve() == b.resolve():
        return True
    names_a = {n for n in _local_names(str(a)) if wanted("x/" + n)}
    names_b = {n for n in _local_names(str(b)) if wanted("x/" + n)}
    if names_a != names_b or not names_a:
        return False
    weights = sorted(n for n in names_a if n.endswith(".safetensors"))
    if any((a / n).stat().st_size != (b / n).stat().st_size for n in weights):
        return False
    for n in sorted(names_a - set(weights)):
        if _config_view((a / n).read_bytes()) != _config_view((b / n).read_bytes()):
            return False
    return all(_same_file_content(a / n, b / n) for n in weights)


# ------------------------------------------------------------------------------------------------------------
# kbatch models pull
# ------------------------------------------------------------------------------------------------------------


def _remote_manifest(fs, root: str, listing: dict) -> dict[str, dict]:
    """{rel: {size, sha256}} of the destination's pull manifest, or {} (none, or unreadable)."""
    if PULL_MANIFEST not in listing:
        return {}
    try:
        return dict(json.loads(fs.cat_file(f"{root}/{PULL_MANIFEST}"))["files"])
    except Exception as e:  # noqa: BLE001 - an unreadable manifest only means: upload everything
        log.warning("ignoring unreadable %s under %s (%s)", PULL_MANIFEST, root, e)
        return {}


def _already_there(info: dict, path: Path, size: int, sha: str, recorded: dict | None) -> bool:
    """Whether the destination already holds these bytes, decided by content, never by size alone: the md5
    its listing states (single-part S3 ETag, GCS md5Hash) against the local file's, else the sha256 the
    earlier pull recorded for it. Nothing to go by: upload."""
    if info.get("size") != size:
        return False
    md5 = _source_md5(info)
    if md5 is not None:
        h = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest() == md5
    return bool(recorded) and recorded.get("size") == size and recorded.get("sha256") == sha


def pull_model(source: str, dest_url: str, storage_options: dict | None = None, revision: str | None = None) -> dict:
    """``kbatch models pull SOURCE DEST_URL``: stage a model once for a whole fleet. ``source`` is a hub id
    (downloaded with huggingface_hub: safetensors and configs only), a local folder or a URL; ``dest_url`` any
    fsspec URL or local folder. Uploads only the pickle-free files, skips files already there with the same
    content (md5 from the listing, or the sha256 an earlier pull recorded; never by size alone), writes a
    manifest of sha256 sums (staging verifies against it) after the uploads and model_index.json last, so the
    destination is a loadable folder only once it is complete. Returns a summary."""
    t0 = time.perf_counter()
    if is_sim(source):
        raise ValueError("'sim' stands for simulated models: there is nothing to pull")
    src = Path(stage_model(source, storage_options, revision=revision))
    local = {rel: src / rel for rel in _local_names(str(src)) if wanted(rel)}
    problem = _layout_problem(set(local), lambda rel: local[rel].read_bytes(), None)
    if problem:
        raise ValueError(f"{source}: {problem}")
    fs, root = _fs(dest_url, storage_options)
    root = root.rstrip("/")
    there = with_retries(lambda: _remote_listing(fs, root), what=f"listing {dest_url}")
    is_local = "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
    before = _remote_manifest(fs, root, there)  # what an earlier pull says the destination holds
    manifest = {"source": source, "revision": revision, "files": {}}
    uploaded = skipped = nbytes = 0
    for rel in sorted(local, key=lambda r: (r == "model_index.json", r)):  # model_index.json last
        path = local[rel]
        size = path.stat().st_size
        sha = file_sha256(path)
        manifest["files"][rel] = {"size": size, "sha256": sha}
        if rel == "model_index.json":  # the manifest after the uploads, before the file that makes it loadable
            data = json.dumps(manifest, indent=1, sort_keys=True).encode()
            with_retries(lambda: fs.pipe_file(f"{root}/{PULL_MANIFEST}", data), what=f"writing {PULL_MANIFEST}")
        if rel in there and _already_there(there[rel], path, size, sha, before.get(rel)):
            skipped += 1
            continue
        target = f"{root}/{rel}"
        if is_local:
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        with_retries(lambda: fs.put_file(str(path), target), what=f"uploading {rel} to {dest_url}")
        uploaded += 1
        nbytes += size
    summary = {"source": source, "dest": dest_url, "files": len(local), "uploaded": uploaded, "skipped": skipped,
               "bytes": nbytes, "total_bytes": sum(e["size"] for e in manifest["files"].values()),
               "seconds": round(time.perf_counter() - t0, 3)}
    log.info("pulled %s to %s: %d files (%d uploaded, %.1f MB) in %.1f s", source, dest_url, len(local), uploaded,
             nbytes / 1e6, summary["seconds"])
    return summary
