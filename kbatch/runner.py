"""The driver: plan, dispatch, retry, commit. See docs/architecture.md for the picture.

Flow per row: validated in the driver -> (CPU task: decode its input images) -> prior actor -> decoder
actor -> (CPU task: encode + write a shard). The driver holds only small things (rows, embeddings, status);
images travel from decoder actors to writer tasks through the object store.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from .config import ConfigError, JobConfig, check_storage, writer_count
from .jobstate import JOB_FILE, SUCCESS_FILE, check_resume, fingerprint, meaning, new_run_id, now_iso, versions
from .progress import Progress
from .schema import Row, input_ref

log = logging.getLogger("kbatch")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_INCOMPLETE = 0, 1, 2, 3
FREE_RETRIES = 8  # resubmissions of a batch whose worker another batch killed (or that never started)
FLUSH_SECONDS = 60  # a shard is written at rows_per_shard rows or after this long, whichever comes first


@dataclass
class RunResult:
    output: str
    run_id: str
    exit_code: int
    complete: bool
    rows_total: int
    rows_skipped: int  # had records before this run (resume)
    rows_ok: int
    rows_failed: int
    rows_missing: int
    images: int
    seconds: float
    images_per_second: float
    stage_seconds: dict = field(default_factory=dict)
    failed_by_reason: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)  # per stage: peak worker RSS, peak GPU memory (GiB)

    def summary_line(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.failed_by_reason.items()))
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items())
        return (f"kbatch: {'complete' if self.complete else 'INCOMPLETE'} | rows {self.rows_total} "
                f"(ok {self.rows_ok}, failed {self.rows_failed}, missing {self.rows_missing}, "
                f"skipped {self.rows_skipped}) | images {self.images} | {self.images_per_second:.2f} img/s | "
                f"{self.seconds:.1f}s | stages: {stages}" + (f" | failures: {reasons}" if reasons else ""))


@dataclass
class Unit:
    rows: list[Row]
    attempts: int = 0
    inputs: list = field(default_factory=list)  # ObjectRefs of {id: inputs} maps
    priors: list = field(default_factory=list)  # PriorOutputs (decoder units)
    free_retries: int = 0  # resubmissions after a worker death that another batch caused
    token: str = ""  # names this submission; the actor notes it in Ray's KV store when it starts it
    solo: bool = False  # its worker died while it ran beside other batches (lanes): rerun it alone
    weight: int = 1  # load it puts on its actor while in flight (a solo unit fills the actor)


def _images(rows) -> int:
    return sum(r.num_images for r in rows)


def chunk(rows: list[Row], key, max_images: int) -> list[list[Row]]:
    """Consecutive runs of rows with equal ``key(row)``, each at most ``max_images`` images (>= 1 row)."""
    out: list[list[Row]] = []
    cur: list[Row] = []
    for r in rows:
        if cur and (key(cur[0]) != key(r) or _images(cur) + r.num_images > max_images):
            out.append(cur)
            cur = []
        cur.append(r)
    if cur:
        out.append(cur)
    return out


def sort_rows(rows: list[Row]) -> list[Row]:
    """Group rows that can share forward passes: decoder key first (the expensive stage), then prior key."""
    return sorted(rows, key=lambda r: (repr(r.decoder_key()), repr(r.prior_key())))


def base_record(row: Row, cfg: JobConfig, run_id: str) -> dict:
    m = cfg.models
    return {
        "id": row.id, "mode": row.mode, "prompt": row.prompt, "negative_prompt": row.negative_prompt,
        "seed": row.seed, "num_images": row.num_images, "height": row.height, "width": row.width,
        "num_inference_steps": row.num_inference_steps, "guidance_scale": row.guidance_scale,
        "prior_num_inference_steps": row.prior_num_inference_steps,
        "prior_guidance_scale": row.prior_guidance_scale, "strength": row.strength,
        "init_image": input_ref(row.init_image), "mask": input_ref(row.mask),
        "mix": json.dumps([{k: (input_ref(v) if k == "image" else v) for k, v in dataclasses.asdict(it).items()
                            if v is not None} for it in row.mix]) if row.mix else None,
        "scheduler": m.scheduler, "prior_scheduler": m.prior_scheduler, "dtype": m.dtype,
        "model_prior": m.prior, "model_decoder": m.inpaint if row.mode == "inpaint" else m.decoder,
        "row_hash": row.row_hash, "run_id": run_id,
    }


def error_record(base: dict, message: str) -> dict:
    return {**base, "image_index": -1, "status": "error", "error": message}


def _reason(message: str) -> str:
    return message.split(":", 1)[0] if ":" in message else message


class Runner:
    """One run of a job on the connected Ray cluster."""

    def __init__(self, cfg: JobConfig, *, overwrite: bool = False, progress: str | None = None, table=None):
        self.cfg = cfg
        self.table = table  # an in-memory manifest (kbatch.render of a DataFrame); URIs resolve from cwd
        self.overwrite = overwrite
        self.progress_mode = progress or cfg.progress
        self.run_id = new_run_id()
        from .storage import absolute_local

        self.output = absolute_local(cfg.resolved_output())  # writers may run in another directory
        if self.output != cfg.resolved_output() and "_ray_pkg_" in self.output:
            log.warning("kbatch: output %r is relative and this job runs in Ray's temporary copy of its working "
                        "dir, so the images would land in %s and be deleted with it; use an absolute path, "
                        "a shared filesystem or object storage", cfg.resolved_output(), self.output)
        self.so = dict(cfg.storage_options) or None  # fsspec options (endpoint, credentials): config only

    # ------------------------------------------------------------------------------------------ planning
    def plan(self):
        """Read + validate the manifest and the output's state. Loads no model. Raises ConfigError."""
        from . import storage
        from .manifest import read_manifest
        from .validate import validate_indexed
        from .writer import read_records

        cfg = self.cfg
        check_storage(cfg)
        self.stored_priors = {}
        if self.table is not None:
            table, base_uri = self.table, os.getcwd()
        elif not cfg.manifest:
            raise ConfigError("config key 'manifest' must be set (config or --manifest), got None")
        elif cfg.stage == "decoder":
            table, base_uri = self._embeddings_manifest()
        else:
            table, base_uri = read_manifest(cfg.manifest, self.so)
        self.base_uri = base_uri
        indexed, row_errors = validate_indexed(table, cfg, base_uri)
        rows = [r for _, r in indexed]
        if cfg.stage == "decoder":
            for r in rows:
                if r.id in self.interpolated:
                    r.mode = "interpolate"
                    r.row_hash = r.fingerprint()
        self.raw = {}
        if cfg.stage == "prior":
            from .embeddings import cells

            names = [n for n in table.column_names if n in ("height", "width", "num_inference_steps",
                                                             "guidance_scale", "strength")]
            sub = table.select(names).to_pylist() if names else [{}] * table.num_rows
            self.raw = {r.id: cells(r, sub[i]) for i, r in indexed}
        self.total = len(rows) + len(row_errors)
        if self.overwrite:
            storage.remove_tree(self.output, self.so)
        previous = storage.read_json(self.output, JOB_FILE, self.so)
        done = read_records(self.output, columns=["id", "row_hash", "status"], storage_options=self.so)
        done_hashes = dict(zip(done["id"], done["row_hash"])) if len(done) else {}
        check_resume(previous, cfg, done_hashes, rows)
        self.skipped = len(set(done_hashes))
        self.previous_failed = int(done[done["status"] == "error"]["id"].nunique()) if len(done) else 0
        self.rows = [r for r in rows if r.id not in done_hashes]
        raw = table.to_pylist() if row_errors else []
        self.invalid = []
        for e in row_errors:
            if e.id in done_hashes:
                continue
            src = raw[e.index] if e.index < len(raw) else {}
            base = {"id": e.id, "mode": _str(src.get("mode")), "prompt": _str(src.get("prompt")),
                    "negative_prompt": _str(src.get("negative_prompt")), "run_id": self.run_id,
                    "row_hash": None}
            self.invalid.append(error_record(base, e.message))
        self.previous = previous
        return self

    def _embeddings_manifest(self):
        """stage: decoder reads the embeddings a stage: prior job wrote (its manifest's base for URIs)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from . import storage
        from .embeddings import read_embeddings

        table, self.stored_priors = read_embeddings(self.cfg.manifest, self.so)
        prior_job = storage.read_json(self.cfg.manifest, JOB_FILE, self.so) or {}
        mode = table.column("mode")
        self.interpolated = set(table.filter(pc.equal(mode, "interpolate")).column("id").to_pylist())
        # interpolate rows decode like text2img (their mix was used up by the prior)
        table = table.set_column(table.schema.get_field_index("mode"), "mode",
                                 pc.if_else(pc.equal(mode, "interpolate"), pa.scalar("text2img"), mode))
        return table, prior_job.get("manifest_base") or self.cfg.manifest

    # ------------------------------------------------------------------------------------------ running
    def run(self) -> RunResult:
        import ray

        from . import storage
        from .writer import OutputSpec

        cfg = self.cfg
        t_start = time.perf_counter()
        storage.remove(self.output, SUCCESS_FILE, self.so)
        job = {"output": self.output, "run_id": self.run_id, "status": "running", "started": now_iso(),
               "fingerprint": fingerprint(cfg), "meaning": meaning(cfg), "config": cfg.public_dict(),
               "manifest": cfg.manifest, "manifest_base": self.base_uri, "total_rows": self.total, "versions": versions(),
               "models": {"prior": cfg.models.prior, "decoder": cfg.models.decoder, "inpaint": cfg.models.inpaint},
               "runs": (self.previous or {}).get("runs", []) + [self.run_id]}
        storage.write_json_atomic(self.output, JOB_FILE, job, self.so)
        self.spec = OutputSpec(root=self.output, format="embeddings" if cfg.stage == "prior" else cfg.output.format,
                               image_format=cfg.output.image_format, quality=cfg.output.quality,
                               storage_options=self.so)
        self.stats = defaultdict(float)
        self.memory: dict[str, float] = {}  # peak RSS / GPU memory per stage (GiB)
        self.failed_by_reason: dict[str, int] = defaultdict(int)
        self.rows_ok = self.rows_failed = self.images = 0
        self.progress = Progress(self.total, initial=self.skipped, mode=self.progress_mode)
        interrupted = False
        previous = _sigterm_interrupts()
        try:
            if self.rows or self.invalid:
                self._loop(ray)
        except KeyboardInterrupt:
            interrupted = True
            log.warning("kbatch: interrupted; committed shards are kept, rerun to finish")
        finally:
            self.progress.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        missing = self.total - self.skipped - self.rows_ok - self.rows_failed
        unseen = [] if interrupted else self._unseen_shards()
        complete = missing == 0 and not interrupted and not unseen
        seconds = time.perf_counter() - t_start
        failed_total = self.rows_failed + self.previous_failed
        tolerance = max(cfg.retries.max_failed_rows, int(cfg.retries.max_failed_fraction * self.total))
        code = EXIT_INCOMPLETE if not complete else (EXIT_FAILED if failed_total > tolerance else EXIT_OK)
        result = RunResult(self.output, self.run_id, code, complete, self.total, self.skipped, self.rows_ok,
                           self.rows_failed, missing, self.images, seconds,
                           self.images / seconds if seconds else 0.0, dict(self.stats), dict(self.failed_by_reason),
                           dict(self.memory))
        job.update(status="complete" if complete else ("interrupted" if interrupted else "incomplete"),
                   finished=now_iso(), result=dataclasses.asdict(result),
                   worker_start_errors=getattr(self, "failed_starts", {}), unseen_shards=unseen)
        storage.write_json_atomic(self.output, JOB_FILE, job, self.so)
        if complete:
            if cfg.output.gallery and cfg.stage != "prior":
                try:
                    from .gallery import write_gallery

                    write_gallery(self.output, max_images=cfg.output.gallery_max_images, storage_options=self.so)
                except Exception as e:  # the gallery is a convenience, never a reason to fail a run
                    log.warning("kbatch: gallery not written: %s", e)
            storage.write_json_atomic(self.output, SUCCESS_FILE, {"run_id": self.run_id, "finished": now_iso(),
                                                                  "rows": self.total}, self.so)
        return result

    def _unseen_shards(self) -> list[str]:
        """Shards this run's writers committed that the driver cannot list: written to a local path on
        another node (or any storage the driver does not share). Such a run is not complete."""
        if not getattr(self, "committed", None):
            return []
        from .writer import list_committed_shards

        try:
            visible = set(list_committed_shards(self.output, self.so))
        except Exception as e:  # a storage hiccup at the very end must not throw the finished run away
            log.warning("kbatch: could not list %s to check the shards of this run: %s: %s", self.output,
                        type(e).__name__, e)
            return []
        unseen = sorted(set(self.committed) - visible)
        if unseen:
            log.error("kbatch: %d of the %d shards written by this run are not visible from the driver at %s "
                      "(first: %s): written on another node's local disk? Use object storage (s3://, gs://) or a "
                      "shared filesystem. The run is incomplete.", len(unseen), len(self.committed), self.output,
                      unseen[0])
        return unseen

    # the dispatch loop ---------------------------------------------------------------------------------
    def _loop(self, ray):
        rows = sort_rows(self.rows)
        self._start_actors(ray, rows)
        try:
            self._init_queues(rows)
            while True:
                self._dispatch()
                if not self.inflight:
                    if self.shard_rows:
                        self._flush()
                        continue
                    break
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=5.0)
                for ref in ready:
                    self._complete(ray, ref)
                if self.shard_rows and time.monotonic() - self.shard_started > FLUSH_SECONDS:
                    self._flush()
        finally:  # also on Ctrl-C / SIGTERM: never leave actors holding GPUs on a long-lived cluster
            for a in {id(a): a for a in self.priors + self.decoders + self.writers}.values():
                if isinstance(a, ray.actor.ActorHandle):  # not the DriverWriter of a memory:// output
                    ray.kill(a)

    def _start_actors(self, ray, rows):
        from . import storage
        from .workers import DriverWriter, InDriver, load_inputs, loader_task, remote_classes

        cfg, res = self.cfg, self.cfg.resources
        cluster = ray.cluster_resources()
        gpus_in_cluster = cluster.get("GPU", 0)
        if res.device == "cuda" and not gpus_in_cluster:
            raise ConfigError("config key 'resources.device' is 'cuda' but the Ray cluster has no GPU")
        in_driver = storage.process_local(self.output)  # memory://: the driver writes it, no writer actors
        _warn_if_cpus_short(cfg, cluster.get("CPU", 0), 0 if in_driver else None)
        prior_gpus = res.prior.gpus if gpus_in_cluster else 0
        decoder_gpus = res.decoder.gpus if gpus_in_cluster else 0
        # memory:// lives in this process: its shards are written here, its input images read here. A local
        # path is this node's (or a shared mount): writers and the loading of local input files prefer the
        # driver's node, and a multi-node cluster gets a warning
        here = _driver_node(ray)
        local_out = storage.node_local(self.output)
        if local_out and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
            log.warning("kbatch: output %s is a local path on a cluster of several nodes: writers prefer this "
                        "node, but any that run elsewhere write to that node's disk unless the path is a shared "
                        "mount; use object storage (s3://, gs://) or a shared filesystem", self.output)
        PriorA, DecoderA, self.loader, WriterA = remote_classes(cfg, prior_gpus, decoder_gpus,
                                                                here if local_out else None)
        need_inpaint = any(r.mode == "inpaint" for r in rows)
        run_prior = bool(rows) and cfg.stage != "decoder"
        run_decoder = bool(rows) and cfg.stage != "prior"
        shapes = sorted({r.unet_shape() for r in rows})  # compiled before the first batch (models.compile)
        wcfg = _worker_config(cfg)
        self.decoders = ([DecoderA.remote(wcfg, need_inpaint, shapes) for _ in range(res.decoder.replicas)]
                         if run_decoder else [])
        if PriorA is None:  # resources.colocate: the decoder actors run the prior too
            self.priors, self.prior_method = list(self.decoders), "run_prior"
        else:
            self.priors = [PriorA.remote(wcfg) for _ in range(res.prior.replicas)] if run_prior else []
            self.prior_method = "run"
        self.writers = ([DriverWriter()] if in_driver else
                        [WriterA.remote() for _ in range(writer_count(res))])
        self.local_loader = InDriver(load_inputs, num_returns=2)
        self.here_loader = loader_task(cfg, here)
        self.committed: list[str] = []  # shards this run committed (checked from the driver at the end)
        self.crashes: dict = defaultdict(int)
        self.deaths: set = set()  # (actor, batches it was running) of deaths with several suspects
        self.failed_starts: dict[str, str] = {}  # stage -> why a worker could not start
        self.load = {a: 0 for a in self.priors + self.decoders + self.writers}
        # batches in flight per actor: one running per lane plus max_in_flight - 1 queued behind them
        lanes = {a: res.prior.concurrency for a in self.priors}
        lanes.update({a: res.decoder.concurrency for a in self.decoders})  # colocated: the decoder's lanes
        self.limit = {a: res.max_in_flight + n - 1 for a, n in lanes.items()}
        self.slot = {a: f"{self.run_id}/{kind}/{i}" for kind, pool in (("prior", self.priors), ("decoder", self.decoders))
                     for i, a in enumerate(pool)}  # KV key where each actor notes the batch it runs

    def _init_queues(self, rows):
        cfg, res = self.cfg, self.cfg.resources
        self.inflight: dict = {}  # ref -> (kind, unit, actor, extra)
        self.seq = 0
        self.shard_ok: list = []  # (rows, decoder payload ref)
        self.shard_prior: list = []  # stage prior: (row, PriorOutput) waiting for an embeddings shard
        self.shard_err: list[dict] = []
        self.shard_rows = 0
        self.shard_started = time.monotonic()
        self.shard_seq = 0
        self.load_q: deque[Unit] = deque()
        self.prior_q: deque[Unit] = deque()
        self.decoder_q: deque[Unit] = deque()
        self.waiting: dict[tuple, list] = defaultdict(list)  # decoder key -> [(row, prior_out, inputs refs)]
        self.before_decoder = defaultdict(int)  # decoder key -> rows not yet through the prior
        for r in rows:
            self.before_decoder[r.decoder_key()] += 1
        if cfg.stage != "decoder":
            self.load_q.extend(Unit(c) for c in chunk(rows, Row.prior_key, res.prior.batch_size))
        else:  # the prior ran in an earlier job: rows with input images load them first
            self.load_q.extend(Unit(c) for c in chunk(rows, Row.decoder_key, res.decoder.batch_size)
                               if any(_needs_inputs(r) for r in c))
            loading = {r.id for u in self.load_q for r in u.rows}
            self._prior_done([r for r in rows if r.id not in loading], [], stored=True)
        for rec in self.invalid:
            self._fail_record(rec)

    def _free(self, pool, queue: deque):
        """The least loaded live actor that can take the head of ``queue`` now, or None."""
        live = [a for a in pool if self.crashes[a] <= self.cfg.retries.max_actor_restarts]
        if queue[0].solo:  # only an idle actor, and it takes nothing else until this unit is back
            live = [a for a in live if self.load[a] == 0]
        else:
            live = [a for a in live if self.load[a] < self.limit[a]]
        return min(live, key=lambda a: self.load[a]) if live else None

    def _dispatch(self):
        cfg = self.cfg
        while self.load_q:  # input decoding runs ahead on CPU tasks
            unit = self.load_q.popleft()
            needy = [r for r in unit.rows if _needs_inputs(r)]
            if needy:
                loader = (self.local_loader if any(_local_inputs(r) for r in needy) else
                          self.here_loader if any(_node_inputs(r) for r in needy) else self.loader)
                err_ref, inputs_ref = loader.remote(needy, cfg.limits, self.so)
                unit.inputs = [inputs_ref]
                self.inflight[err_ref] = ("load", unit, None, None)
            else:
                self.prior_q.append(unit)
        # decoder work first: where the stages share actors (resources.colocate) the prior fills the gaps,
        # so embeddings don't pile up ahead of the decoder
        self._form_decoder_batches()
        while self.decoder_q and (actor := self._free(self.decoders, self.decoder_q)):
            unit = self.decoder_q.popleft()
            status_ref, payload_ref = actor.run.remote(self.slot[actor], self._token(unit), unit.rows, unit.priors,
                                                       *unit.inputs)
            self._track(status_ref, "decoder", unit, actor, payload_ref)
        while self.prior_q and (actor := self._free(self.priors, self.prior_q)):
            unit = self.prior_q.popleft()
            ref = getattr(actor, self.prior_method).remote(self.slot[actor], self._token(unit), unit.rows,
                                                           *unit.inputs)
            self._track(ref, "prior", unit, actor)

    def _token(self, unit: Unit) -> str:
        self.seq += 1
        unit.token = f"{self.run_id}#{self.seq}"
        return unit.token

    def _track(self, ref, kind, unit, actor, extra=None):
        self.inflight[ref] = (kind, unit, actor, extra)
        if unit is not None:
            unit.weight = self.limit.get(actor, 1) if unit.solo else 1
        self.load[actor] += unit.weight if unit is not None else 1

    def _form_decoder_batches(self):
        limit = self.cfg.resources.decoder.batch_size
        for key, items in list(self.waiting.items()):
            while items and (_images([i[0] for i in items]) >= limit or self.before_decoder[key] == 0):
                take = chunk([i[0] for i in items], Row.decoder_key, limit)[0]
                batch, items[:] = items[:len(take)], items[len(take):]
                unit = Unit([b[0] for b in batch])
                unit.priors = [b[1] for b in batch]
                unit.inputs = list({id(ref): ref for b in batch for ref in b[2]}.values())
                self.decoder_q.append(unit)
            if not items:
                del self.waiting[key]

    def _complete(self, ray, ref):
        kind, unit, actor, extra = self.inflight.pop(ref)
        if actor is not None:
            self.load[actor] -= unit.weight if unit is not None else 1
        try:
            value = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            if kind == "write":
                return self._retry(kind, unit, f"writer died: {type(e).__name__}", crash=True)
            # Only the batch the actor was running when it died is charged an attempt; batches queued
            # behind it are resubmitted free (bounded, in case the actor cannot even start). Batches that
            # ran beside others (lanes) are suspects, not culprits: each reruns alone, free, first.
            from .workers import running_batches

            if getattr(e, "actor_init_failed", False):  # cannot even load its models: no row is to blame
                self.crashes[actor] = self.cfg.retries.max_actor_restarts + 1
                log.error("kbatch: a %s worker failed to start: %s", kind, _short(e))
                self.failed_starts[kind] = _short(e)
                return (self.prior_q if kind == "prior" else self.decoder_q).appendleft(unit)
            running = running_batches(self.slot[actor])
            queue = self.prior_q if kind == "prior" else self.decoder_q
            if unit.token not in running and unit.free_retries < FREE_RETRIES:
                unit.free_retries += 1
                return queue.appendleft(unit)
            if len(running) > 1 and not unit.solo:
                if (actor, frozenset(running)) not in self.deaths:  # count each death once
                    self.deaths.add((actor, frozenset(running)))
                    self.crashes[actor] += 1
                    log.warning("kbatch: a %s worker died running %d batches at once; each reruns alone",
                                kind, len(running))
                unit.solo = True
                return queue.append(unit)
            self.crashes[actor] += 1
            return self._retry(kind, unit, f"{kind} worker died: {type(e).__name__}", crash=True)
        except ray.exceptions.RayTaskError as e:
            return self._retry(kind, unit, f"{kind} failed: {_short(e)}", crash=False)
        except ray.exceptions.RayError as e:  # object lost, worker crashed in a task, ...
            return self._retry(kind, unit, f"{kind} failed: {type(e).__name__}", crash=True)
        from .workers import Raised

        if isinstance(value, Raised):  # a call run here in the driver (memory:// storage) raised
            return self._retry(kind, unit, f"{kind} failed: {value.message[:500]}", crash=False)
        if kind == "load":
            errors = value
            for r in unit.rows:
                if r.id in errors:
                    self._fail(r, errors[r.id], before_decoder=True)
            unit.rows = [r for r in unit.rows if r.id not in errors]
            if unit.rows and self.cfg.stage == "decoder":
                self._prior_done(unit.rows, unit.inputs, stored=True)
            elif unit.rows:
                self.prior_q.append(unit)
        elif kind == "prior":
            outputs, seconds, memory = value
            self.stats["prior_seconds"] += seconds
            self._peak("prior", memory)
            self._prior_done(unit.rows, unit.inputs, outputs)
        elif kind == "decoder":
            seconds, memory, warmup = value
            self.stats["decoder_seconds"] += seconds
            if warmup:  # models.compile: the UNet compiled per shape before the first batch
                self.stats["decoder_warmup_seconds"] += warmup
            self._peak("decoder", memory)
            self.shard_ok.append((unit.rows, extra))
            self.shard_rows += len(unit.rows)
            if self.shard_rows >= self.cfg.output.rows_per_shard:
                self._flush()
        elif kind == "write":
            rows_ok, rows_err, n_images = extra
            self.rows_ok += rows_ok
            self.rows_failed += rows_err
            self.images += n_images
            self.stats["write_seconds"] += getattr(value, "seconds", 0.0)
            self.committed.append(value.shard)
            self.progress.update(rows_ok + rows_err, self.images)

    def _peak(self, stage: str, memory: dict):
        for k, v in memory.items():
            key = f"{stage}_peak_{k}"
            self.memory[key] = round(max(self.memory.get(key, 0.0), v), 3)

    def _prior_done(self, rows, inputs, outputs=None, stored=False):
        if stored:
            outputs = [self.stored_priors[r.id] for r in rows]
        if self.cfg.stage == "prior":
            self.shard_prior += list(zip(rows, outputs))
            self.shard_rows += len(rows)
            if self.shard_rows >= self.cfg.output.rows_per_shard:
                self._flush()
            return
        for r, out in zip(rows, outputs):
            self.before_decoder[r.decoder_key()] -= 1
            self.waiting[r.decoder_key()].append((r, out, inputs))

    def _retry(self, kind, unit: Unit, message: str, crash: bool):
        """Split a failing batch to find the guilty row; bound the attempts of a row that kills workers."""
        if kind == "write":
            log.error("kbatch: shard write failed (%s); its rows stay missing, rerun to retry", message)
            return
        if kind == "load":  # the loader task itself broke (not a bad image): fail its rows
            for r in unit.rows:
                self._fail(r, message, before_decoder=True)
            return
        queue = self.prior_q if kind == "prior" else self.decoder_q
        alive = [a for a in (self.priors if kind == "prior" else self.decoders)
                 if self.crashes[a] <= self.cfg.retries.max_actor_restarts]
        if not alive:
            log.error("kbatch: every %s worker is dead; %d rows stay missing", kind, len(unit.rows))
            return
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
            sub = Unit(part, unit.attempts, unit.inputs, [p for p in unit.priors if p.id in ids])
            queue.append(sub)

    def _fail(self, row: Row, message: str, before_decoder: bool = False):
        if before_decoder:
            self.before_decoder[row.decoder_key()] -= 1
        self._fail_record(error_record(base_record(row, self.cfg, self.run_id), message))

    def _fail_record(self, rec: dict):
        self.failed_by_reason[_reason(rec["error"])] += 1
        self.shard_err.append(rec)
        self.shard_rows += 1

    def _bases(self, rows: list[Row]) -> dict[str, dict]:
        """Metadata records of rows, made when their shard is written (not held for the whole job)."""
        return {r.id: base_record(r, self.cfg, self.run_id) for r in rows}

    def _flush(self):
        if not self.shard_rows:
            return
        shard = f"{self.run_id}-{self.shard_seq:05d}"
        fail = self.cfg.faults.fail_write_shard
        spec = dataclasses.replace(self.spec, fail_after_data=fail is not None and fail == self.shard_seq)
        self.shard_seq += 1
        writer = min(self.writers, key=lambda a: self.load[a])
        if self.cfg.stage == "prior":
            ok_rows = [r for r, _ in self.shard_prior]
            ref = writer.write_embeddings.remote(spec, shard, self._bases(ok_rows),
                                                 {r.id: self.raw[r.id] for r in ok_rows},
                                                 [o for _, o in self.shard_prior], self.shard_err)
        else:
            ok_rows = [r for rows, _ in self.shard_ok for r in rows]
            bases = self._bases(ok_rows)
            ref = writer.write.remote(spec, shard, bases, self.shard_err, *[p for _, p in self.shard_ok])
        self._track(ref, "write", None, writer, (len(ok_rows), len(self.shard_err), _images(ok_rows)))
        self.shard_ok, self.shard_err, self.shard_prior, self.shard_rows = [], [], [], 0
        self.shard_started = time.monotonic()


def _warn_if_cpus_short(cfg: JobConfig, cluster_cpus: float, writers: int | None = None):
    """The actors hold their CPU shares for the whole run; input loading needs one io share on top. More
    than the cluster has and Ray waits for resources that never come (unless an autoscaler adds nodes)."""
    r = cfg.resources
    prior = 0 if cfg.colocated or cfg.stage == "decoder" else r.prior.replicas * r.prior.cpus
    decoder = 0 if cfg.stage == "prior" else r.decoder.replicas * r.decoder.cpus
    io = ((writer_count(r) if writers is None else writers) + 1) * r.io_cpus
    if prior + decoder + io > cluster_cpus + 1e-9:
        log.warning("kbatch: the job asks for %.2f CPUs (resources.prior %.2f + resources.decoder %.2f + "
                    "(resources.writers + 1) x resources.io_cpus %.2f) but the cluster has %.2f: it waits "
                    "until an autoscaler adds nodes", prior + decoder + io, prior, decoder, io, cluster_cpus)


def _sigterm_interrupts():
    """Schedulers stop jobs with SIGTERM: end like Ctrl-C (committed shards kept, exit 3). Installed at the
    start of a run, after ray.init (whose own handler it replaces for the run's duration)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _worker_config(cfg: JobConfig) -> JobConfig:
    """The config the model actors get: model folders that exist here, and the fault-injection file, as
    absolute paths (actors run in the directory Ray started in). The job's own config, its fingerprint and
    the model names in the records keep what the user wrote."""
    from .storage import absolute_if_exists, absolute_local

    m, f = cfg.models, cfg.faults
    folders = {k: absolute_if_exists(getattr(m, k)) for k in ("prior", "decoder", "inpaint")}
    faults = dataclasses.replace(f, crash_decoder_once_file=absolute_local(f.crash_decoder_once_file))
    return dataclasses.replace(cfg, models=dataclasses.replace(m, **folders), faults=faults)


def _driver_node(ray):
    """Soft affinity to the driver's node: preferred, elsewhere when that node has no room or no CPUs."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)


def _input_uris(r: Row) -> list:
    """The inputs a row reads by URI (bytes and None are skipped by the storage predicates)."""
    return [r.init_image, r.mask, *(it.image_uri for it in r.mix)]


def _node_inputs(r: Row) -> bool:
    """Whether a row reads an input file from a local path (the driver's node's, or a shared mount)."""
    from .storage import node_local

    return any(node_local(u) for u in _input_uris(r))


def _local_inputs(r: Row) -> bool:
    """Whether a row reads an input from process-local storage (memory://), which only the driver can see."""
    from .storage import process_local

    return any(process_local(u) for u in _input_uris(r))


def _needs_inputs(r: Row) -> bool:
    return (r.init_image is not None or r.mask is not None
            or any(it.image is not None or it.image_uri is not None for it in r.mix))


def _str(v):
    return v if isinstance(v, str) else None


def _short(e: Exception) -> str:
    cause = getattr(e, "cause", None)
    lines = str(e).strip().splitlines()
    text = f"{type(cause).__name__}: {cause}" if cause is not None else (lines[-1] if lines else type(e).__name__)
    return text[:500]


# ----------------------------------------------------------------------------------------------- entry


def ensure_ray(num_cpus: int | None = None):
    """Connect to RAY_ADDRESS if set, else start a local Ray. Returns True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def run_job(cfg: JobConfig, *, overwrite: bool = False, progress: str | None = None, table=None) -> RunResult:
    """Plan (no models), then render on the connected Ray, or a local one started (and stopped) here.
    ``table``: an in-memory manifest instead of ``cfg.manifest``."""
    runner = Runner(cfg, overwrite=overwrite, progress=progress, table=table).plan()
    if not runner.rows and not runner.invalid:  # nothing left (a rerun of a finished job): no Ray needed
        return runner.run()
    started = ensure_ray()
    try:
        return runner.run()
    finally:
        if started:
            stop_local_ray()


def stop_local_ray():
    """``ray.shutdown()`` of the local Ray this process started. Ray stops the autoscaler monitor after the
    GCS, and the monitor then spends its whole 1 s grace period failing to report to the dead GCS; a local
    one-node Ray has nothing to autoscale, so the monitor goes first (a private call: skipped if it moves)."""
    import ray

    try:
        node = ray._private.worker._global_node
        if node is not None and node.head:
            node.kill_monitor(check_alive=False)
    except Exception:  # pragma: no cover - Ray internals changed: fall back to the plain shutdown
        pass
    ray.shutdown()
