"""Outcomes: what a result, a raise or a death means for rows and replicas.

A call comes back (``complete``) as a value, an exception from the stage, or a failed actor. Results move
units on (rows past the prior wait for a decoder batch, images go to the shard buffer, commits count rows);
the rest is settled here (what each fault costs: docs/architecture.md):
* a batch that raises is split in halves until the guilty row is alone, which gets an error record;
* a call whose actor failed waits in the replica's *limbo* until the replica's fate is known (a ``ready()``
  probe, the node table): a node that died costs nothing (the batch is redone elsewhere); a process that
  died on a live node charges the batches it was running (``kbatch.models.actors.Running``), and a row that
  keeps killing workers fails after ``retries.max_attempts``;
* an input that died with a node (an object lost from the object store) makes its rows start over, free.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict

from kbatch.config import JobConfig
from kbatch.run.dispatch import Dispatch
from kbatch.run.shards import Entry, Shard
from kbatch.run.stage_pool import CRASH, NODE, STOPPED, NodeTable, Replica, StagePool
from kbatch.run.work import Call, StageFailed, Unit
from kbatch.schema.records import base_record, error_record
from kbatch.schema.rows import Row

log = logging.getLogger("kbatch")

FREE_RETRIES = 8  # resubmissions of a batch queued behind another batch's crash
NODE_LOSSES = 8  # node losses one batch may suffer before its next loss counts as a crash


def short(e: BaseException) -> str:
    """One line naming an exception (its cause's, for Ray's wrapped errors)."""
    cause = getattr(e, "cause", None)
    lines = str(e).strip().splitlines()
    text = f"{type(cause).__name__}: {cause}" if cause is not None else (lines[-1] if lines else type(e).__name__)
    return text[:500]


def reason(message: str) -> str:
    return message.split(":", 1)[0] if ":" in message else message


class Outcomes:
    """Settles every call that comes back, and keeps the run's results (rows, images, failures, times)."""

    def __init__(self, ray, cfg: JobConfig, work: Dispatch, nodes: NodeTable, template: dict, pools):
        self.ray, self.cfg, self.work, self.nodes, self.template = ray, cfg, work, nodes, template
        self.pools = pools  # () -> the run's stage pools
        self.t0 = time.monotonic()
        # results
        self.rows_ok = self.rows_failed = self.rows_filtered = self.images = 0
        self.failed_by_reason: dict[str, int] = defaultdict(int)
        self.stats: dict[str, float] = defaultdict(float)
        self.memory: dict[str, float] = {}
        self.committed: set[int] = set()  # shard seqs committed by this run
        self.write_failures: list[str] = []
        self.start_errors: dict[str, str] = {}
        self.driver_gets = 0  # objects this driver fetched (statuses only)
        self.first_image_at: float | None = None  # seconds from the loop's start to the first decoder batch done
        self.compile_warmups: list[dict] = []  # per compiled decoder replica: {shape: first call's seconds}

    # ======================================================================================= completion
    def complete(self, ref) -> None:
        ray = self.ray
        call = self.work.untrack(ref)
        try:
            value = ray.get(ref)
            self.driver_gets += 1
        except ray.exceptions.RayActorError as e:
            return self._actor_failed(call, e)
        except ray.exceptions.RayTaskError as e:
            if isinstance(getattr(e, "cause", None), ray.exceptions.ObjectLostError):
                return self._inputs_lost(call, e)
            return self._raised(call, f"{call.kind} failed: {short(e)}", crash=False)
        except ray.exceptions.ObjectLostError as e:
            return self._inputs_lost(call, e)
        except ray.exceptions.RayError as e:  # a task's worker crashed (after Ray's own retries), ...
            return self._raised(call, f"{call.kind} failed: {type(e).__name__}", crash=True)
        from kbatch.models.actors import Raised

        if isinstance(value, Raised) or (isinstance(value, tuple) and value and isinstance(value[0], Raised)):
            msg = (value if isinstance(value, Raised) else value[0]).message
            return self._raised(call, f"{call.kind} failed: {msg[:500]}", crash=False)
        getattr(self, f"_done_{call.kind}")(call, value)

    def _done_ready(self, call: Call, info: dict) -> None:
        call.pool.on_ready(call.replica, info)

    def _done_probe(self, call: Call, info: dict) -> None:
        """The replica answered: it is alive; the calls that failed on it go back to their queues, free."""
        r = call.replica
        r.probing = False
        if r.state == "pending":
            call.pool.on_ready(r, info)
        call.pool.revive(r)
        limbo, r.limbo = r.limbo, []
        for c in limbo:
            self._requeue(c)

    def _done_load(self, call: Call, errors: dict) -> None:
        from kbatch.plan.input_images import LATER

        unit = call.unit
        later = set(errors.pop(LATER, ()))  # over the loading batch's pixel budget: another task loads them
        if later:
            rows = [r for r in unit.rows if r.id in later]
            self.work.planned.appendleft(Unit(rows, unit.attempts, extra={r.id: unit.extra[r.id] for r in rows
                                                                          if r.id in unit.extra}))
        for r in unit.rows:
            if r.id in errors:
                self.fail(r, errors[r.id], before_decoder=True)
        unit.rows = [r for r in unit.rows if r.id not in errors and r.id not in later]
        if unit.rows:
            self.work.loaded.append(unit)

    def _done_prior(self, call: Call, status) -> None:
        w, unit = self.work, call.unit
        self.stats["prior_seconds"] += status.seconds
        self._peak("prior", status.memory)
        if call.pool is not None:  # the batch's own time: the prior's measured speed (kbatch.run.balance)
            call.pool.on_success(unit.images, status.seconds, stage="prior")
        node = call.replica.node if call.replica is not None else None
        if self.cfg.stage == "prior":
            for r in unit.rows:
                w.past_prior(r)
            w.buffer.add(Entry(unit.rows, call.payload, node, unit.extra))
            return
        for r in unit.rows:
            w.past_prior(r)
            key = r.decoder_key()
            w.waiting[key].append((r, call.payload, tuple(unit.inputs), node))
            w.waiting_images[key] += r.renders  # images to render (best_of candidates too), as dispatch counts

    def _done_decoder(self, call: Call, status) -> None:
        if self.first_image_at is None:
            self.first_image_at = round(time.monotonic() - self.t0, 3)
        self.stats["decoder_seconds"] += status.seconds
        if status.warmup:
            self.stats["decoder_warmup_seconds"] += status.warmup
            if getattr(status, "warmup_by_shape", None):  # a compiled replica's first batch: _job.json compile
                self.compile_warmups.append(status.warmup_by_shape)
        self._peak("decoder", status.memory)
        call.pool.on_success(call.unit.images, status.seconds)  # and the decoders' measured speed
        self.work.buffer.add(Entry(call.unit.rows, call.payload, call.replica.node))

    def _done_write(self, call: Call, stats) -> None:
        shard = call.shard
        filtered = getattr(stats, "filtered_rows", 0)  # rows quality.gate filtered whole: done, but not rendered
        filtered = filtered if isinstance(filtered, int) else 0
        self.rows_ok += shard.ok_rows - filtered
        self.rows_filtered += filtered
        self.rows_failed += len(shard.errors)
        images = getattr(stats, "images", None)  # the writer's count: images quality.gate filtered are not images
        self.images += int(images) if isinstance(images, int) else shard.images
        self.stats["write_seconds"] += getattr(stats, "seconds", 0.0)
        self.committed.add(shard.seq)

    def _peak(self, stage: str, memory: dict) -> None:
        for k, v in memory.items():
            key = f"{stage}_peak_{k}"
            self.memory[key] = round(max(self.memory.get(key, 0.0), v), 3)

    # ============================================================================================ nodes
    def node_lost(self, node: str) -> None:
        log.warning("kbatch: node %s left the cluster; its work is redone elsewhere", node[:8])
        for pool in self.pools():
            for r in list(pool.all.values()):
                if r.node == node:
                    self._replica_dead(pool, r, NODE, "node lost")
        rows = self.work.buffer.drop_node(node)  # finished images that died with it: make them again
        if rows:
            self.work.restart_rows(rows)
        lost = self.work.waiting_lost_with(node)  # embeddings that died with it
        if lost:
            self.work.restart_rows(lost)

    # =========================================================================================== faults
    def _actor_failed(self, call: Call, e) -> None:
        ray = self.ray
        r, pool = call.replica, call.pool
        if call.kind == "ready" and getattr(e, "actor_init_failed", False):  # __init__ raised: no models
            log.error("kbatch: a %s worker failed to start: %s", pool.name, short(e))
            self.start_errors[pool.name] = short(e)
            pool.start_failed(r, short(e))
            if pool.broken:
                raise StageFailed(pool.broken)
            return
        if call.kind == "probe":
            r.probing = False
        if call.kind not in ("ready", "probe"):
            if r.death is not None:  # its fate is known: settle now
                return self._settle(call, r.death, r)
            r.limbo.append(call)
            pool.suspect(r)
        if isinstance(e, ray.exceptions.ActorUnavailableError) and r.death is None:
            if not r.probing:  # maybe alive (or its node is dying): ask it until Ray knows
                self._probe(pool, r)
            return
        self._death(pool, r, e)

    def _probe(self, pool: StagePool, r: Replica) -> None:
        r.probing = True
        self.work.track(r.handle.ready.remote(), Call("probe", None, r, pool))

    def _death(self, pool: StagePool, r: Replica, e) -> None:
        """``r`` is dead: why? Its node is gone (the node table, or Ray's own death cause), or its process
        died on a live node."""
        if r.death is not None:
            return
        text = str(e)
        if getattr(e, "preempted", False) or "node has died" in text or "node was terminated" in text:
            why = NODE
        else:
            self.nodes.refresh(force=True)
            why = NODE if self.nodes.is_dead(r.node) else CRASH
        self._replica_dead(pool, r, why, short(e))

    def _replica_dead(self, pool: StagePool, r: Replica, why: str, cause: str) -> None:
        if r.death is not None:
            return
        if why == NODE:
            log.warning("kbatch: a %s worker was lost with its node (%s); its batches are redone, free",
                        pool.name, (r.node or "?")[:8])
        r.cause = cause
        pool.lost(r, why, cause)
        limbo, r.limbo = r.limbo, []
        for c in limbo:
            self._settle(c, why, r)
        if pool.broken:
            raise StageFailed(pool.broken)

    def _settle(self, call: Call, why: str, r: Replica) -> None:
        """A call whose replica died: who pays?"""
        if call.kind == "write":
            call.shard.resends += 1
            if call.shard.resends > FREE_RETRIES:
                return self._write_lost(call.shard, "writers keep dying")
            return self.work.to_write.appendleft(call.shard)
        unit = call.unit
        if why == STOPPED:  # kbatch stopped it (draining): nobody's fault
            return self._requeue(call)
        if why == NODE:
            unit.node_losses += 1
            if unit.node_losses <= NODE_LOSSES:
                return self._requeue(call)
            return self._retry(call.kind, unit, f"{call.kind} worker died: lost with its node "
                                                  f"{unit.node_losses} times", crash=True)
        # a crash on a live node: only the batches it was running are suspects
        from kbatch.models.actors import running_batches

        running = running_batches(r.slot)
        if unit.token not in running and unit.free_retries < FREE_RETRIES:
            unit.free_retries += 1
            return self._requeue(call)
        if len(running) > 1 and not unit.solo:  # lanes: several suspects, each reruns alone, free
            unit.solo = True
            return self._requeue(call, front=False)
        self._retry(call.kind, unit, f"{call.kind} worker died: its process exited ({r.cause})", crash=True)

    def _requeue(self, call: Call, front: bool = True) -> None:
        w, unit = self.work, call.unit
        if call.kind == "prior":
            (w.loaded.appendleft if front else w.loaded.append)(unit)
        elif call.kind == "decoder":
            (w.decoder_q.appendleft if front else w.decoder_q.append)(unit)
        elif call.kind == "write":
            w.to_write.appendleft(call.shard)

    def _inputs_lost(self, call: Call, e) -> None:
        """An object a call needed died with a node: the rows start over, free. (Task outputs, the decoded
        input images, are rebuilt by Ray itself; actor outputs, embeddings and images, are not.)"""
        log.warning("kbatch: a %s call lost an input that died with a node (%s); its rows are made again",
                    call.kind, short(e))
        w = self.work
        if call.kind == "write":
            shard = call.shard
            # one shard, one commit: abort its name before any of its rows is made again elsewhere (an attempt
            # may still be running, or have committed it: then its rows are done)
            from kbatch.run.shards import settle_lost_write

            try:
                done = settle_lost_write(w.spec, shard.name)
            except Exception as e:  # noqa: BLE001 - cannot tell: its rows stay missing, a rerun makes them
                return self._write_lost(shard, f"could not settle its lost write: {type(e).__name__}: {e}")
            if done is not None:
                return self._done_write(call, done)
            self.nodes.refresh(force=True)
            dead = [x for x in shard.entries if self.nodes.is_dead(x.node)] or list(shard.entries)
            shard.entries = [x for x in shard.entries if x not in dead]
            for x in dead:
                w.restart_rows(x.rows, x.extra)
            if shard.entries or shard.errors:
                w.to_write.appendleft(w.buffer.rename(shard))  # the rest under a new name
        elif call.kind == "decoder":  # past the prior: back before it
            w.restart_rows(call.unit.rows, call.unit.extra)
        else:  # still before the prior: load again
            unit = call.unit
            unit.inputs = []
            w.planned.appendleft(unit)

    def _raised(self, call: Call, message: str, crash: bool) -> None:
        if call.kind == "write":
            return self._write_lost(call.shard, message)
        if call.kind in ("ready", "probe"):  # ready() itself cannot raise; an in-driver stand-in might
            call.pool.start_failed(call.replica, message)
            return
        if call.kind == "load":  # the loading task itself broke (not a bad image): fail its rows
            for r in call.unit.rows:
                self.fail(r, message, before_decoder=True)
            return
        if call.pool is not None:
            call.pool.on_success()  # the worker is fine; the batch raised
        self._retry(call.kind, call.unit, message, crash=crash)

    def _write_lost(self, shard: Shard, message: str) -> None:
        log.error("kbatch: shard %s write failed (%s); its %d rows stay missing, rerun to retry",
                  shard.name, message, shard.rows)
        self.write_failures.append(f"{shard.name}: {message}"[:300])

    def _retry(self, kind: str, unit: Unit, message: str, crash: bool) -> None:
        """Split a failing batch to find the guilty row; bound the attempts of a row that kills workers."""
        queue = self.work.loaded if kind == "prior" else self.work.decoder_q
        if len(unit.rows) == 1:
            if crash and unit.attempts + 1 < self.cfg.retries.max_attempts:
                unit.attempts += 1
                queue.append(unit)
                return
            tries = f" after {unit.attempts + 1} attempts" if crash else ""
            return self.fail(unit.rows[0], f"{message}{tries}", before_decoder=kind == "prior")
        if crash and unit.attempts == 0:  # a worker dying once costs a retry of the batch, not a row
            unit.attempts = 1
            queue.append(unit)
            return
        half = len(unit.rows) // 2
        for part in (unit.rows[:half], unit.rows[half:]):
            ids = {r.id for r in part}
            sub = Unit(part, unit.attempts, unit.inputs, unit.priors, {k: v for k, v in unit.extra.items() if k in ids})
            queue.append(sub)

    def fail(self, row: Row, message: str, before_decoder: bool = False) -> None:
        if before_decoder:
            self.work.past_prior(row)
        self.fail_record(error_record(base_record(row, self.template), message))

    def fail_record(self, rec: dict) -> None:
        self.failed_by_reason[reason(rec["error"])] += 1
        self.work.buffer.add(error=rec)
