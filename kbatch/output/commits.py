"""Commit records: ``_commits/<shard>.json``, one per shard, created exclusively (docs/output.md: one shard
is committed at most once).

Every write attempt of a shard writes its objects under its own names (``<shard>~<attempt>``: ``~`` never
occurs in a shard name) and then *creates* the shard's commit record naming those files, through the
output's conditional store (``kbatch.storage.conditional``: create-if-absent on every backend). The first
attempt to create it wins; a later attempt (a resend after a writer was presumed dead, a Ray
retry, a writer thawed behind a partition) finds the record there and commits nothing: readers trust only
the files a commit record names, so the loser's objects are never read.

A record can also be an *abort* (``{"aborted": true}``): created in the shard's name by whoever must make
sure that no attempt of it commits any more: a run taking over the output lease, for the shards the old
holder had in flight (``kbatch.output.intents``), ``--overwrite`` for every shard it removes (a commit
record is replaced by an abort, never deleted: ``kbatch.output.overwrite``), or a driver about to render some of a shard's rows again into
another shard. Readers skip aborted shards. Records written before attempts existed (no ``attempt`` field)
name ``meta/<shard>.parquet``; they stay readable.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import time
import uuid

from kbatch import storage

COMMITS = "_commits"
ATTEMPT_SEP = "~"


def new_attempt() -> str:
    return uuid.uuid4().hex[:12]


def attempt_name(shard: str, attempt: str) -> str:
    """The stem of an attempt's objects: ``<shard>~<attempt>``."""
    return f"{shard}{ATTEMPT_SEP}{attempt}"


def shard_of(name: str) -> str:
    """The shard of an object stem (``<shard>~<attempt>`` or, written before attempts, ``<shard>``)."""
    return name.split(ATTEMPT_SEP, 1)[0]


def commit_path(root: str, shard: str) -> str:
    if not valid_shard(shard):
        raise ValueError(f"invalid shard name {shard!r} (letters, digits, '.', '_', '-')")
    return storage.join(root, COMMITS, f"{shard}.json")


def record_name(shard: str) -> str:
    """The commit record's name relative to the output root (what the conditional store takes)."""
    if not valid_shard(shard):
        raise ValueError(f"invalid shard name {shard!r} (letters, digits, '.', '_', '-')")
    return f"{COMMITS}/{shard}.json"


def create(store, shard: str, record: dict) -> dict | None:
    """Create the commit record of ``shard`` in ``store`` (the output's ``ConditionalStore``): None if this
    call created it, else the record that was there. The record must be unique to the attempt (its
    ``attempt`` or abort ``time``): a create whose answer was lost and whose retry found the name taken by
    these very bytes succeeded (the store's lost-answer rule)."""
    from kbatch.storage.conditional import PreconditionFailed

    name = record_name(shard)
    try:
        store.create(name, storage.dumps_json(record))
        return None
    except PreconditionFailed:
        pass
    seen = store.read(name)
    return parse(shard, seen.data) if seen is not None else {"shard": shard, "unreadable": True}


def abort(store, shard: str, by: dict) -> dict | None:
    """Make sure no attempt of ``shard`` commits from now on: None if this call aborted it, else the record
    that was there (a commit, or an earlier abort)."""
    return create(store, shard, {"shard": shard, "aborted": True, "by": by, "time": time.time(),
                                 "nonce": uuid.uuid4().hex[:8]})


def parse(shard: str, raw: bytes) -> dict:
    """A commit record's content; ``{"unreadable": True}`` for bytes kbatch never writes (records are
    created complete)."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {"shard": shard, "unreadable": True}
    return rec if isinstance(rec, dict) else {"shard": shard, "unreadable": True}


def read(fs, root: str, shard: str) -> dict | None:
    """The commit record of ``shard``, or None when there is none. A record that does not parse (never
    written by kbatch: records are created complete) comes back as ``{"unreadable": True}``."""
    try:
        raw = fs.cat_file(commit_path(root, shard))
    except FileNotFoundError:
        return None
    return parse(shard, raw)


def is_commit(rec: dict | None) -> bool:
    """A record that makes its shard visible (not an abort, not garbage)."""
    return bool(rec) and not rec.get("aborted") and not rec.get("unreadable")


def meta_file(shard: str, rec: dict) -> str:
    """The metadata object a commit names (``meta/<shard>.parquet`` for records without attempts)."""
    if rec.get("meta"):
        return storage.check_relative(rec["meta"])
    for f in rec.get("files") or []:
        if str(f).startswith("meta/"):
            return storage.check_relative(f)
    return f"meta/{shard}.parquet"


def data_file(rec: dict, folder: str) -> str | None:
    """The first file a commit names under ``folder/`` (e.g. ``embeddings``), or None."""
    for f in rec.get("files") or []:
        if str(f).startswith(folder + "/"):
            return storage.check_relative(f)
    return None


def listed(fs, root: str) -> list[str]:
    """Names of the shards with a commit record of any kind (commits and aborts), sorted."""
    return storage.list_names(fs, storage.join(root, COMMITS), ".json")


def read_all(fs, root: str, shards: list[str] | None = None, workers: int = 16) -> dict[str, dict]:
    """``{shard: commit record}`` of the committed shards (``shards``: only those names), aborts and
    unreadable records left out, in name order."""
    names = listed(fs, root) if shards is None else list(shards)
    if not names:
        return {}
    if len(names) == 1:
        recs = [read(fs, root, names[0])]
    else:
        with cf.ThreadPoolExecutor(max_workers=min(workers, len(names))) as ex:
            recs = list(ex.map(lambda s: read(fs, root, s), names))
    return {s: r for s, r in zip(names, recs) if is_commit(r)}


_SHARD_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def valid_shard(shard: str) -> bool:
    """A shard name kbatch could have written (``writer.SHARD_RE``): never a path outside ``_commits``."""
    return (isinstance(shard, str) and 0 < len(shard) <= 200 and shard[0].isalnum() and ".." not in shard
            and set(shard) <= _SHARD_CHARS)
