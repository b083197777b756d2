"""fsspec helpers for output locations: local paths, ``file://``, ``s3://``, ``gs://``, ``memory://``, ...

Everything here is a plain function (picklable, usable inside Ray tasks) and keeps no global state of its own
(fsspec's own instance cache aside). Paths returned by :func:`get_fs` are filesystem paths *without* the
protocol; :func:`join` builds paths below them.

Atomicity: on filesystems whose rename is atomic (the local filesystem) data is written to
``<path>.tmp-<uuid>`` and renamed over the final name; on object stores a single PUT is atomic per object,
so the object is written directly. Either way no reader ever sees a partially written file under a final name.
"""
from __future__ import annotations

import json
import math
import os
import posixpath
import threading
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"

# Object stores (and fsspec's in-memory store): one put is atomic per object, there are no real directories.
_OBJECT_STORE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "memory", "az", "abfs", "abfss", "adl", "oss", "r2"}


def get_fs(uri: str, storage_options: dict | None = None):
    """``(fs, root_path)`` for a local path or fsspec URL (``root_path`` has no protocol and no trailing '/')."""
    if not uri:
        raise ValueError("empty output URI")
    fs, path = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    if path != "/":
        path = path.rstrip("/")
    return fs, path


def protocol_problem(uri: str) -> str | None:
    """Why fsspec cannot open ``uri`` here (an unknown protocol, or its package is not installed), or None.
    Only looks up the filesystem class: no connection, no credentials."""
    for part in str(uri).split("::"):  # chained URLs: simplecache::s3://...
        proto, _ = fsspec.core.split_protocol(part)
        if proto in (None, "file", "local"):
            continue
        try:
            fsspec.get_filesystem_class(proto)
        except (ImportError, ValueError) as e:
            return str(e) or type(e).__name__
    return None


def node_local(uri) -> bool:
    """True for a local path (or ``file://``): on a cluster, each node has its own unless it is a shared mount."""
    if not isinstance(uri, str):
        return False
    proto, _ = fsspec.core.split_protocol(uri.split("::")[-1])
    return proto in (None, "file", "local")


def absolute_local(uri: str) -> str:
    """A plain local path made absolute against this process's directory: Ray workers run in the directory
    Ray was started in, which need not be the driver's (a running cluster, a notebook that changed directory).
    URLs (``file://`` included) are returned as they are."""
    if not isinstance(uri, str) or "://" in uri or "::" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def absolute_if_exists(uri: str) -> str:
    """A plain local path that exists here (a model folder), made absolute; anything else (a hub id, a URL)
    unchanged."""
    if isinstance(uri, str) and "://" not in uri and os.path.exists(os.path.expanduser(uri)):
        return absolute_local(uri)
    return uri


def process_local(uri) -> bool:
    """True for fsspec's in-memory filesystem (``memory://``): its files live in the memory of one process, so
    only the driver of a job (the process that plans it and reads the results) can write or read them."""
    return isinstance(uri, str) and uri.lower().startswith("memory:")


def join(root: str, *parts: str) -> str:
    """Join path parts with '/' (also for URLs); empty parts are skipped."""
    out = root.rstrip("/") if root != "/" else root
    for p in parts:
        p = str(p).strip("/")
        if not p:
            continue
        out = p if not out else (out + p if out.endswith("/") else f"{out}/{p}")
    return out


def check_relative(name: str) -> str:
    """A relative name inside an output root: no absolute paths, no '..' components, no backslashes."""
    n = str(name)
    if not n or n.startswith("/") or "\\" in n or "://" in n:
        raise ValueError(f"invalid relative name {name!r}")
    parts = n.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid relative name {name!r}")
    return n


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def _protocols(fs) -> set[str]:
    p = fs.protocol
    return {p} if isinstance(p, str) else set(p)


def renames_atomically(fs) -> bool:
    """True where write-to-temp-then-rename is the atomic way to publish a file."""
    return is_local(fs) or not (_protocols(fs) & _OBJECT_STORE_PROTOCOLS)


def display_path(fs, path: str) -> str:
    """What to show users: a plain path for the local filesystem, a URL otherwise."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def write_synced(path: str, data: bytes) -> None:
    """Write a local file and fsync it (the temp file that a rename or link then publishes)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_bytes_atomic(fs, path: str, data: bytes) -> int:
    """Write ``data`` to ``path`` so that readers see either nothing or the whole file. Returns bytes written."""
    data = bytes(data)
    if is_local(fs):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex}"
        try:
            write_synced(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return len(data)
    if not renames_atomically(fs):
        fs.pipe_file(path, data)  # one PUT: atomic per object
        return len(data)
    # Other filesystems with directories and rename (sftp, hdfs, ...): temp name, then move.
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex}"
    try:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm_file(tmp)
        except Exception:  # noqa: BLE001
            pass
        raise
    return len(data)


# ------------------------------------------------------------------------------------ conditional writes
from kbatch.storage.conditional import ConditionalStore, PreconditionFailed, Versioned  # noqa: E402,F401
from kbatch.storage.memory_store import MEMORY_LOCK  # noqa: E402,F401


class Unsupported(ValueError):
    """This store offers no atomic create-if-absent / compare-and-swap, so kbatch cannot fence runs there."""


def _s3_like(fs) -> bool:
    return bool(_protocols(fs) & {"s3", "s3a"}) and hasattr(fs, "call_s3")


def exclusive_kind(fs) -> str | None:
    """How this store creates an object only if it is absent: "local" (link/O_EXCL), "memory" (a lock), "s3"
    (If-None-Match), or None where it cannot (gs:// through fsspec/gcsfs has no precondition on its write
    calls; other filesystems: unknown)."""
    if is_local(fs):
        return "local"
    if "memory" in _protocols(fs):
        return "memory"
    if _s3_like(fs):
        return "s3"
    return None


def s3_error(exc: BaseException) -> tuple[str | None, int | None]:
    """``(code, http status)`` of the botocore error behind an s3fs exception (s3fs translates them, keeping
    the original as ``__cause__``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            err = response.get("Error") or {}
            return err.get("Code"), (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        exc = exc.__cause__ or exc.__context__
    return None, None


def s3_conflict(exc: BaseException) -> bool:
    """A conditional S3 write lost: 412 PreconditionFailed / 409 ConditionalRequestConflict."""
    if isinstance(exc, FileExistsError):  # s3fs's translation of If-None-Match failing
        return True
    code, status = s3_error(exc)
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412


def write_exclusive(fs, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if no object has that name: True if this call created it, False
    if it existed (whoever wrote it). Complete or absent for readers. Raises :class:`Unsupported` on stores
    without an atomic create-if-absent."""
    data = bytes(data)
    kind = exclusive_kind(fs)
    if kind == "local":
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex}"
        try:
            write_synced(tmp, data)
            try:
                os.link(tmp, path)  # EEXIST like O_CREAT|O_EXCL, also on NFS; the content is complete first
            except FileExistsError:
                return False
            except OSError:  # no hard links here: exclusive create, then write (readers may see it short)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            return True
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    if kind == "memory":
        with MEMORY_LOCK:
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
            return True
    if kind == "s3":
        bucket, key, _ = fs.split_path(path)
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as e:  # noqa: BLE001
            if s3_conflict(e):
                return False
            raise
        finally:
            fs.invalidate_cache(path)
        return True
    raise Unsupported(f"{display_path(fs, path)}: {'/'.join(sorted(_protocols(fs)))} offers no atomic "
                      "create-if-absent through fsspec")


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays to Python, NaN/inf to null, bytes to a short marker."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        import hashlib

        return "sha256:" + hashlib.sha256(bytes(obj)).hexdigest()
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item):
        try:
            return to_jsonable(item())
        except (TypeError, ValueError):
            pass
    tolist = getattr(obj, "tolist", None)  # numpy arrays
    if callable(tolist):
        return to_jsonable(tolist())
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return str(obj)


def dumps_json(obj: Any, indent: int | None = 2) -> bytes:
    return json.dumps(to_jsonable(obj), indent=indent, sort_keys=False, allow_nan=False).encode("utf-8")


def write_json_atomic(uri_root: str, name: str, obj: Any, storage_options: dict | None = None) -> str:
    """Write ``obj`` as JSON to ``<uri_root>/<name>`` atomically; returns the filesystem path written."""
    fs, root = get_fs(uri_root, storage_options)
    path = join(root, check_relative(name))
    write_bytes_atomic(fs, path, dumps_json(obj))
    return path


def read_bytes(uri_root: str, name: str, storage_options: dict | None = None) -> bytes | None:
    fs, root = get_fs(uri_root, storage_options)
    try:
        return fs.cat_file(join(root, check_relative(name)))
    except FileNotFoundError:
        return None


def read_json(uri_root: str, name: str, storage_options: dict | None = None) -> dict | None:
    """The JSON object stored at ``<uri_root>/<name>``, or None if there is none."""
    data = read_bytes(uri_root, name, storage_options)
    if data is None:
        return None
    return json.loads(data.decode("utf-8"))


def exists(uri_root: str, name: str, storage_options: dict | None = None) -> bool:
    fs, root = get_fs(uri_root, storage_options)
    path = join(root, check_relative(name))
    try:
        fs.invalidate_cache(posixpath.dirname(path))
    except Exception:  # noqa: BLE001
        pass
    return bool(fs.exists(path))


def remove(uri_root: str, name: str, storage_options: dict | None = None) -> None:
    """Delete ``<uri_root>/<name>``; no error if it is missing."""
    fs, root = get_fs(uri_root, storage_options)
    path = join(root, check_relative(name))
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    try:
        fs.invalidate_cache(posixpath.dirname(path))
    except Exception:  # noqa: BLE001
        pass


# What kbatch writes at an output root; remove_tree deletes only these (commit markers first), so pointing
# --overwrite at a folder that holds other things never deletes them.
OWNED_ENTRIES = ("_SUCCESS", "_commits", "_job.json", "meta", "stats", "images", "tars", "data", "gallery",
                 "gallery.html", "contact_sheet.png")


def remove_tree(uri_root: str, storage_options: dict | None = None) -> list[str]:
    """Delete the kbatch outputs at ``uri_root`` (``--overwrite``); returns the entries removed.

    Only kbatch's own entries are removed (:data:`OWNED_ENTRIES`): the completion marker and commit records
    first, so that readers never see a committed shard with its data gone; other files are left alone.
    """
    fs, root = get_fs(uri_root, storage_options)
    if root in ("", "/"):
        raise ValueError(f"refusing to remove outputs at the filesystem root {uri_root!r}")
    removed = []
    for name in OWNED_ENTRIES:
        path = join(root, name)
        try:
            fs.invalidate_cache(path)
        except Exception:  # noqa: BLE001
            pass
        if not fs.exists(path):
            continue
        if fs.isdir(path):
            fs.rm(path, recursive=True)
        else:
            fs.rm_file(path)
        removed.append(name)
    # temp files of an interrupted atomic write of a top-level entry (local disks only)
    if is_local(fs) and os.path.isdir(root):
        for name in os.listdir(root):
            if TMP_MARK in name and name.split(TMP_MARK, 1)[0] in OWNED_ENTRIES:
                os.unlink(os.path.join(root, name))
    try:
        fs.invalidate_cache(root)
    except Exception:  # noqa: BLE001
        pass
    return removed


def list_names(fs, dir_path: str, suffix: str = "", dirs: bool = False) -> list[str]:
    """Base names of the entries directly under ``dir_path`` ending with ``suffix`` (files, or folders if
    ``dirs``), skipping temp files; [] when the folder does not exist. Always a fresh listing."""
    try:
        fs.invalidate_cache(dir_path)
    except Exception:  # noqa: BLE001
        pass
    try:
        entries = fs.ls(dir_path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for e in entries:
        name = posixpath.basename(str(e["name"]).rstrip("/"))
        kind = e.get("type")
        if TMP_MARK in name or not name.endswith(suffix):
            continue
        if dirs and kind != "directory":
            continue
        if not dirs and kind == "directory":
            continue
        out.append(name[: len(name) - len(suffix)] if suffix else name)
    return sorted(set(out))


def conditional_store(url: str, storage_options: dict | None = None) -> ConditionalStore:
    """The conditional-write store (``conditional.py``) rooted at ``url``: local folders, ``memory://``,
    ``s3://`` and ``gs://``. Raises :class:`Unsupported` for other stores."""
    from kbatch.storage.local_store import LocalStore
    from kbatch.storage.memory_store import MemoryStore

    fs, root = get_fs(url, storage_options)
    if is_local(fs):
        return LocalStore(root)
    if "memory" in _protocols(fs):
        return MemoryStore(root)
    if _s3_like(fs):
        from kbatch.storage.s3_store import S3Store

        return S3Store(fs, root)
    if _protocols(fs) & {"gs", "gcs"}:
        from kbatch.storage.gcs_store import GCSStore

        return GCSStore(fs, root)
    raise Unsupported(f"{url}: {'/'.join(sorted(_protocols(fs)))} offers no conditional writes kbatch can use "
                      "(create-if-absent, replace-if-version); use a local disk, s3:// or gs://")
