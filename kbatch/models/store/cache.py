"""The node-local model cache: one folder per version of a source, its journal of verified files, the node
lock that lets one process of a node copy while the others wait, shared holds that keep a folder in use from
eviction, and reuse of unchanged files from an earlier version.

Layout under ``models.cache_dir`` (default: :func:`default_cache_dir`): ``<name>-<hash of the URL>.lock`` (the
staging lock), ``<name>-<hash>-<listing signature>/`` (one version: the files and ``.kbatch-stage.json``),
``<that folder>.use.lock`` (held shared by every process that loads it). See docs/models.md.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from kbatch.models.store.integrity import _signature, sha256_of
from kbatch.models.store.sources import safe_name

log = logging.getLogger("kbatch")

#: In a staged copy: the source, each verified file (size, source etag, sha256) and the completion flag.
JOURNAL = ".kbatch-stage.json"


def default_cache_dir() -> str:
    return os.environ.get("KBATCH_MODEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kbatch",
                                                                "models")


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


def _read_journal(dest: Path) -> dict:
    try:
        return json.loads((dest / JOURNAL).read_text())
    except (OSError, ValueError):
        return {}


def _write_journal(dest: Path, journal: dict) -> None:
    tmp = dest / f"{JOURNAL}.tmp-{os.getpid()}"
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

