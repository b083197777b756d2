"""One shard attempt's commit protocol: in flight, then its commit record created exclusively, or refused.

Promises (docs/output.md, "Shards in flight"; ``kbatch.output.writer`` writes the objects around it):

- :func:`begin`: an attempt finds the shard's record first (committed: it writes nothing; aborted: it is
  refused); else it is recorded in flight (its intent, ``kbatch.output.fence``), which raises
  ``lease.Fenced`` once the run no longer holds the output's lease.
- :func:`commit`: after the attempt's objects, the lease is checked once more and the shard's commit record is
  *created* (if absent, through the output's conditional store): the first attempt to create it commits the
  shard, whatever attempts were made. An attempt refused (the record taken, or the lease lost) removes its
  own objects, which no record names; its intent goes once it can no longer commit.
- :func:`refuse_abort`: an abort record refuses the attempt: ``lease.Fenced`` when a takeover aborted it,
  :class:`ShardAborted` when the shard's rows went to another shard.
"""
from __future__ import annotations

import os

from kbatch import storage
from kbatch.output import commits


class ShardAborted(RuntimeError):
    """The shard's name was aborted (a lease takeover, or its rows went to another shard): nothing commits."""


def store_of(spec):
    """The output's conditional store (the fence's, cached per process, when the spec has one)."""
    if spec.fence is not None:
        return spec.fence.store()
    return storage.conditional_store(spec.root, spec.storage_options)


def begin(spec, shard: str, attempt: str | None) -> dict | None:
    """The shard's record when it has one (committed or aborted: the attempt writes nothing), else None after
    recording attempt ``attempt`` in flight. A fenced spec needs the ``attempt``."""
    fs, root = storage.get_fs(spec.root, spec.storage_options)
    rec = commits.read(fs, root, shard)
    if rec is not None:
        return rec
    if spec.fence is not None:
        if not attempt:
            raise ValueError(f"shard {shard!r}: a fenced write needs its attempt id")
        spec.fence.begin(shard, attempt)
    return None


def commit(spec, shard: str, attempt: str, record: dict, files: list[str]) -> dict | None:
    """Create the shard's commit ``record`` (naming ``files``) after a last lease check: None when this
    attempt committed the shard, else the record that was there (this attempt's objects are removed)."""
    fs, root = storage.get_fs(spec.root, spec.storage_options)
    fence = spec.fence
    if fence is not None:
        try:
            fence.check()  # a run that lost its lease stops here (a takeover also aborts its shards in flight)
        except BaseException:
            drop_attempt(fs, root, files)
            fence.end(shard, attempt)  # this attempt never creates its record
            raise
    # on a local disk the folders naming the attempt's files are made durable before the record naming them
    storage.sync_folders(fs, [storage.join(root, rel) for rel in files])
    # (an error from the create itself keeps the objects and the intent: the record may have landed)
    existing = commits.create(store_of(spec), shard, record)
    if existing is not None and existing.get("attempt") == attempt:  # ours, landed before a retried error
        existing = None
    if fence is not None:
        fence.end(shard, attempt)  # committed, or refused: this attempt can no longer commit
    if existing is not None:
        drop_attempt(fs, root, files)
    return existing


def refuse_abort(shard: str, rec: dict) -> None:
    """Raise for an abort record (``lease.Fenced`` after a takeover, else :class:`ShardAborted`); return for a
    commit."""
    if commits.is_commit(rec):
        return
    by = rec.get("by") or {}
    msg = (f"shard {shard} was aborted by run {by.get('run_id')!r} (lease epoch {by.get('epoch')}): "
           f"{by.get('reason', 'unknown reason')}; this write commits nothing")
    from kbatch.output.lease import TAKEOVER_REASON, Fenced

    if TAKEOVER_REASON in str(by.get("reason", "")):
        raise Fenced(msg)
    raise ShardAborted(msg)


def drop_attempt(fs, root: str, files: list[str]) -> None:
    """Best effort: remove a refused attempt's objects (never named by a commit, so never read anyway)."""
    for rel in files:
        try:
            fs.rm_file(storage.join(root, rel))
        except Exception:  # noqa: BLE001
            pass
    if storage.is_local(fs):
        for rel in {f.rsplit("/", 1)[0] for f in files if f.startswith("images/") and "/" in f}:
            try:
                os.rmdir(storage.join(root, rel))
            except OSError:
                pass
