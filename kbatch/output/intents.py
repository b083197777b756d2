"""Shards in flight: one intent object per write attempt, ``_inflight/<shard>~<attempt>.json``, never the lease.

Promises (docs/output.md, "Shards in flight"):

- A writer *creates* its attempt's intent (create-if-absent through the output's conditional store) before it
  writes anything of the attempt, and checks the lease after that; it removes the intent only when the
  attempt can no longer create its commit record (it committed, found the shard committed or aborted, or gave
  up before the commit). An intent left behind (a writer killed, a lost answer) costs one abort that finds
  the commit or aborts a name nobody uses.
- A run that takes the lease over (or releases it) aborts the shard of every intent it lists
  (:func:`abort_in_flight`, ``kbatch.output.commits.abort``) and removes an intent only after its shard's
  abort (or commit) record exists. A writer of the old holder that created its intent after that listing
  finds the lease taken over at its next check (it checks after creating the intent), so no attempt of an
  old holder commits after the new holder read the output.
- Writers touch only their own intents: the lease object sees renewals and takeovers only, so shard commits
  scale with writers (bench/commits.py).
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import time

from kbatch import storage
from kbatch.output import commits

log = logging.getLogger(__name__)

INFLIGHT = "_inflight"
SUFFIX = ".json"


def intent_name(shard: str, attempt: str) -> str:
    commits.record_name(shard)  # validates the shard name
    if not attempt or not all(c.isalnum() for c in attempt):
        raise ValueError(f"invalid attempt {attempt!r}")
    return f"{INFLIGHT}/{commits.attempt_name(shard, attempt)}{SUFFIX}"


def open_intent(store, shard: str, attempt: str, run_id: str | None, epoch: int | None) -> str:
    """Record attempt ``attempt`` of ``shard`` as in flight; returns the intent's version (to remove it)."""
    body = {"shard": shard, "attempt": attempt, "run_id": run_id, "epoch": epoch, "time": time.time()}
    return store.create(intent_name(shard, attempt), storage.dumps_json(body, indent=None))


def close_intent(store, shard: str, attempt: str, version: str | None) -> None:
    """The attempt can no longer commit: remove its intent. Best effort (a leftover costs one abort later)."""
    try:
        name = intent_name(shard, attempt)
        if version is None:
            seen = store.read(name)
            if seen is None:
                return
            version = seen.version
        store.delete(name, version)
    except Exception as e:  # noqa: BLE001
        log.debug("kbatch: intent of %s~%s left behind: %s", shard, attempt, e)


def listed(store) -> list[tuple[str, str, str]]:
    """``(shard, attempt, name)`` of every intent in the output, sorted by name."""
    out = []
    for name in store.list(INFLIGHT + "/"):
        base = name.rsplit("/", 1)[-1]
        if not base.endswith(SUFFIX) or storage.TMP_MARK in base:
            continue
        stem = base[: -len(SUFFIX)]
        shard, _, attempt = stem.partition(commits.ATTEMPT_SEP)
        if not commits.valid_shard(shard):
            log.warning("kbatch: ignoring an intent with an invalid shard name: %r", name)
            continue
        out.append((shard, attempt, name if name.startswith(INFLIGHT + "/") else f"{INFLIGHT}/{base}"))
    return sorted(out, key=lambda t: t[2])


def abort_in_flight(store, carried: list[str], by: dict, workers: int = 16) -> list[str]:
    """Abort ``carried`` shards and the shard of every intent listed now; then remove those intents. Returns
    the shards this call aborted (the others had a commit or an abort already). Raises on a storage error:
    the caller keeps the ``carried`` list in the lease record until this returns."""
    intents = listed(store)
    shards = sorted({s for s in carried if commits.valid_shard(s)} | {s for s, _, _ in intents})
    if not shards:
        return []

    def one(shard: str):
        return shard, commits.abort(store, shard, by)

    aborted = []
    with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, len(shards)))) as ex:
        for shard, existing in ex.map(one, shards):  # raises the first error: nothing is cleared then
            if existing is None:
                aborted.append(shard)

    def drop(item):
        shard, attempt, name = item
        try:
            seen = store.read(name)
            if seen is not None:
                store.delete(name, seen.version)
        except Exception as e:  # noqa: BLE001 - its shard is aborted: a leftover only costs a second look
            log.debug("kbatch: intent %s left behind: %s", name, e)

    with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, len(intents) or 1))) as ex:
        list(ex.map(drop, intents))
    return aborted
