"""The driver loop: windows of rows through input loading, the prior, the decoders and the writers.

The loop plans, dispatches, waits for any call to come back and settles it, and every ``TICK`` does the
housekeeping (the node table, placement, scaling, room for a starved stage, progress). Its parts:
* ``kbatch.run.dispatch``: the queues between the stages and what goes where, under the bounds;
* ``kbatch.run.outcomes``: what a result, a raise or a death means for rows and replicas; the run's counts;
* the stage pools (``kbatch.run.stage_pool``) own the actors; ``kbatch.run.room_policy`` gives a starved
  stage room.
It holds rows and object refs, never images or embeddings: a prior call returns (status, embeddings), and
the embeddings' ref goes to a decoder call and the decoder's images' ref to a writer; only the statuses are
fetched. Many completions are handled per wait.
"""
from __future__ import annotations

import logging
import time

from kbatch.config import JobConfig
from kbatch.plan.planner import Planner
from kbatch.run.dispatch import Dispatch
from kbatch.run.outcomes import Outcomes
from kbatch.run.room_policy import Room
from kbatch.run.stage_pool import NodeTable, StagePool
from kbatch.run.work import StageFailed
from kbatch.schema.records import record_template

log = logging.getLogger("kbatch")

TICK = 1.0  # seconds between housekeeping (node table, placement, scaling, progress)

__all__ = ["Driver", "StageFailed", "TICK"]


class Driver:
    """One run's loop. ``prior``/``decoder``/``writers``/``loaders``: the stages it drives (built by the
    runner: ``kbatch.run.stage_setup``). ``dispatch`` holds the queues, ``outcomes`` the results."""

    def __init__(self, ray, cfg: JobConfig, planner: Planner, run_id: str, *, spec, prior: StagePool | None,
                 decoder: StagePool | None, writers: StagePool, loaders, stored_priors=None, nodes: NodeTable,
                 describe_cluster, on_tick=None, balance=None, share=None):
        self.ray, self.cfg, self.planner, self.run_id = ray, cfg, planner, run_id
        self.prior, self.decoder, self.writers = prior, decoder, writers
        self.nodes, self.describe_cluster, self.on_tick = nodes, describe_cluster, on_tick
        self.room = Room()  # a stage with no room takes it from the others (kbatch.run.room_policy)
        self.balance = balance  # an auto prior's share of the GPUs, from measured speeds (kbatch.run.balance)
        self.share = share  # the run's share of a cluster shared by kbatch runs (kbatch.run.share), or None
        template = record_template(cfg, run_id)  # what every record of the run shares
        self.dispatch = Dispatch(cfg, run_id, planner, spec=spec, template=template, prior=prior, decoder=decoder,
                                 writers=writers, loaders=loaders, stored_priors=stored_priors)
        self.outcomes = Outcomes(ray, cfg, self.dispatch, nodes, template, self.pools)
        for pool in (prior, decoder):  # near the tail, no replica (nor node) the work left cannot use
            if pool is not None:
                pool.work_cap = lambda p=pool: self._batches_left(p)
        self.loop_seconds = 0.0
        self._tick_at = 0.0

    # ======================================================================================== the loop
    def run(self) -> None:
        t0 = time.monotonic()
        try:
            self._run()
        finally:
            self.loop_seconds = round(time.monotonic() - t0, 3)

    def _run(self) -> None:
        work, outcomes = self.dispatch, self.outcomes
        outcomes.t0 = time.monotonic()
        for pool in self.pools():
            for r in pool.scale():
                work.track_ready(pool, r)
        while True:
            now = time.monotonic()
            if now - self._tick_at >= TICK:
                self._tick_at = now
                self._tick(now)
            self._plan()
            work.dispatch()
            work.mark()
            if self.planner.exhausted and work.idle():
                break
            refs = list(work.inflight)
            if not refs:  # nothing in flight and nothing placeable yet: wait for the cluster
                time.sleep(0.2)
                continue
            ready, _ = self.ray.wait(refs, num_returns=1, timeout=TICK)
            if ready and len(refs) > 1:
                ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                outcomes.complete(ref)

    def _plan(self) -> None:
        """Windows from the planner while the plan bound has room: their batches to the dispatch, the rows
        validation rejected straight to error records."""
        while not self.planner.exhausted and self.dispatch.wants_window():
            w = self.planner.next_window()
            if w is None:
                break
            for rec in w.errors:
                self.outcomes.fail_record(rec)
            self.dispatch.take_batches(w)

    def pools(self) -> list[StagePool]:
        out = []
        for p in (self.prior, self.decoder, self.writers):
            if p is not None and p not in out:
                out.append(p)
        return out

    # ==================================================================================== housekeeping
    def _tick(self, now: float) -> None:
        from kbatch.models.actors import kv_get

        for node in self.nodes.refresh():
            self.outcomes.node_lost(node)
        pools = self.pools()
        for pool in pools:
            for r in list(pool.all.values()):
                if r.state == "pending" and not r.placed:
                    node = kv_get(f"{r.slot}/placed")
                    if node:
                        pool.on_placed(r, node)
        if self.balance is not None:  # may move the prior:decoder split; the pools' scale() below follows it
            self.balance.step(now)
        self.room.step(now, pools, self._needs, self.nodes.room_for, self.nodes.capacity)
        waits = self.share is not None and self.share.placement_waits()  # queued, or others still draining
        for pool in pools:
            if self._needs(pool) and not (waits and pool is not self.writers):
                pool.placement_check(now, self.cfg.resources.placement_timeout, lambda p=pool: self.describe_cluster(p),
                                     self.nodes.room_for)
            else:
                pool.unplaced_since = None
            for r in pool.scale(now, grow=self.room.grows(pool)):
                self.dispatch.track_ready(pool, r)
            if pool.broken:
                raise StageFailed(pool.broken)
        if self.dispatch.buffer.due(now):  # rows_per_shard, or FLUSH_SECONDS after its first row
            self.dispatch.due = True
        if self.on_tick is not None:
            self.on_tick(self)

    def _needs(self, pool: StagePool) -> bool:
        """Whether ``pool`` still has work ahead (a stage with nothing left to do may be unplaceable)."""
        if pool is self.writers or pool is self.decoder:
            return True
        w = self.dispatch
        return bool(w.planned or w.loaded or not self.planner.exhausted or w.kinds["prior"] > 0)

    def _batches_left(self, pool: StagePool) -> int | None:
        """The replicas of ``pool`` the work left can keep busy: its batches ahead (queued for the stage, in
        flight there, or before it) over the batches one replica runs at once. None until the whole manifest
        is planned (the work left is not known). Caps an ``auto`` pool's target (``StagePool.work_cap``)."""
        if not self.planner.exhausted:
            return None
        w = self.dispatch
        kinds = ("load", "prior", "decoder") if pool is self.decoder else ("load", "prior")
        ahead = (sum(u.images for u in w.planned) + sum(u.images for u in w.loaded)
                 + sum(c.unit.images for c in w.inflight.values() if c.kind in kinds and c.unit is not None))
        if pool is self.decoder:
            ahead += w.decoder_q.images + sum(w.waiting_images.values())
        batch = getattr(self.cfg.resources, pool.name).batch_size
        per_replica = max(1, int(batch) if isinstance(batch, int) else 16) * max(1, pool.lanes)
        return -(-ahead // per_replica)

    # ========================================================================================== summary
    def queues(self) -> dict:
        """Queue depths per stage (rows, or shards for the writers) and replicas, for progress reports."""
        return {**self.dispatch.queues(),
                "replicas": {p.name: {"running": p.n_running(), "pending": len(p.pending()),
                                      "draining": sum(r.state == "draining" for r in p.all.values())}
                             for p in self.pools()}}

    def replica_counts(self) -> dict:
        """Per stage: replicas started, lost with their nodes, and drained (above the target, or stopped to
        make room for a starved stage: kbatch.run.room_policy)."""
        return {p.name: {"started": p.started, "lost_to_nodes": p.lost_to_nodes, "drained": p.drained}
                for p in self.pools()}

    def stop(self) -> None:
        for pool in self.pools():
            pool.stop()
