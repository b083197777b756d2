"""``--overwrite``, fenced: an output's earlier records go, and nothing of a newer holder's ever does.

Promises (docs/output.md, "--overwrite"):

- **Only what is provably not a newer holder's is removed.** Every object removed was *listed before* a lease
  read that found the lease still this run's (:meth:`~kbatch.output.lease.Lease.verify`, once per batch of at
  most :data:`BATCH` objects): it existed while this run held the lease, so no run that took the lease over
  later can have written it. A run frozen midway (a GC pause, SIGSTOP, a partition) stops at its next batch
  with :class:`~kbatch.output.lease.LeaseLost`; what it removes late is an earlier run's.
- **Commit records are never deleted:** a shard's commit record is replaced (if-version) by an abort record,
  so no late attempt of an old shard can commit again, and abort records stay (a takeover's aborts keep
  protecting the output). They go first, so readers never see a committed shard whose data is gone.
- **Interrupted overwrites are finished:** the lease record is marked ``overwriting`` before anything is
  removed and cleared after; a run that takes the lease over while it is marked finishes the overwrite before
  it reads the output (``kbatch.run.runner``), so it never counts records a late removal takes away.
- ``_job.json`` is replaced by the run's own first conditional write; ``_SUCCESS`` is removed (if-version);
  ``_lease.json`` and ``_inflight/`` are the lease protocol's and stay. Other files in the folder stay.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import time

from kbatch import storage
from kbatch.output import commits
from kbatch.output.job_file import SUCCESS_FILE
from kbatch.storage.conditional import PreconditionFailed

log = logging.getLogger(__name__)

BATCH = 500  # objects removed per lease check
#: what writers and the end of a run write at an output root, besides the lease protocol's objects
DATA_ENTRIES = ("meta", "stats", "images", "tars", "data", "embeddings", "img_emb", "gallery", "gallery.html",
                "contact_sheet.png")


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def overwrite(lease, storage_options: dict | None = None, batch: int | None = None, workers: int = 16) -> dict:
    """Remove the output's earlier records, fenced by ``lease`` (module docstring). Returns counts:
    ``aborted`` (commit records turned into aborts) and ``removed`` (data objects)."""
    batch = batch or BATCH
    store = lease.store
    lease.begin_overwrite()
    lease.remove(SUCCESS_FILE)
    by = {"run_id": lease.run_id, "epoch": lease.epoch, "reason": "overwritten (--overwrite)"}

    def supersede(name: str) -> int:
        for _ in range(5):
            seen = store.read(name)
            if seen is None:
                return 0
            shard = name.rsplit("/", 1)[-1][: -len(".json")]
            rec = commits.parse(shard, seen.data)
            if rec.get("aborted"):
                return 0  # aborts stay as they are
            data = storage.dumps_json({"shard": shard, "aborted": True, "by": by, "time": time.time(),
                                       "superseded": {k: rec.get(k) for k in ("run_id", "epoch", "attempt")}})
            try:
                store.replace(name, data, seen.version)
                return 1
            except PreconditionFailed:
                continue
        raise OSError(f"commit record {name} kept changing while --overwrite superseded it")

    aborted = 0
    names = [n for n in store.list(commits.COMMITS + "/") if n.endswith(".json")]
    with cf.ThreadPoolExecutor(max_workers=workers) as ex:
        for chunk in _chunks(names, batch):
            lease.verify()  # listed before this read: none of these is a newer holder's
            aborted += sum(ex.map(supersede, chunk))

    fs, root = storage.get_fs(lease.root, storage_options)
    removed = 0
    for entry in DATA_ENTRIES:
        path = storage.join(root, entry)
        try:
            fs.invalidate_cache(path)
        except Exception:  # noqa: BLE001
            pass
        if not fs.exists(path):
            continue
        files = sorted(fs.find(path)) if fs.isdir(path) else [path]
        for chunk in _chunks(files, batch):
            lease.verify()
            fs.rm(chunk)
            removed += len(chunk)
        if storage.is_local(fs):
            _remove_empty_folders(path)
    if storage.is_local(fs) and os.path.isdir(root):  # temp files of an interrupted write of a top-level entry
        for name in os.listdir(root):
            if storage.TMP_MARK in name and name.split(storage.TMP_MARK, 1)[0] in DATA_ENTRIES:
                lease.verify()
                os.unlink(os.path.join(root, name))
    lease.end_overwrite()
    log.info("kbatch: --overwrite: %d committed shards superseded (aborted), %d objects removed", aborted, removed)
    return {"aborted": aborted, "removed": removed}


def _remove_empty_folders(path: str) -> None:
    """Local disks: the folders the removal emptied (only empty ones: a newer holder's files keep theirs)."""
    if not os.path.isdir(path):
        return
    for folder, _dirs, _files in os.walk(path, topdown=False):
        try:
            os.rmdir(folder)
        except OSError:
            pass
