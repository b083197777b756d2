"""The node-local model cache: one folder per version of a source, its journal of verified files, the node
lock that lets one process of a node copy while the others wait, shared holds that keep a folder in use from
eviction, and reuse of unchanged files from an earlier version.

Layout under ``models.cache_dir`` (default: :func:`default_cache_dir`): ``<name>-<hash of the URL>.lock`` (the
staging lock), ``<name>-<hash>-<listing signature>/`` (one version: the files and ``.kbatch-stage.json``),
``<that folder>.use.lock`` (held shared by every process that loads it). See docs/models.md.
"""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from kbatch.models.store.errors import StagingStalled
from kbatch.models.store.integrity import _signature, sha256_of
from kbatch.storage import local_store
from kbatch.models.store.sources import safe_name

log = logging.getLogger("kbatch")

#: In a staged copy: the source, each verified file (size, source etag, sha256) and the completion flag.
JOURNAL = ".kbatch-stage.json"


#: This node's name in the temp files it writes into a cache folder (``<file>.part-<host>-<pid>``).
HOST = re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname())[:63] or "host"
_PART = re.compile(r"\.(?:part|tmp)-(?P<host>.+)-(?P<pid>[0-9]+)$")


def default_cache_dir() -> str:
    """``$KBATCH_MODEL_CACHE``, else a node-local folder: ``/var/tmp/kbatch-<user>/models`` (the OS temp dir
    where ``/var/tmp`` is missing or read-only). Not ``~/.cache``: home folders are often NFS mounts that every
    node shares, where file locks and temp-file cleanup are per node. ``/var/tmp`` is on disk and survives a
    reboot, where ``/tmp`` is often memory (docs/models.md)."""
    env = os.environ.get("KBATCH_MODEL_CACHE")
    if env:
        return env
    base = "/var/tmp" if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"kbatch-{_user()}", "models")


def _user() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        name = str(os.getuid())
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or str(os.getuid())


def temp_name(final: Path, kind: str = "part") -> Path:
    """The temp file beside ``final`` that this process writes before renaming it into place: its name carries
    this host and pid, so cleanup can tell whose it is."""
    return final.with_name(f"{final.name}.{kind}-{HOST}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_temp_files(dest: Path) -> list[Path]:
    """Remove the temp files (``.part-``, ``.tmp-``) in ``dest`` that processes of THIS host left when they
    died; files of another host (a cache on a shared mount) or of a live process are never touched, nor names
    without host and pid. Called under the node lock. Returns what it removed."""
    removed = []
    for p in dest.rglob("*"):
        m = _PART.search(p.name)
        if not m or m["host"] != HOST or not p.is_file():
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and _pid_alive(pid):
            continue
        p.unlink(missing_ok=True)  # ours (no copy of ours is under way: we hold the lock) or a dead process's
        removed.append(p)
    return removed


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


def shared_mount(cache: Path) -> tuple[str, str] | None:
    """``(mount point, fstype)`` when the cache is on a network filesystem whose locks are per node (NFS with
    local locks, sshfs, gcsfuse, ...): its node lock and in-use locks do not see other nodes' processes."""
    return local_store.mount_of(str(cache))


def _evict_old_versions(cache: Path, prefix: str, keep: Path) -> None:
    """Remove the cached versions of a source other than ``keep`` that no living process uses. Never on a
    cache whose locks are per node (:func:`shared_mount`): a process of another node may be loading them."""
    import fcntl

    if (mount := shared_mount(cache)) is not None:
        log.warning("models.cache_dir %s is on %s (mounted at %s), whose locks are per node: older versions of "
                    "a model are kept (another node may load them) and nodes may copy a model at the same "
                    "time; a node-local disk is faster and safe (docs/models.md#node-local-cache)", cache,
                    mount[1], mount[0])
        return
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


#: How long a process waits for the node's staging lock while the holder shows no progress (no file of the
#: model's cache folders changes): a stopped or frozen holder must not hang every actor of the node for good.
STALL_SECONDS = 900.0


@contextlib.contextmanager
def _node_lock(path: Path, what: str, stall_seconds: float | None = None):
    """Exclusive inter-process lock (``flock``; released by the OS when a holder dies). The holder writes its
    host and pid into the lock file; a waiter gives up with :class:`StagingStalled` naming it when none of
    the model's cache files (``<lock name>-*``, temp files included) changed for ``stall_seconds``: a copy
    under way keeps writing, a stopped one does not."""
    import fcntl

    stall = STALL_SECONDS if stall_seconds is None else stall_seconds
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process on this node that is staging %s", what)
            _wait_for(fh, path, what, stall)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{HOST} {os.getpid()}\n")
            fh.flush()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _wait_for(fh, path: Path, what: str, stall: float) -> None:
    import fcntl
    import time

    last, since, pause = _progress(path), time.monotonic(), 0.05
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        now = _progress(path)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall:
            holder = path.read_text(errors="replace").strip() or "unknown"
            raise StagingStalled(f"staging {what}: the process holding {path} (host and pid: {holder}) made no "
                                 f"progress for {stall:g} s; it may be stopped or frozen. End or resume that "
                                 f"process (its lock goes when it exits)")
        time.sleep(pause)
        pause = min(1.0, pause * 2)


def _progress(lock: Path) -> tuple:
    """What a staging process changes as it copies: the newest mtime and total size of the model's cache
    files (every version folder of the source, temp files included)."""
    newest, total = 0, 0
    prefix = lock.name[: -len(".lock")]
    for folder in lock.parent.glob(f"{prefix}-*"):
        for p in [folder, *folder.rglob("*")] if folder.is_dir() else [folder]:
            try:
                st = p.stat()
            except OSError:
                continue
            newest, total = max(newest, st.st_mtime_ns), total + st.st_size
    return newest, total


def _read_journal(dest: Path) -> dict:
    try:
        return json.loads((dest / JOURNAL).read_text())
    except (OSError, ValueError):
        return {}


def _write_journal(dest: Path, journal: dict) -> None:
    tmp = temp_name(dest / JOURNAL, "tmp")
    tmp.write_text(json.dumps(journal, indent=1, sort_keys=True))
    os.replace(tmp, dest / JOURNAL)



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
    if sha256_of(path) != entry["sha256"]:
        return False
    entry.update(_stamp(path))
    return True

