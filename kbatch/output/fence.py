"""The writers' fence: what a run's writers carry so that a run that lost its lease commits nothing.

Promises (docs/output.md, "Shards in flight"): a :class:`Fence` (picklable: root, run id, lease token and
epoch) lets a writer

- :meth:`Fence.begin` an attempt of a shard: create the attempt's intent (``kbatch.output.intents``), then
  read the lease: :class:`~kbatch.output.lease.Fenced` when it is not this run's (the intent is removed);
- :meth:`Fence.check` before it creates its commit record (a read of the lease);
- :meth:`Fence.end` the attempt once it can no longer commit (removes the intent).

None of these writes the lease object: per shard, a writer creates and removes its own intent and reads the
lease twice, so commits scale with writers (bench/commits.py). A run taking the lease over aborts every
intent it lists; an intent created after that listing is followed by a lease read that sees the takeover.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

from kbatch.output import intents
from kbatch.output.lease import LEASE_NAME, Fenced, holds, lost_message, open_store, parse

_STORES: dict[tuple, object] = {}  # (root, options) -> this process's conditional store
_OPEN: dict[tuple, str] = {}  # (root, shard, attempt) -> version of the intent this process created
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Fence:
    """What a run's writers carry with each write call: the run's lease token and epoch."""

    root: str
    run_id: str
    token: str = field(repr=False)
    epoch: int
    storage_options: dict | None = field(default=None, repr=False, compare=False)

    def store(self):
        """The output's conditional store (one per process and output)."""
        key = (self.root, json.dumps(self.storage_options or {}, sort_keys=True, default=str))
        with _LOCK:
            store = _STORES.get(key)
        if store is None:
            store = open_store(self.root, self.storage_options)
            with _LOCK:
                store = _STORES.setdefault(key, store)
        return store

    def _message(self, store, seen) -> str:
        hint = ""
        if seen is None and not str(store.url).startswith(("s3://", "gs://", "gcs://")):
            hint = (" (or this writer, on another node, does not see the driver's output folder: use object "
                    "storage or a shared filesystem)")
        return (lost_message(f"run {self.run_id!r} (lease epoch {self.epoch})",
                             f"{store.url.rstrip('/')}/{LEASE_NAME}", seen, store) + hint + "; its write is refused")

    def check(self) -> None:
        """Raise :class:`Fenced` unless the lease is this run's (one read of the lease object)."""
        store = self.store()
        seen = store.read(LEASE_NAME)
        if not holds(parse(seen), self.token):
            raise Fenced(self._message(store, seen))

    def begin(self, shard: str, attempt: str) -> None:
        """Attempt ``attempt`` of ``shard`` is in flight: its intent is created, then the lease checked."""
        store = self.store()
        version = intents.open_intent(store, shard, attempt, self.run_id, self.epoch)
        with _LOCK:
            _OPEN[(self.root, shard, attempt)] = version
        try:
            self.check()
        except BaseException:
            self.end(shard, attempt)  # fenced before it wrote anything: this attempt never commits
            raise

    def end(self, shard: str, attempt: str) -> None:
        """Attempt ``attempt`` of ``shard`` can no longer commit (it did, or was refused): its intent goes."""
        with _LOCK:
            version = _OPEN.pop((self.root, shard, attempt), None)
        intents.close_intent(self.store(), shard, attempt, version)
