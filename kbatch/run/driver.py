"""The driver loop: windows of rows through input loading, the prior, the decoders and the writers.

It owns the queues between the stages and asks ``kbatch.run.bounds`` before it adds to any of them; the stage
pools (``kbatch.run.stage_pool``) own the actors. It holds rows and object refs, never images or embeddings: a prior
call returns (status, embeddings), and the driver passes the embeddings' ref to a decoder call and the
decoder's images' ref to a writer, fetching only the statuses. Many completions are handled per wait.

Faults (what each costs: docs/architecture.md):
* a batch that raises is split in halves until the guilty row is alone, which gets an error record;
* a call whose actor failed waits in the replica's *limbo* until the replica's fate is known (a ``ready()``
  probe, the node table): a node that died costs nothing (the batch is redone elsewhere); a process that
  died on a live node charges the batches it was running (``workers.Running``), and a row that keeps
  killing workers fails after ``retries.max_attempts``;
* an input that died with a node (an object lost from the object store) makes its rows start over, free.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from kbatch.run.bounds import Bounds
from kbatch.config import JobConfig
from kbatch.plan.planner import Planner, Window, chunk, images, sort_key
from kbatch.run.stage_pool import CRASH, NODE, STOPPED, NodeTable, Replica, StagePool
from kbatch.run.room_policy import Room
from kbatch.schema.rows import Row
from kbatch.schema.records import base_record, error_record, record_template
from kbatch.run.shards import Entry, Shard, ShardBuffer, write_call

log = logging.getLogger("kbatch")

FREE_RETRIES = 8  # resubmissions of a batch queued behind another batch's crash
NODE_LOSSES = 8  # node losses one batch may suffer before its next loss counts as a crash
TICK = 1.0  # seconds between housekeeping (node table, placement, scaling, progress)


class StageFailed(RuntimeError):
    """A stage cannot go on (cannot be placed, cannot start, keeps dying): the run ends incomplete."""


@dataclass(eq=False)
class Unit:
    """A batch of rows on its way through the stages."""

    rows: list[Row]
    attempts: int = 0  # charged tries (crashes of a single row)
    inputs: list = field(default_factory=list)  # refs of input maps (decoded images) from loading tasks
    priors: list = field(default_factory=list)  # refs of prior payloads (decoder batches)
    extra: dict = field(default_factory=dict)  # per row id: manifest cells (stage prior) / stored location
    free_retries: int = 0
    node_losses: int = 0
    token: str = ""  # names this submission; the actor notes it in Ray's KV store while it runs it
    solo: bool = False  # its worker died while it ran beside other batches (lanes): rerun it alone
    weight: int = 1  # load it puts on its replica while in flight (a solo unit fills the replica)

    @property
    def images(self) -> int:
        return images(self.rows)


class UnitQueue(deque):
    """A deque of units that keeps the count of their images (the bounds read it on every dispatch)."""

    def __init__(self):
        super().__init__()
        self.images = 0

    def append(self, unit: Unit) -> None:
        super().append(unit)
        self.images += unit.images

    def appendleft(self, unit: Unit) -> None:
        super().appendleft(unit)
        self.images += unit.images

    def popleft(self) -> Unit:
        unit = super().popleft()
        self.images -= unit.images
        return unit


@dataclass
class Call:
    kind: str  # ready | probe | load | prior | decoder | write
    unit: Unit | None = None
    replica: Replica | None = None
    pool: StagePool | None = None
    shard: Shard | None = None
    payload: object = None  # the payload ref of a prior/decoder call, the inputs ref of a load


def _needs_inputs(r: Row) -> bool:
    return (r.init_image is not None or r.mask is not None
            or any(it.image is not None or it.image_uri is not None for it in r.mix))


def _short(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    lines = str(e).strip().splitlines()
    text = f"{type(cause).__name__}: {cause}" if cause is not None else (lines[-1] if lines else type(e).__name__)
    return text[:500]


def _reason(message: str) -> str:
    return message.split(":", 1)[0] if ":" in message else message


class Driver:
    """One run's dispatch loop. ``stages``: the pools and tasks it drives (built by the runner)."""

    def __init__(self, ray, cfg: JobConfig, planner: Planner, run_id: str, *, spec, prior: StagePool | None,
                 decoder: StagePool | None, writers: StagePool, loaders, stored_priors=None, nodes: NodeTable,
                 describe_cluster, on_tick=None):
        self.ray, self.cfg, self.planner, self.run_id, self.spec = ray, cfg, planner, run_id, spec
        self.prior, self.decoder, self.writers = prior, decoder, writers
        self.loaders = loaders  # (default task, task pinned to the driver's node, in-driver stand-in)
        self.stored_priors = stored_priors  # stage decoder: the task reading stored embeddings
        self.nodes, self.describe_cluster, self.on_tick = nodes, describe_cluster, on_tick
        self.bounds = Bounds(cfg.resources)
        self.room = Room()  # a stage with no room takes it from the others (kbatch.run.room_policy)
        self.template = record_template(cfg, run_id)  # what every record of the run shares
        self.colocated = prior is not None and prior is decoder
        self.prior_method = "run_prior" if self.colocated else "run"
        # queues (each bounded: kbatch.run.bounds)
        self.planned: deque[Unit] = deque()  # windows' batches not yet loading or at the prior
        self.loaded: deque[Unit] = deque()  # inputs loaded (or none needed), waiting for the prior
        self.waiting: dict[tuple, deque] = defaultdict(deque)  # decoder key -> (row, prior ref, input refs, node)
        self.waiting_images: dict[tuple, int] = defaultdict(int)
        self.dirty: set[tuple] = set()  # decoder keys whose waiting rows changed
        self.decoder_q = UnitQueue()
        self.before_decoder: dict[tuple, int] = defaultdict(int)  # decoder key -> planned rows not past the prior
        self.before_prior = 0  # all planned rows not past the prior (the plan bound)
        self.buffer = ShardBuffer(run_id, cfg.output.rows_per_shard)
        self.to_write: deque[Shard] = deque()  # shards taken from the buffer (or resent) not yet at a writer
        self._due = False  # the buffer waited FLUSH_SECONDS: write it even if not full
        self.inflight: dict = {}  # ref -> Call
        self.kinds: dict[str, int] = defaultdict(int)  # calls in flight by kind
        self.counts = defaultdict(int)  # loading, prior_images, pending_writes
        self.seq = 0
        # results
        self.rows_ok = self.rows_failed = self.images = 0
        self.failed_by_reason: dict[str, int] = defaultdict(int)
        self.stats: dict[str, float] = defaultdict(float)
        self.memory: dict[str, float] = {}
        self.committed: set[int] = set()  # shard seqs committed by this run
        self.write_failures: list[str] = []
        self.start_errors: dict[str, str] = {}
        self.driver_gets = 0  # objects this driver fetched (statuses only)
        self.high: dict[str, int] = defaultdict(int)  # high-water marks of the bounded queues
        self.first_image_at: float | None = None  # seconds from the loop's start to the first decoder batch done
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
        self._t0 = time.monotonic()
        for pool in self._pools():
            for r in pool.scale():
                self._track_ready(pool, r)
        while True:
            now = time.monotonic()
            if now - self._tick_at >= TICK:
                self._tick_at = now
                self._tick(now)
            self._plan()
            self._dispatch()
            self._mark()
            if self._done():
                break
            refs = list(self.inflight)
            if not refs:  # nothing in flight and nothing placeable yet: wait for the cluster
                time.sleep(0.2)
                continue
            ready, _ = self.ray.wait(refs, num_returns=1, timeout=TICK)
            if ready and len(refs) > 1:
                ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                self._complete(ref)

    def _mark(self) -> None:
        """High-water marks of what the bounds limit (reported in _job.json; tests hold them to the bounds)."""
        h = self.high
        h["before_prior"] = max(h["before_prior"], self.before_prior)
        h["ahead_images"] = max(h["ahead_images"], self._ahead())
        h["loading"] = max(h["loading"], self.counts["loading"])
        h["pending_writes"] = max(h["pending_writes"], self.counts["pending_writes"])
        h["shard_buffer"] = max(h["shard_buffer"], self.buffer.rows)
        h["shards_waiting"] = max(h["shards_waiting"], len(self.to_write))

    def _pools(self) -> list[StagePool]:
        out = []
        for p in (self.prior, self.decoder, self.writers):
            if p is not None and p not in out:
                out.append(p)
        return out

    def _done(self) -> bool:
        busy = any(self.kinds[k] for k in ("load", "prior", "decoder", "write"))
        if busy or self.planned or self.loaded or self.decoder_q or self.to_write or not self.planner.exhausted:
            return False
        if any(self.waiting.values()):
            return False
        if self.buffer.rows:
            return False
        return True

    # ==================================================================================== housekeeping
    def _tick(self, now: float) -> None:
        from kbatch.models.actors import kv_get

        for node in self.nodes.refresh():
            self._node_lost(node)
        pools = self._pools()
        for pool in pools:
            for r in list(pool.all.values()):
                if r.state == "pending" and not r.placed:
                    node = kv_get(f"{r.slot}/placed")
                    if node:
                        pool.on_placed(r, node)
        self.room.step(now, pools, self._needs, self.nodes.room_for, self.nodes.capacity)
        for pool in pools:
            if self._needs(pool):
                pool.placement_check(now, self.cfg.resources.placement_timeout, lambda p=pool: self.describe_cluster(p),
                                     self.nodes.room_for)
            else:
                pool.unplaced_since = None
            for r in pool.scale(now, grow=self.room.grows(pool)):
                self._track_ready(pool, r)
            if pool.broken:
                raise StageFailed(pool.broken)
        if self.buffer.due(now):  # rows_per_shard, or FLUSH_SECONDS after its first row
            self._due = True
        if self.on_tick is not None:
            self.on_tick(self)

    def _needs(self, pool: StagePool) -> bool:
        """Whether ``pool`` still has work ahead (a stage with nothing left to do may be unplaceable)."""
        if pool is self.writers:
            return True
        if pool is self.decoder:
            return True
        return bool(self.planned or self.loaded or not self.planner.exhausted
                    or self.kinds["prior"] > 0)

    def _node_lost(self, node: str) -> None:
        log.warning("kbatch: node %s left the cluster; its work is redone elsewhere", node[:8])
        for pool in self._pools():
            for r in list(pool.all.values()):
                if r.node == node:
                    self._replica_dead(pool, r, NODE, "node lost")
        rows = self.buffer.drop_node(node)  # finished images that died with it: make them again
        if rows:
            self._restart_rows(rows)
        for key, dq in list(self.waiting.items()):  # embeddings that died with it
            lost = [w for w in dq if w[3] == node]
            if lost:
                self.waiting[key] = deque(w for w in dq if w[3] != node)
                self.waiting_images[key] -= images(w[0] for w in lost)
                self._restart_rows([w[0] for w in lost])

    # ========================================================================================= planning
    def _plan(self) -> None:
        while not self.planner.exhausted and self.bounds.plan(self.before_prior):
            w = self.planner.next_window()
            if w is None:
                break
            self._take_window(w)

    def _take_window(self, w: Window) -> None:
        for rec in w.errors:
            self._fail_record(rec)
        for rows in w.batches:
            unit = Unit(rows, extra={r.id: w.extra[r.id] for r in rows if r.id in w.extra})
            self._plan_unit(unit)

    def _plan_unit(self, unit: Unit, front: bool = False) -> None:
        for r in unit.rows:
            self.before_decoder[r.decoder_key()] += 1
        self.before_prior += len(unit.rows)
        (self.planned.appendleft if front else self.planned.append)(unit)

    def _past_prior(self, row: Row) -> None:
        key = row.decoder_key()
        self.before_decoder[key] -= 1
        self.before_prior -= 1
        self.dirty.add(key)

    def _restart_rows(self, rows: list[Row], extra: dict | None = None) -> None:
        """Rows past the prior whose results died with a node: from the prior again, free (their input
        images, made by tasks, are rebuilt by Ray from lineage if they were lost too)."""
        res = self.cfg.resources
        key, size = ((Row.decoder_key, res.decoder.batch_size) if self.cfg.stage == "decoder"
                     else (Row.prior_key, res.prior.batch_size))
        extra = extra or {}
        for part in chunk(sorted(rows, key=sort_key), key, size):
            self._plan_unit(Unit(part, extra={r.id: extra[r.id] for r in part if r.id in extra}), front=True)

    # ========================================================================================= dispatch
    def _dispatch(self) -> None:
        self._dispatch_loads()
        self._dispatch_writes()
        if self.decoder is not None:
            self._form_decoder_batches()
            while self.decoder_q and self._can_decode():
                r = self.decoder.pick(self.decoder_q[0].solo)
                if r is None:
                    break
                self._submit_decoder(r, self.decoder_q.popleft())
        while self.loaded:
            unit = self.loaded[0]
            if self.cfg.stage == "prior":  # no decoders: the writers bound the prior
                if not self._can_decode():
                    break
            elif not self.bounds.prior(self._ahead(), unit.images, self._n(self.decoder)):
                break
            if self.stored_priors is not None:  # stage decoder: the "prior" reads stored embeddings
                self.loaded.popleft()
                self._submit_stored(unit)
                continue
            r = self.prior.pick(unit.solo)
            if r is None:
                break
            self._submit_prior(r, self.loaded.popleft())

    def _n(self, pool: StagePool | None) -> int:
        return pool.n_running() if pool is not None else 0

    def _ahead(self) -> int:
        return self.counts["prior_images"] + sum(self.waiting_images.values()) + self.decoder_q.images

    def _can_decode(self) -> bool:
        return self.bounds.decode(self.counts["pending_writes"] + len(self.to_write), self._n(self.writers),
                                  self.buffer.rows, self.cfg.output.rows_per_shard)

    def _dispatch_loads(self) -> None:
        while self.planned:
            unit = self.planned[0]
            needy = [r for r in unit.rows if _needs_inputs(r)]
            if needy and not self.bounds.load(self.counts["loading"], len(self.loaded), self._n(self.prior)):
                break
            self.planned.popleft()
            if not needy or unit.inputs:
                self.loaded.append(unit)
                continue
            from kbatch.storage import node_local, process_local

            uris = [u for r in needy for u in (r.init_image, r.mask, *(it.image_uri for it in r.mix))]
            default, here, in_driver = self.loaders
            task = (in_driver if any(process_local(u) for u in uris) else
                    here if any(node_local(u) for u in uris) else default)
            err_ref, inputs_ref = task.remote(needy, self.cfg.limits, self.spec.storage_options)
            unit.inputs = [inputs_ref]
            self.counts["loading"] += 1
            self._track(err_ref, Call("load", unit, payload=inputs_ref))

    def _token(self, unit: Unit) -> str:
        self.seq += 1
        unit.token = f"{self.run_id}#{self.seq}"
        return unit.token

    def _submit(self, pool: StagePool, r: Replica, unit: Unit, kind: str, refs) -> None:
        status_ref, payload_ref = refs
        unit.weight = r.limit if unit.solo else 1
        pool.add_load(r, unit.weight)
        self._track(status_ref, Call(kind, unit, r, pool, payload=payload_ref))

    def _submit_prior(self, r: Replica, unit: Unit) -> None:
        refs = getattr(r.handle, self.prior_method).remote(self._token(unit), unit.rows, *unit.inputs)
        self.counts["prior_images"] += unit.images
        self._submit(self.prior, r, unit, "prior", refs)

    def _submit_stored(self, unit: Unit) -> None:
        locations = [unit.extra[r.id] for r in unit.rows]
        status_ref, payload_ref = self.stored_priors.remote(locations, self.spec.storage_options)
        self.counts["prior_images"] += unit.images
        self._track(status_ref, Call("prior", unit, payload=payload_ref))

    def _submit_decoder(self, r: Replica, unit: Unit) -> None:
        refs = r.handle.run.remote(self._token(unit), unit.rows, len(unit.priors), *unit.priors, *unit.inputs)
        self._submit(self.decoder, r, unit, "decoder", refs)

    def _form_decoder_batches(self) -> None:
        """Rows past the prior wait per decoder key until a full decoder batch is there, or no row of the key
        is still before the prior, or (deadlock breaker) the prior is held back by its bound while nothing
        is queued for the decoders."""
        limit = self.cfg.resources.decoder.batch_size
        starving = not self.decoder_q and bool(self.loaded) and not self.bounds.prior(
            self._ahead(), self.loaded[0].images, self._n(self.decoder))
        keys = list(self.dirty)
        if starving or self.planner.exhausted:
            keys = [k for k, dq in self.waiting.items() if dq]
        for key in keys:
            dq = self.waiting.get(key)
            while dq and (self.waiting_images[key] >= limit or self.before_decoder[key] == 0 or starving):
                take, n = [], 0
                while dq and (not take or n + dq[0][0].num_images <= limit):
                    w = dq.popleft()
                    take.append(w)
                    n += w[0].num_images
                self.waiting_images[key] -= n
                unit = Unit([w[0] for w in take])
                unit.priors = list({id(w[1]): w[1] for w in take}.values())
                unit.inputs = list({id(ref): ref for w in take for ref in w[2]}.values())
                self.decoder_q.append(unit)
                starving = False
            if not dq:
                self.waiting.pop(key, None)
                self.waiting_images.pop(key, None)
        self.dirty.clear()

    def _dispatch_writes(self) -> None:
        """Shards go to writers with room: those sent again first (their writer died), then the buffer, when
        it is full or nothing else can add to it. The buffer is the queue the decode bound watches: while
        the writers are full it grows to a shard, and the decoders pause."""
        buffer = self.buffer
        while self.bounds.write(self.counts["pending_writes"], self._n(self.writers)):
            if not self.to_write:
                if not (buffer.rows >= buffer.rows_per_shard or (buffer.rows and (self._drained() or self._due))):
                    return
                self.to_write.append(buffer.take())
                self._due = False
            r = self.writers.pick()
            if r is None:
                return
            self._submit_write(r, self.to_write.popleft())

    def _drained(self) -> bool:
        """Nothing else can add to the shard buffer: write what is there now."""
        return (self.planner.exhausted and not self.planned and not self.loaded and not self.decoder_q
                and not any(self.waiting.values())
                and not any(self.kinds[k] for k in ("load", "prior", "decoder")))

    def _submit_write(self, r: Replica, shard: Shard) -> None:
        ref = write_call(r.handle, shard, self.spec, self.cfg, self.template)
        self.writers.add_load(r, 1)
        self.counts["pending_writes"] += 1
        self._track(ref, Call("write", None, r, self.writers, shard=shard))

    def _track(self, ref, call: Call) -> None:
        self.inflight[ref] = call
        self.kinds[call.kind] += 1

    def _track_ready(self, pool: StagePool, r: Replica) -> None:
        self._track(r.handle.ready.remote(), Call("ready", None, r, pool))

    # ======================================================================================= completion
    def _complete(self, ref) -> None:
        ray = self.ray
        call = self.inflight.pop(ref)
        self.kinds[call.kind] -= 1
        self._release(call)
        try:
            value = ray.get(ref)
            self.driver_gets += 1
        except ray.exceptions.RayActorError as e:
            return self._actor_failed(call, e)
        except ray.exceptions.RayTaskError as e:
            if isinstance(getattr(e, "cause", None), ray.exceptions.ObjectLostError):
                return self._inputs_lost(call, e)
            return self._raised(call, f"{call.kind} failed: {_short(e)}", crash=False)
        except ray.exceptions.ObjectLostError as e:
            return self._inputs_lost(call, e)
        except ray.exceptions.RayError as e:  # a task's worker crashed (after Ray's own retries), ...
            return self._raised(call, f"{call.kind} failed: {type(e).__name__}", crash=True)
        from kbatch.models.actors import Raised

        if isinstance(value, Raised) or (isinstance(value, tuple) and value and isinstance(value[0], Raised)):
            msg = (value if isinstance(value, Raised) else value[0]).message
            return self._raised(call, f"{call.kind} failed: {msg[:500]}", crash=False)
        getattr(self, f"_done_{call.kind}")(call, value)

    def _release(self, call: Call) -> None:
        if call.kind in ("prior", "decoder") and call.replica is not None:
            call.pool.drop_load(call.replica, call.unit.weight)
        if call.kind == "prior":
            self.counts["prior_images"] -= call.unit.images
        elif call.kind == "load":
            self.counts["loading"] -= 1
        elif call.kind == "write":
            call.pool.drop_load(call.replica, 1)
            self.counts["pending_writes"] -= 1

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
        unit = call.unit
        for r in unit.rows:
            if r.id in errors:
                self._fail(r, errors[r.id], before_decoder=True)
        unit.rows = [r for r in unit.rows if r.id not in errors]
        if unit.rows:
            self.loaded.append(unit)

    def _done_prior(self, call: Call, status) -> None:
        unit = call.unit
        self.stats["prior_seconds"] += status.seconds
        self._peak("prior", status.memory)
        if call.pool is not None:
            call.pool.on_success()
        node = call.replica.node if call.replica is not None else None
        if self.cfg.stage == "prior":
            for r in unit.rows:
                self._past_prior(r)
            self.buffer.add(Entry(unit.rows, call.payload, node, unit.extra))
            return
        for r in unit.rows:
            self._past_prior(r)
            key = r.decoder_key()
            self.waiting[key].append((r, call.payload, tuple(unit.inputs), node))
            self.waiting_images[key] += r.num_images

    def _done_decoder(self, call: Call, status) -> None:
        if self.first_image_at is None:
            self.first_image_at = round(time.monotonic() - self._t0, 3)
        self.stats["decoder_seconds"] += status.seconds
        if status.warmup:
            self.stats["decoder_warmup_seconds"] += status.warmup
        self._peak("decoder", status.memory)
        call.pool.on_success()
        self.buffer.add(Entry(call.unit.rows, call.payload, call.replica.node))

    def _done_write(self, call: Call, stats) -> None:
        shard = call.shard
        self.rows_ok += shard.ok_rows
        self.rows_failed += len(shard.errors)
        self.images += shard.images
        self.stats["write_seconds"] += getattr(stats, "seconds", 0.0)
        self.committed.add(shard.seq)

    def _peak(self, stage: str, memory: dict) -> None:
        for k, v in memory.items():
            key = f"{stage}_peak_{k}"
            self.memory[key] = round(max(self.memory.get(key, 0.0), v), 3)

    # =========================================================================================== faults
    def _actor_failed(self, call: Call, e) -> None:
        ray = self.ray
        r, pool = call.replica, call.pool
        if call.kind == "ready" and getattr(e, "actor_init_failed", False):  # __init__ raised: no models
            log.error("kbatch: a %s worker failed to start: %s", pool.name, _short(e))
            self.start_errors[pool.name] = _short(e)
            pool.start_failed(r, _short(e))
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
        self._track(r.handle.ready.remote(), Call("probe", None, r, pool))

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
        self._replica_dead(pool, r, why, _short(e))

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
            return self.to_write.appendleft(call.shard)
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
        unit = call.unit
        if call.kind == "prior":
            (self.loaded.appendleft if front else self.loaded.append)(unit)
        elif call.kind == "decoder":
            (self.decoder_q.appendleft if front else self.decoder_q.append)(unit)
        elif call.kind == "write":
            self.to_write.appendleft(call.shard)

    def _inputs_lost(self, call: Call, e) -> None:
        """An object a call needed died with a node: the rows start over, free. (Task outputs, the decoded
        input images, are rebuilt by Ray itself; actor outputs, embeddings and images, are not.)"""
        log.warning("kbatch: a %s call lost an input that died with a node (%s); its rows are made again",
                    call.kind, _short(e))
        if call.kind == "write":
            shard = call.shard
            self.nodes.refresh(force=True)
            dead = [x for x in shard.entries if self.nodes.is_dead(x.node)] or list(shard.entries)
            shard.entries = [x for x in shard.entries if x not in dead]
            for x in dead:
                self._restart_rows(x.rows, x.extra)
            if shard.entries or shard.errors:
                self.to_write.appendleft(shard)
        elif call.kind == "decoder":  # past the prior: back before it
            self._restart_rows(call.unit.rows, call.unit.extra)
        else:  # still before the prior: load again
            unit = call.unit
            unit.inputs = []
            self.planned.appendleft(unit)

    def _raised(self, call: Call, message: str, crash: bool) -> None:
        if call.kind == "write":
            return self._write_lost(call.shard, message)
        if call.kind in ("ready", "probe"):  # ready() itself cannot raise; an in-driver stand-in might
            call.pool.start_failed(call.replica, message)
            return
        if call.kind == "load":  # the loading task itself broke (not a bad image): fail its rows
            for r in call.unit.rows:
                self._fail(r, message, before_decoder=True)
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
        queue = self.loaded if kind == "prior" else self.decoder_q
        if len(unit.rows) == 1:
            if crash and unit.attempts + 1 < self.cfg.retries.max_attempts:
                unit.attempts += 1
                queue.append(unit)
                return
            tries = f" after {unit.attempts + 1} attempts" if crash else ""
            return self._fail(unit.rows[0], f"{message}{tries}", before_decoder=kind == "prior")
        if crash and unit.attempts == 0:  # a worker dying once costs a retry of the batch, not a row
            unit.attempts = 1
            queue.append(unit)
            return
        half = len(unit.rows) // 2
        for part in (unit.rows[:half], unit.rows[half:]):
            ids = {r.id for r in part}
            sub = Unit(part, unit.attempts, unit.inputs, unit.priors, {k: v for k, v in unit.extra.items() if k in ids})
            queue.append(sub)

    def _fail(self, row: Row, message: str, before_decoder: bool = False) -> None:
        if before_decoder:
            self._past_prior(row)
        self._fail_record(error_record(base_record(row, self.template), message))

    def _fail_record(self, rec: dict) -> None:
        self.failed_by_reason[_reason(rec["error"])] += 1
        self.buffer.add(error=rec)

    # ========================================================================================== summary
    def queues(self) -> dict:
        """Queue depths per stage (rows, or shards for the writers), for progress reports."""
        return {"planned": sum(len(u.rows) for u in self.planned), "loading": self.counts["loading"],
                "prior": sum(len(u.rows) for u in self.loaded) + sum(
                    len(c.unit.rows) for c in self.inflight.values() if c.kind == "prior"),
                "waiting_for_decoder": sum(len(d) for d in self.waiting.values()) + sum(len(u.rows) for u in self.decoder_q),
                "decoder": sum(len(c.unit.rows) for c in self.inflight.values() if c.kind == "decoder"),
                "shard_buffer": self.buffer.rows, "writes": self.counts["pending_writes"] + len(self.to_write),
                "replicas": {p.name: {"running": p.n_running(), "pending": len(p.pending())} for p in self._pools()}}

    def replica_counts(self) -> dict:
        """Per stage: replicas started, lost with their nodes, and drained (above the target, or stopped to
        make room for a starved stage: kbatch.run.room_policy)."""
        return {p.name: {"started": p.started, "lost_to_nodes": p.lost_to_nodes, "drained": p.drained}
                for p in self._pools()}

    def stop(self) -> None:
        for pool in self._pools():
            pool.stop()

