"""Shards: finished rows collected into shards and handed to a writer, and what a shard's write needs.

A shard holds the images of whole decoder batches (as object refs: the driver never fetches them) and the
error records of failed rows. It is written when it has ``output.rows_per_shard`` rows, or ``FLUSH_SECONDS``
after its first row. Every shard of a run is named ``<run_id>-<seq>``; the writer's commit record is the
point after which its rows count as done (``kbatch.output.writer``).

One shard, one commit (``kbatch.output.commits``): a shard name always holds the same rows. A write whose
writer died is resent under the same name (whichever attempt commits first wins; the others commit nothing).
When some of a shard's rows must be made again (their images died with a node), the shard's name is first
aborted (:func:`settle_lost_write`): if an earlier attempt had committed it, its rows are done and nothing is
made again; otherwise no attempt of it can commit any more, and the rest of its rows go out under a new name
(:meth:`ShardBuffer.rename`).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from kbatch.config import JobConfig
from kbatch.schema.rows import Row
from kbatch.schema.records import base_record

FLUSH_SECONDS = 60  # a shard is written at rows_per_shard rows or after this long, whichever comes first


@dataclass
class Entry:
    """Rows finished together (one decoder batch; or one prior batch for ``stage: prior``)."""

    rows: list[Row]
    payload: object  # ObjectRef of the stage's output (images, or prior outputs)
    node: str | None  # where the payload was made (it is lost if that node dies before the write)
    extra: dict = field(default_factory=dict)  # stage prior: manifest cells by id


@dataclass
class Shard:
    name: str
    seq: int
    entries: list[Entry]
    errors: list[dict]
    resends: int = 0  # writes retried after a writer died

    @property
    def rows(self) -> int:
        return sum(len(e.rows) for e in self.entries) + len(self.errors)

    @property
    def ok_rows(self) -> int:
        return sum(len(e.rows) for e in self.entries)

    @property
    def images(self) -> int:
        return sum(r.num_images for e in self.entries for r in e.rows)


class ShardBuffer:
    """Rows waiting for their shard."""

    def __init__(self, run_id: str, rows_per_shard: int):
        self.run_id, self.rows_per_shard = run_id, rows_per_shard
        self.entries: list[Entry] = []
        self.errors: list[dict] = []
        self.rows = 0
        self.since: float | None = None
        self.seq = 0

    def add(self, entry: Entry | None = None, error: dict | None = None) -> None:
        if entry is not None:
            self.entries.append(entry)
            self.rows += len(entry.rows)
        if error is not None:
            self.errors.append(error)
            self.rows += 1
        if self.since is None and self.rows:
            self.since = time.monotonic()

    def due(self, now: float) -> bool:
        return self.rows >= self.rows_per_shard or (
            self.rows > 0 and self.since is not None and now - self.since > FLUSH_SECONDS)

    def take(self) -> Shard:
        shard = Shard(f"{self.run_id}-{self.seq:05d}", self.seq, self.entries, self.errors)
        self.seq += 1
        self.entries, self.errors, self.rows, self.since = [], [], 0, None
        return shard

    def rename(self, shard: Shard) -> Shard:
        """``shard``'s rows under a new name (its old name was aborted: no attempt of it commits)."""
        renamed = Shard(f"{self.run_id}-{self.seq:05d}", self.seq, shard.entries, shard.errors, shard.resends)
        self.seq += 1
        return renamed

    def drop_node(self, node: str) -> list[Row]:
        """Entries whose payload died with ``node``: removed; their rows are returned (to be made again)."""
        lost = [e for e in self.entries if e.node == node]
        if lost:
            self.entries = [e for e in self.entries if e.node != node]
            self.rows -= sum(len(e.rows) for e in lost)
        return [r for e in lost for r in e.rows]


def settle_lost_write(spec, name: str):
    """A write of shard ``name`` whose outcome is unknown (its call lost an input, its writer may still be
    running behind a partition) before any of its rows is made again elsewhere: abort the name. Returns the
    ``ShardStats`` of the attempt that had committed it (its rows are done: make nothing again), or None once
    no attempt of it can commit any more."""
    from kbatch import storage
    from kbatch.output import commits
    from kbatch.output.writer import _stats_of

    fence = spec.fence
    store = fence.store() if fence is not None else storage.conditional_store(spec.root, spec.storage_options)
    existing = commits.abort(store, name, {"run_id": getattr(fence, "run_id", None),
                                              "epoch": getattr(fence, "epoch", None),
                                              "reason": "its rows are written again in other shards"})
    if existing is not None and commits.is_commit(existing):
        return _stats_of(name, existing)
    return None


def write_call(writer, shard: Shard, spec, cfg: JobConfig, template: dict):
    """Submit ``shard`` to ``writer`` (an actor handle or the in-driver writer); returns the stats ref. The
    images travel as refs and each row's record is made by the writer from the row that comes with them:
    the call itself stays small (a large argument would be copied into the object store by the driver)."""
    spec = dataclasses.replace(spec, fail_after_data=cfg.faults.fail_write_shard == shard.seq)
    payloads = [e.payload for e in shard.entries]
    if cfg.stage == "prior":  # prior outputs carry no row: the records and manifest cells go along
        bases = {r.id: base_record(r, template) for e in shard.entries for r in e.rows}
        cells = {k: v for e in shard.entries for k, v in e.extra.items()}
        return writer.write_embeddings.remote(spec, shard.name, bases, cells, shard.errors, *payloads)
    return writer.write.remote(spec, shard.name, template, shard.errors, *payloads)
