"""Dispatch: what goes where, under the bounds.

It owns the queues between the stages (rows planned, inputs loaded, rows past the prior waiting per decoder
key, decoder batches, the shard buffer, shards to write) and the calls in flight, and asks
``kbatch.run.bounds`` before it adds to any of them. It makes batches and sends them to running replicas; it
never decides what a result means (``kbatch.run.outcomes`` does, and puts units back through ``plan_unit``,
``restart_rows`` and the queues).
"""
from __future__ import annotations

from collections import defaultdict, deque

from kbatch.config import JobConfig
from kbatch.plan.planner import Planner, Window, chunk, images, sort_key
from kbatch.run.bounds import Bounds
from kbatch.run.shards import Shard, ShardBuffer, write_call
from kbatch.run.stage_pool import Replica, StagePool
from kbatch.run.work import Call, Unit, UnitQueue, needs_inputs
from kbatch.schema.rows import Row


class Dispatch:
    """The queues of one run and the rules that move units along them."""

    def __init__(self, cfg: JobConfig, run_id: str, planner: Planner, *, spec, template: dict,
                 prior: StagePool | None, decoder: StagePool | None, writers: StagePool, loaders,
                 stored_priors=None):
        self.cfg, self.run_id, self.planner, self.spec, self.template = cfg, run_id, planner, spec, template
        self.prior, self.decoder, self.writers = prior, decoder, writers
        self.loaders = loaders  # (default task, task pinned to the driver's node, in-driver stand-in)
        self.stored_priors = stored_priors  # stage decoder: the task reading stored embeddings
        self.bounds = Bounds(cfg.resources)
        colocated = prior is not None and prior is decoder
        self.prior_method = "run_prior" if colocated else "run"
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
        self.due = False  # the buffer waited FLUSH_SECONDS: write it even if not full
        self.inflight: dict = {}  # ref -> Call
        self.kinds: dict[str, int] = defaultdict(int)  # calls in flight by kind
        self.counts = defaultdict(int)  # loading, prior_images, pending_writes
        self.seq = 0
        self.high: dict[str, int] = defaultdict(int)  # high-water marks of the bounded queues

    # ==================================================================================== taking rows in
    def wants_window(self) -> bool:
        return self.bounds.plan(self.before_prior)

    def take_batches(self, w: Window) -> None:
        for rows in w.batches:
            self.plan_unit(Unit(rows, extra={r.id: w.extra[r.id] for r in rows if r.id in w.extra}))

    def plan_unit(self, unit: Unit, front: bool = False) -> None:
        for r in unit.rows:
            self.before_decoder[r.decoder_key()] += 1
        self.before_prior += len(unit.rows)
        (self.planned.appendleft if front else self.planned.append)(unit)

    def past_prior(self, row: Row) -> None:
        key = row.decoder_key()
        self.before_decoder[key] -= 1
        self.before_prior -= 1
        self.dirty.add(key)

    def restart_rows(self, rows: list[Row], extra: dict | None = None) -> None:
        """Rows past the prior whose results died with a node: from the prior again, free (their input
        images, made by tasks, are rebuilt by Ray from lineage if they were lost too)."""
        res = self.cfg.resources
        key, size = ((Row.decoder_key, res.decoder.batch_size) if self.cfg.stage == "decoder"
                     else (Row.prior_key, res.prior.batch_size))
        extra = extra or {}
        for part in chunk(sorted(rows, key=sort_key), key, size):
            self.plan_unit(Unit(part, extra={r.id: extra[r.id] for r in part if r.id in extra}), front=True)

    # ========================================================================================= dispatch
    def dispatch(self) -> None:
        self._dispatch_loads()
        self._dispatch_writes()
        if self.decoder is not None:
            self._form_decoder_batches()
            while self.decoder_q and self.can_decode():
                r = self.decoder.pick(self.decoder_q[0].solo)
                if r is None:
                    break
                self._submit_decoder(r, self.decoder_q.popleft())
        while self.loaded:
            unit = self.loaded[0]
            if self.cfg.stage == "prior":  # no decoders: the writers bound the prior
                if not self.can_decode():
                    break
            elif not self.bounds.prior(self.ahead(), unit.images, self.n(self.decoder), self.n(self.prior)):
                break
            if self.stored_priors is not None:  # stage decoder: the "prior" reads stored embeddings
                self.loaded.popleft()
                self._submit_stored(unit)
                continue
            r = self.prior.pick(unit.solo)
            if r is None:
                break
            self._submit_prior(r, self.loaded.popleft())

    @staticmethod
    def n(pool: StagePool | None) -> int:
        return pool.n_running() if pool is not None else 0

    def ahead(self) -> int:
        """Images past the prior (in flight, waiting, queued) not yet at a decoder."""
        return self.counts["prior_images"] + sum(self.waiting_images.values()) + self.decoder_q.images

    def can_decode(self) -> bool:
        return self.bounds.decode(self.counts["pending_writes"] + len(self.to_write), self.n(self.writers),
                                  self.buffer.rows, self.cfg.output.rows_per_shard)

    def _dispatch_loads(self) -> None:
        while self.planned:
            unit = self.planned[0]
            needy = [r for r in unit.rows if needs_inputs(r)]
            if needy and not self.bounds.load(self.counts["loading"], len(self.loaded), self.n(self.prior)):
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
            self.track(err_ref, Call("load", unit, payload=inputs_ref))

    def _token(self, unit: Unit) -> str:
        self.seq += 1
        unit.token = f"{self.run_id}#{self.seq}"
        return unit.token

    def _submit(self, pool: StagePool, r: Replica, unit: Unit, kind: str, refs) -> None:
        status_ref, payload_ref = refs
        unit.weight = r.limit if unit.solo else 1
        pool.add_load(r, unit.weight)
        self.track(status_ref, Call(kind, unit, r, pool, payload=payload_ref))

    def _submit_prior(self, r: Replica, unit: Unit) -> None:
        refs = getattr(r.handle, self.prior_method).remote(self._token(unit), unit.rows, *unit.inputs)
        self.counts["prior_images"] += unit.images
        self._submit(self.prior, r, unit, "prior", refs)

    def _submit_stored(self, unit: Unit) -> None:
        locations = [unit.extra[r.id] for r in unit.rows]
        status_ref, payload_ref = self.stored_priors.remote(locations, self.spec.storage_options)
        self.counts["prior_images"] += unit.images
        self.track(status_ref, Call("prior", unit, payload=payload_ref))

    def _submit_decoder(self, r: Replica, unit: Unit) -> None:
        refs = r.handle.run.remote(self._token(unit), unit.rows, len(unit.priors), *unit.priors, *unit.inputs)
        self._submit(self.decoder, r, unit, "decoder", refs)

    def _form_decoder_batches(self) -> None:
        """Rows past the prior wait per decoder key until a full decoder batch is there, or no row of the key
        is still before the prior, or (deadlock breaker) the prior is held back by its bound while nothing
        is queued for the decoders."""
        limit = self.cfg.resources.decoder.batch_size
        starving = not self.decoder_q and bool(self.loaded) and not self.bounds.prior(
            self.ahead(), self.loaded[0].images, self.n(self.decoder), self.n(self.prior))
        keys = list(self.dirty)
        if starving or self.planner_exhausted:
            keys = [k for k, dq in self.waiting.items() if dq]
        for key in keys:
            dq = self.waiting.get(key)
            while dq and (self.waiting_images[key] >= limit or self.before_decoder[key] == 0 or starving):
                take, n = [], 0
                while dq and (not take or n + dq[0][0].renders <= limit):  # renders: best_of candidates too
                    w = dq.popleft()
                    take.append(w)
                    n += w[0].renders
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
        while self.bounds.write(self.counts["pending_writes"], self.n(self.writers)):
            if not self.to_write:
                if not (buffer.rows >= buffer.rows_per_shard or (buffer.rows and (self.drained() or self.due))):
                    return
                self.to_write.append(buffer.take())
                self.due = False
            r = self.writers.pick()
            if r is None:
                return
            self._submit_write(r, self.to_write.popleft())

    def drained(self) -> bool:
        """Nothing else can add to the shard buffer: write what is there now."""
        return (self.planner_exhausted and not self.planned and not self.loaded and not self.decoder_q
                and not any(self.waiting.values())
                and not any(self.kinds[k] for k in ("load", "prior", "decoder")))

    def _submit_write(self, r: Replica, shard: Shard) -> None:
        ref = write_call(r.handle, shard, self.spec, self.cfg, self.template)
        self.writers.add_load(r, 1)
        self.counts["pending_writes"] += 1
        self.track(ref, Call("write", None, r, self.writers, shard=shard))

    # ========================================================================================= in flight
    def track(self, ref, call: Call) -> None:
        self.inflight[ref] = call
        self.kinds[call.kind] += 1

    def track_ready(self, pool: StagePool, r: Replica) -> None:
        self.track(r.handle.ready.remote(), Call("ready", None, r, pool))

    def untrack(self, ref) -> Call:
        """A call came back: it no longer counts as in flight, and its replica's load and its bound drop."""
        call = self.inflight.pop(ref)
        self.kinds[call.kind] -= 1
        if call.kind in ("prior", "decoder") and call.replica is not None:
            call.pool.drop_load(call.replica, call.unit.weight)
        if call.kind == "prior":
            self.counts["prior_images"] -= call.unit.images
        elif call.kind == "load":
            self.counts["loading"] -= 1
        elif call.kind == "write":
            call.pool.drop_load(call.replica, 1)
            self.counts["pending_writes"] -= 1
        return call

    # ============================================================================================ state
    @property
    def planner_exhausted(self) -> bool:
        return self.planner.exhausted

    def idle(self) -> bool:
        """Nothing queued at any stage and nothing in flight (the planner may still have windows)."""
        busy = any(self.kinds[k] for k in ("load", "prior", "decoder", "write"))
        return not (busy or self.planned or self.loaded or self.decoder_q or self.to_write
                    or any(self.waiting.values()) or self.buffer.rows)

    def mark(self) -> None:
        """High-water marks of what the bounds limit (reported in _job.json; tests hold them to the bounds)."""
        h = self.high
        h["before_prior"] = max(h["before_prior"], self.before_prior)
        h["ahead_images"] = max(h["ahead_images"], self.ahead())
        h["loading"] = max(h["loading"], self.counts["loading"])
        h["pending_writes"] = max(h["pending_writes"], self.counts["pending_writes"])
        h["shard_buffer"] = max(h["shard_buffer"], self.buffer.rows)
        h["shards_waiting"] = max(h["shards_waiting"], len(self.to_write))

    def queues(self) -> dict:
        """Queue depths per stage (rows, or shards for the writers), for progress reports."""
        return {"planned": sum(len(u.rows) for u in self.planned), "loading": self.counts["loading"],
                "prior": sum(len(u.rows) for u in self.loaded) + sum(
                    len(c.unit.rows) for c in self.inflight.values() if c.kind == "prior"),
                "waiting_for_decoder": sum(len(d) for d in self.waiting.values()) + sum(
                    len(u.rows) for u in self.decoder_q),
                "decoder": sum(len(c.unit.rows) for c in self.inflight.values() if c.kind == "decoder"),
                "shard_buffer": self.buffer.rows, "writes": self.counts["pending_writes"] + len(self.to_write)}

    def waiting_lost_with(self, node: str) -> list[Row]:
        """Rows whose embeddings wait in ``node``'s object store, which died: taken out of the waiting lists."""
        out = []
        for key, dq in list(self.waiting.items()):
            lost = [w for w in dq if w[3] == node]
            if lost:
                self.waiting[key] = deque(w for w in dq if w[3] != node)
                self.waiting_images[key] -= images(w[0] for w in lost)
                out.extend(w[0] for w in lost)
        return out
