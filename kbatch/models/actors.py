"""Ray wrappers around the pure stage classes: model actors, writer actors, and the CPU tasks that load inputs.

Nothing here holds logic worth testing on its own: the predictors (``prior.py``, ``decoder.py``, ``sim.py``),
the input checks (``images.py``) and the writer (``writer.py``) are plain Python, tested without a cluster.

Every stage call returns two objects: a small status for the driver, and the payload (embeddings, images)
that the next stage receives as an object ref. The driver only ever ``ray.get``s the status.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import ray

from kbatch.config import SIM, JobConfig
from kbatch.models.ray_metrics import observe_batch
from kbatch.schema.payloads import DecoderOutput, PriorOutput
from kbatch.schema.rows import Row
from kbatch.schema.records import base_record, record_key

KV_NAMESPACE = "kbatch"


def _kv_put(key: str, value: str):
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, value, overwrite=True, namespace=KV_NAMESPACE)


def kv_get(key: str) -> str | None:
    from ray.experimental.internal_kv import _internal_kv_get

    v = _internal_kv_get(key, namespace=KV_NAMESPACE)
    return v.decode() if v else None


def kv_del_prefix(prefix: str):
    from ray.experimental.internal_kv import _internal_kv_del

    try:
        _internal_kv_del(prefix, del_by_prefix=True, namespace=KV_NAMESPACE)
    except Exception:  # noqa: BLE001 - best effort cleanup at the end of a run
        pass


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def note_placed(slot: str | None):
    """First thing an actor does: tell the driver which node it was placed on (``<slot>/placed``), so that a
    replica still loading its models is not mistaken for one the cluster cannot place."""
    if slot:
        _kv_put(f"{slot}/placed", _node_id())


class Running:
    """Notes in Ray's KV store which batches this actor is running, so that when the process dies the
    driver can tell the batches that may have killed it from those queued behind them. With lanes
    (``concurrency`` > 1) several run at once; the driver then reruns each suspect alone."""

    def __init__(self, slot: str | None = None):
        self.slot = slot
        self.tokens: list[str] = []
        self.lock = threading.Lock()

    @contextmanager
    def batch(self, token: str | None):
        if not (self.slot and token):
            yield
            return
        with self.lock:
            self.tokens.append(token)
            _kv_put(self.slot, " ".join(self.tokens))
        try:
            yield
        finally:
            with self.lock:
                self.tokens.remove(token)
                _kv_put(self.slot, " ".join(self.tokens))


def running_batches(slot: str) -> set[str]:
    """The tokens of the batches an actor was running (see ``Running``)."""
    v = kv_get(slot)
    return set(v.split()) if v else set()


def _merge(input_maps) -> dict:
    out: dict = {}
    for m in input_maps:
        out.update(m or {})
    return out


def _memory() -> dict:
    """Peak host RSS of this worker process and, where torch runs CUDA, peak GPU memory allocated (GiB)."""
    import resource

    out = {"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    torch = sys.modules.get("torch")  # never imported for it: simulated models run without torch
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _threads(cfg: JobConfig, stage: str) -> int:
    """Torch threads per lane: ``threads``, or the stage's CPU share split over its lanes."""
    s = getattr(cfg.resources, stage)
    return s.threads or max(1, round(s.cpus / s.concurrency))


@dataclass
class Status:
    """What the driver receives from a stage call: no embeddings, no images."""

    seconds: float
    memory: dict
    warmup: float = 0.0  # decoder: compile warm-up seconds spent before this batch (models.compile)
    warmup_by_shape: dict | None = None  # decoder: of those, the seconds of each shape's first compiled call


class PriorWorker:
    def __init__(self, cfg: JobConfig, slot: str | None = None, stage: str = "prior", running: Running | None = None):
        """``stage``: whose threads and concurrency to use ("decoder" when colocated in a StagesWorker)."""
        if running is None:
            note_placed(slot)
        m = cfg.models
        self.running = running or Running(slot)
        if cfg.faults.fail_start == "prior":
            raise RuntimeError("faults.fail_start: prior (a drill: this prior cannot load its models)")
        if m.prior == SIM:
            from kbatch.models.sim import SimPrior

            self.predictor = SimPrior(m.sim.prior_seconds_per_image, m.sim.load_seconds)
        else:
            from kbatch.models.prior import PriorPredictor  # torch and diffusers: only in the actor process

            self.predictor = PriorPredictor(m.prior, device=cfg.resources.device, dtype=m.dtype,
                                            scheduler=m.prior_scheduler, offload=m.offload,
                                            threads=_threads(cfg, stage), revision=m.revision,
                                            concurrency=getattr(cfg.resources, stage).concurrency,
                                            storage_options=dict(cfg.storage_options) or None,
                                            cache_dir=m.cache_dir, clip_text=cfg.quality.scores)

    def ready(self) -> dict:
        return {"worker": self.predictor.worker, "node": _node_id()}

    @ray.method(num_returns=2)
    def run(self, token: str, rows: list[Row], *input_maps):
        with self.running.batch(token):
            t0 = time.perf_counter()
            inputs = _merge(input_maps)
            out = self.predictor(rows, [inputs.get(r.id) for r in rows])
            seconds = time.perf_counter() - t0
            observe_batch(self.running.slot, "prior", seconds)  # metrics: kbatch_batch_seconds
            return Status(seconds, _memory()), out


def maybe_crash(faults, rows: list[Row] = (), once_file: str | None = None):
    """Fault injection for tests and drills (config ``faults``): the process exits mid-batch."""
    if faults.crash_on_prompt is not None and any(r.prompt == faults.crash_on_prompt for r in rows):
        os._exit(1)
    once_file = once_file if once_file is not None else faults.crash_decoder_once_file
    if once_file and not os.path.exists(once_file):
        with open(once_file, "w") as fh:
            fh.write("crashed\n")
        os._exit(1)


class DecoderWorker:
    def __init__(self, cfg: JobConfig, slot: str | None = None, need_inpaint: bool = False, shapes=()):
        """``shapes``: the job's ``Row.unet_shape()`` buckets, compiled up front when ``models.compile``."""
        note_placed(slot)
        m = cfg.models
        self.faults = cfg.faults
        self.running = Running(slot)
        self.warmup = 0.0  # seconds, reported with the first batch
        self.warmup_by_shape: dict | None = None  # {"base 512x512 cfg": seconds}, with the first batch too
        if cfg.faults.fail_start == "decoder":
            raise RuntimeError("faults.fail_start: decoder (a drill: this decoder cannot load its models)")
        if m.decoder == SIM:
            from kbatch.models.sim import SimDecoder

            self.predictor = SimDecoder(m.sim.decoder_seconds_per_image, m.sim.load_seconds, _quality(cfg))
            return
        from kbatch.models.decoder import DecoderPredictor  # torch and diffusers: only in the actor
        from kbatch.models.loading import compiles

        self.predictor = DecoderPredictor(
            m.decoder, m.inpaint if need_inpaint else None, device=cfg.resources.device, dtype=m.dtype,
            scheduler=m.scheduler, offload=m.offload, threads=_threads(cfg, "decoder"),
            channels_last=m.channels_last, compile=m.compile, revision=m.revision,
            concurrency=cfg.resources.decoder.concurrency, storage_options=dict(cfg.storage_options) or None,
            cache_dir=m.cache_dir)
        if compiles(self.predictor.place, m.compile):  # one batch size per shape, every shape compiled now
            self.predictor.pad_to = cfg.resources.decoder.batch_size
            self.warmup = self.predictor.warmup(shapes)
            self.warmup_by_shape = dict(self.predictor.warmup_by_shape)
        self.predictor.quality = _quality(cfg)
        if cfg.quality.embeds and not self.COLOCATED:  # the prior folder's image encoder, loaded now
            from kbatch.models.scoring import ClipScorer
            from kbatch.models.store import stage_model

            path = stage_model(m.prior, dict(cfg.storage_options) or None, m.cache_dir, m.revision)
            self.predictor.scorer = ClipScorer(path=path, device=self.predictor.place.device,
                                               image_format=cfg.output.image_format, quality=cfg.output.quality)
            _check_head_widths(self.predictor.quality, self.predictor.scorer)

    COLOCATED = False  # StagesWorker: the scorer uses the prior's own modules

    def ready(self) -> dict:
        return {"worker": self.predictor.worker, "node": _node_id()}

    @ray.method(num_returns=2)
    def run(self, token: str, rows: list[Row], n_priors: int, *payloads):
        """``payloads``: ``n_priors`` prior payloads (lists of PriorOutput, resolved by Ray from the refs the
        driver passed), then input maps. Returns (Status for the driver, images for the writer)."""
        with self.running.batch(token):
            maybe_crash(self.faults, rows)
            t0 = time.perf_counter()
            priors = {p.id: p for payload in payloads[:n_priors] for p in payload}
            inputs = _merge(payloads[n_priors:])
            out = self.predictor(rows, [priors[r.id] for r in rows], [inputs.get(r.id) for r in rows])
            for o, r in zip(out, rows):  # the writer makes each record from its row
                o.row = r
            with self.running.lock:  # lanes: report it once
                warmup, self.warmup = self.warmup, 0.0
                by_shape, self.warmup_by_shape = self.warmup_by_shape, None
            seconds = time.perf_counter() - t0
            observe_batch(self.running.slot, "decoder", seconds)  # metrics: kbatch_batch_seconds
            return Status(seconds, _memory(), warmup, by_shape), out


def _quality(cfg: JobConfig):
    """What the decoder measures (``scoring.QualitySpec``): heads are read from their paths here, in the actor."""
    from kbatch.models.scoring import QualitySpec

    return QualitySpec.from_config(cfg, dict(cfg.storage_options) or None)


def _check_head_widths(quality, scorer) -> None:
    """The encoder loads now; a head that does not fit its projection fails the start (checked at plan time
    too, where the encoder's config could be read)."""
    enc, _ = scorer.vision()
    dim = int(enc.config.projection_dim)
    for name, h in quality.heads.items():
        if h.in_dim != dim:
            raise ValueError(f"quality.heads.{name}: the head {h.path!r} takes {h.in_dim}-wide embeddings, the "
                             f"prior's image encoder gives {dim}-wide ones")


class StagesWorker(DecoderWorker):
    """``resources.colocate``: the prior and the decoder models in one process, one per decoder replica.

    Saves a model-loading process per replica (on a small CPU machine, importing torch + diffusers costs
    more than the prior's whole share of a short job) and a second CUDA context on a small GPU. Both
    stages run with the decoder's resources, torch threads and lanes (prior and decoder batches share the
    actor's ``decoder.concurrency`` threads).
    """

    COLOCATED = True

    def __init__(self, cfg: JobConfig, slot: str | None = None, need_inpaint: bool = False, shapes=()):
        super().__init__(cfg, slot, need_inpaint, shapes)
        self.prior = PriorWorker(cfg, stage="decoder", running=self.running)
        if cfg.quality.embeds and cfg.models.decoder != SIM:  # the prior's image encoder, in this process
            from kbatch.models.scoring import ClipScorer

            prior = self.prior.predictor
            self.predictor.scorer = ClipScorer(pipe=prior.pipe, path=prior.scorer.path if prior.scorer else None,
                                               device=self.predictor.place.device,
                                               image_format=cfg.output.image_format, quality=cfg.output.quality)
            _check_head_widths(self.predictor.quality, self.predictor.scorer)

    @ray.method(num_returns=2)
    def run_prior(self, token: str, rows: list[Row], *input_maps):
        return self.prior.run(token, rows, *input_maps)


class WriterWorker:
    """Encodes and commits shards. Long-lived, so a shard write doesn't start (and import into) a fresh
    worker process; several writers (``resources.writers``) write shards in parallel."""

    def __init__(self, slot: str | None = None, faults=None):
        note_placed(slot)
        self.faults = faults
        self.slot = slot  # names the run in the batch-seconds metric

    def ready(self) -> dict:
        return {"worker": f"node:{_node_id()[:8]}/pid:{os.getpid()}", "node": _node_id()}

    @ray.method(max_task_retries=2, retry_exceptions=[OSError])
    def write(self, spec, shard: str, template: dict, error_records: list[dict], *payloads):
        if self.faults is not None and self.faults.crash_writer_once_file:
            maybe_crash(self.faults, once_file=self.faults.crash_writer_once_file)
        t0 = time.perf_counter()
        out = write_shard(_as_writer(spec), shard, template, error_records, *payloads)
        observe_batch(self.slot, "writer", time.perf_counter() - t0)  # metrics: kbatch_batch_seconds
        return out

    @ray.method(max_task_retries=2, retry_exceptions=[OSError])
    def write_embeddings(self, spec, shard: str, bases: dict, row_cells: dict, error_records, *payloads):
        return write_embeddings(_as_writer(spec), shard, bases, row_cells, error_records, *payloads)


def _as_writer(spec):
    """``spec`` stamped with this process as the writer (recorded in each shard's stats)."""
    import dataclasses

    node = _node_id()[:8]
    return dataclasses.replace(spec, writer=f"node:{node}/pid:{os.getpid()}")


def load_inputs(rows: list[Row], limits, storage_options=None) -> tuple[dict[str, str], dict[str, dict]]:
    """CPU task: decode init images / masks / mix images. Returns (errors by id, inputs by id); the rows that
    would take this task over ``limits.max_batch_pixels`` are listed under ``errors[LATER]`` for another task
    (the first row always fits: a row's own budget is at most the batch's)."""
    from kbatch.plan.input_images import LATER, BatchFull, PixelBudget, load_row_inputs

    errors, inputs, later = {}, {}, []
    batch = PixelBudget(limits.max_batch_pixels, "limits.max_batch_pixels", row=False)
    for r in rows:
        used = batch.used
        try:
            inputs[r.id] = load_row_inputs(r, limits, storage_options, batch=batch)
        except BatchFull:
            batch.used = used  # what it had decoded is dropped with it
            later.append(r.id)
        except ValueError as e:
            batch.used = used
            errors[r.id] = str(e)
    if later:
        errors[LATER] = later
    return errors, inputs


def read_stored_priors(locations: list[tuple[str, int, str]], storage_options=None):
    """CPU task (``stage: decoder``): the prior outputs of rows from an embeddings output, read by the
    task itself; ``locations``: (embeddings file URI, row index in the file, id). Returns (Status, payload)
    like a prior actor's call."""
    from kbatch.output.embeddings import read_prior_outputs

    t0 = time.perf_counter()
    out = read_prior_outputs(locations, storage_options)
    return Status(time.perf_counter() - t0, {}), out


def write_shard(spec, shard: str, template: dict, error_records: list[dict], *payloads):
    """Flatten decoder outputs into one record per image, encode and commit one shard. ``template``: what
    every record of the run shares (``schema.record_template``); each row's part comes with its images."""
    from kbatch.models.scoring import filtered_fields, record_fields
    from kbatch.output.writer import write_shard as _write

    records, images = [], []
    for payload in payloads:
        for out in payload:  # DecoderOutput
            base = base_record(out.row, template)
            where = {"prior_worker": out.prior_worker, "decoder_worker": out.decoder_worker,
                     "seconds": out.seconds, "dtype": out.dtype or base.get("dtype")}
            for i, img in enumerate(out.images):
                rec = {**base, "image_index": i, "status": "ok", "error": None, **where, **record_fields(out, i)}
                rec["key"] = record_key(out.id, rec["image_index"])
                records.append(rec)
                images.append(img)
            for f in filtered_fields(out):  # quality.gate: image indices no candidate of passed
                records.append({**base, **where, **f, "key": record_key(out.id, f["image_index"])})
                images.append(None)
    for rec in error_records:
        records.append(rec)
        images.append(None)
    return _write(spec, shard, records, images)


def write_embeddings(spec, shard: str, bases: dict, row_cells: dict, error_records: list[dict], *payloads):
    """Stage prior: the prior outputs of a shard's rows as ``embeddings/<shard>.parquet`` + metadata."""
    from kbatch.output.embeddings import write_embeddings_shard

    outputs = [p for payload in payloads for p in payload if p.id in bases]
    return write_embeddings_shard(spec, shard, bases, row_cells, outputs, error_records)


@dataclass
class Raised:
    """The error of a call that ran in the driver (``InDriver``): what its ref holds instead of a result."""

    message: str


class InDriver:
    """Stands in for a Ray task (or an actor's method) and runs the function in this process: the work on
    process-local storage (``storage.process_local``: fsspec ``memory://``), which another process would
    read or write in its own, different memory filesystem. ``.remote(*args)`` resolves ObjectRef arguments,
    calls the function, and returns refs to its result(s), or to ``Raised`` when it raised."""

    def __init__(self, fn, num_returns: int = 1):
        self.fn, self.num_returns = fn, num_returns

    def remote(self, *args):
        args = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
        try:
            out = self.fn(*args)
        except Exception as e:  # delivered through the ref, like a task error
            out = (Raised(f"{type(e).__name__}: {e}"),) * self.num_returns if self.num_returns > 1 else \
                Raised(f"{type(e).__name__}: {e}")
        return ray.put(out) if self.num_returns == 1 else tuple(ray.put(o) for o in out)


class DriverWriter:
    """The writer of a process-local output: a ``WriterWorker`` handle's interface, run in the driver."""

    def __init__(self):
        self.write = InDriver(lambda spec, *rest: write_shard(_as_writer(spec), *rest))
        self.write_embeddings = InDriver(lambda spec, *rest: write_embeddings(_as_writer(spec), *rest))
        self.ready = InDriver(lambda: {"worker": f"node:{_node_id()[:8]}/pid:{os.getpid()}", "node": _node_id()})


def _omp(cfg: JobConfig, stage: str) -> dict:
    """Several torch threads on a shared CPU: OpenMP's busy-wait makes them 10-30x slower whenever another
    process takes a core (bench/RESULTS.md); passive waiting avoids that."""
    if _threads(cfg, stage) > 1 and cfg.resources.device != "cuda":
        return {"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}}
    return {}


def io_task(fn, cfg: JobConfig, num_returns: int = 2, scheduling_strategy=None):
    """A CPU task (input loading, stored priors) with the io CPU share, optionally pinned (local input files:
    the driver's node). Tasks are retried by Ray, and their lost outputs rebuilt from lineage."""
    opts = {"scheduling_strategy": scheduling_strategy} if scheduling_strategy is not None else {}
    return ray.remote(fn).options(num_cpus=cfg.resources.io_cpus, num_returns=num_returns, max_retries=2, **opts)


def actor_classes(cfg: JobConfig, prior_gpus: float, decoder_gpus: float, writer_strategy=None):
    """Ray actor classes with their resource requests: (prior or None when colocated, decoder, writer).
    No Ray restarts: the pools replace a dead actor themselves, knowing whether a row or a node killed it.
    ``writer_strategy``: where writers go (default: spread over the nodes)."""
    r = cfg.resources
    common = dict(max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD")
    prior = None if cfg.colocated else ray.remote(PriorWorker).options(
        num_cpus=r.prior.cpus, num_gpus=prior_gpus, max_concurrency=r.prior.concurrency, **_omp(cfg, "prior"),
        **common)
    decoder = ray.remote(StagesWorker if cfg.colocated else DecoderWorker).options(
        num_cpus=r.decoder.cpus, num_gpus=decoder_gpus, max_concurrency=r.decoder.concurrency,
        **_omp(cfg, "decoder"), **common)
    writer = ray.remote(WriterWorker).options(num_cpus=r.io_cpus, max_restarts=0,
                                              scheduling_strategy=writer_strategy or "SPREAD")
    return prior, decoder, writer


__all__ = ["PriorWorker", "DecoderWorker", "StagesWorker", "WriterWorker", "DriverWriter", "InDriver", "Raised",
           "Status", "DecoderOutput", "PriorOutput", "load_inputs", "read_stored_priors", "io_task",
           "write_shard", "actor_classes"]
