"""Whole-file writes that readers see complete or not at all: atomic replace, and exclusive create.

Atomicity: on filesystems whose rename is atomic (the local filesystem) data is written to
``<path>.tmp-<uuid>`` (fsynced) and renamed over the final name; on object stores a single PUT is atomic per
object, so the object is written directly. Either way no reader ever sees a partially written file under a
final name. :func:`write_exclusive` (create-if-absent) goes through the store's conditional-write backend
(``conditional.py``), so it is exclusive on local disks, ``memory://``, S3 and GCS alike.
"""
from __future__ import annotations

import os
import posixpath
import uuid

from kbatch.storage.conditional import PreconditionFailed
from kbatch.storage.paths import TMP_MARK, is_local, renames_atomically
from kbatch.storage.stores import store_for


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


def sync_folders(fs, paths) -> int:
    """On a local disk, fsync each distinct folder holding one of ``paths`` (files written with
    :func:`write_bytes_atomic`, whose contents are fsynced but whose names are not yet): call it once before
    the record that makes them visible (a shard's commit), so that a power cut never leaves a durable commit
    naming files that are gone. No-op on object stores (a PUT is durable when answered). Returns the number
    of folders synced."""
    if not is_local(fs):
        return 0
    from kbatch.storage.local_store import fsync_dir

    folders = sorted({os.path.dirname(p) for p in paths})
    for folder in folders:
        fsync_dir(folder)
    return len(folders)


def write_exclusive(fs, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if no object has that name: True if this call created it (or
    an earlier try of it whose answer was lost: ``conditional.py``), False if it existed. Complete or absent
    for readers; on a local disk the file and its folder are fsynced. Raises :class:`Unsupported` on stores
    without an atomic create-if-absent."""
    parent, name = posixpath.split(path)
    try:
        store_for(fs, parent).create(name, bytes(data))
    except PreconditionFailed:
        return False
    return True
