"""Ray wrappers around the pure stage classes: model actors, writer actors, and the CPU task that loads inputs.

Nothing here holds logic worth testing on its own: the predictors (``prior.py``, ``decoder.py``), the
input checks (``images.py``) and the writer (``writer.py``) are plain Python, tested without a cluster.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import ray

from .config import JobConfig
from .outputs import DecoderOutput, PriorOutput
from .schema import Row, record_key


class Running:
    """Notes in Ray's KV store which batches this actor is running, so that when the process dies the
    driver can tell the batches that may have killed it from those queued behind them. With lanes
    (``concurrency`` > 1) several run at once; the driver then reruns each suspect alone."""

    def __init__(self):
        self.tokens: list[str] = []
        self.lock = threading.Lock()

    @contextmanager
    def batch(self, slot: str | None, token: str | None):
        if not (slot and token):
            yield
            return
        with self.lock:
            self.tokens.append(token)
            _put(slot, self.tokens)
        try:
            yield
        finally:
            with self.lock:
                self.tokens.remove(token)
                _put(slot, self.tokens)


def _put(slot: str, tokens: list[str]):
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(slot, " ".join(tokens), overwrite=True, namespace="kbatch")


def running_batches(slot: str) -> set[str]:
    """The tokens of the batches an actor was running (see ``Running``)."""
    from ray.experimental.internal_kv import _internal_kv_get

    v = _internal_kv_get(slot, namespace="kbatch")
    return set(v.decode().split()) if v else set()


def _merge(input_maps) -> dict:
    out: dict = {}
    for m in input_maps:
        out.update(m or {})
    return out


def _memory() -> dict:
    """Peak host RSS of this worker process and peak GPU memory allocated by torch (GiB)."""
    import resource

    import torch

    out = {"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _threads(cfg: JobConfig, stage: str) -> int:
    """Torch threads per lane: ``threads``, or the stage's CPU share split over its lanes."""
    s = getattr(cfg.resources, stage)
    return s.threads or max(1, round(s.cpus / s.concurrency))


class PriorWorker:
    def __init__(self, cfg: JobConfig, stage: str = "prior", running: Running | None = None):
        """``stage``: whose threads and concurrency to use ("decoder" when colocated in a StagesWorker)."""
        from .prior import PriorPredictor  # torch and diffusers: only in the actor process

        m = cfg.models
        self.running = running or Running()
        self.predictor = PriorPredictor(m.prior, device=cfg.resources.device, dtype=m.dtype,
                                        scheduler=m.prior_scheduler, offload=m.offload,
                                        threads=_threads(cfg, stage), revision=m.revision,
                                        concurrency=getattr(cfg.resources, stage).concurrency)

    def worker(self) -> str:
        return self.predictor.worker

    def run(self, slot: str, token: str, rows: list[Row], *input_maps) -> tuple[list[PriorOutput], float, dict]:
        with self.running.batch(slot, token):
            t0 = time.perf_counter()
            inputs = _merge(input_maps)
            out = self.predictor(rows, [inputs.get(r.id) for r in rows])
            return out, time.perf_counter() - t0, _memory()


class DecoderWorker:
    def __init__(self, cfg: JobConfig, need_inpaint: bool, shapes=()):
        """``shapes``: the job's ``Row.unet_shape()`` buckets, compiled up front when ``models.compile``."""
        from .decoder import DecoderFaults, DecoderPredictor  # torch and diffusers: only in the actor
        from .models import compiles

        m, f = cfg.models, cfg.faults
        self.running = Running()
        self.predictor = DecoderPredictor(
            m.decoder, m.inpaint if need_inpaint else None, device=cfg.resources.device, dtype=m.dtype,
            scheduler=m.scheduler, offload=m.offload, threads=_threads(cfg, "decoder"),
            channels_last=m.channels_last, compile=m.compile, revision=m.revision,
            faults=DecoderFaults(f.crash_decoder_once_file, f.crash_on_prompt),
            concurrency=cfg.resources.decoder.concurrency)
        self.warmup = 0.0  # seconds, reported with the first batch
        if compiles(self.predictor.place, m.compile):  # one batch size per shape, every shape compiled now
            self.predictor.pad_to = cfg.resources.decoder.batch_size
            self.warmup = self.predictor.warmup(shapes)

    def worker(self) -> str:
        return self.predictor.worker

    @ray.method(num_returns=2)
    def run(self, slot: str, token: str, rows: list[Row], priors: list[PriorOutput], *input_maps):
        """Returns (small status for the driver, images for the writer) as two objects."""
        with self.running.batch(slot, token):
            t0 = time.perf_counter()
            inputs = _merge(input_maps)
            out = self.predictor(rows, priors, [inputs.get(r.id) for r in rows])
            with self.running.lock:  # lanes: report it once
                warmup, self.warmup = self.warmup, 0.0
            return (time.perf_counter() - t0, _memory(), warmup), out


class StagesWorker(DecoderWorker):
    """``resources.colocate``: the prior and the decoder models in one process, one per decoder replica.

    Saves a model-loading process per replica (on a small CPU machine, importing torch + diffusers costs
    more than the prior's whole share of a short job) and a second CUDA context on a small GPU. Both
    stages run with the decoder's resources, torch threads and lanes (prior and decoder batches share the
    actor's ``decoder.concurrency`` threads); embeddings still come back to the driver.
    """

    def __init__(self, cfg: JobConfig, need_inpaint: bool, shapes=()):
        super().__init__(cfg, need_inpaint, shapes)
        self.prior = PriorWorker(cfg, stage="decoder", running=self.running)

    def run_prior(self, slot: str, token: str, rows: list[Row], *input_maps):
        return self.prior.run(slot, token, rows, *input_maps)


class WriterWorker:
    """Encodes and commits shards. Long-lived, so a shard write doesn't start (and import into) a fresh
    worker process; several writers (``resources.writers``) write shards in parallel."""

    @ray.method(max_task_retries=2, retry_exceptions=[OSError])
    def write(self, spec, shard: str, ok_bases: dict[str, dict], error_records: list[dict], *payloads):
        return write_shard(_as_writer(spec), shard, ok_bases, error_records, *payloads)

    @ray.method(max_task_retries=2, retry_exceptions=[OSError])
    def write_embeddings(self, spec, shard: str, bases: dict, row_cells: dict, outputs: list, error_records):
        from .embeddings import write_embeddings_shard

        return write_embeddings_shard(_as_writer(spec), shard, bases, row_cells, outputs, error_records)


def _as_writer(spec):
    """``spec`` stamped with this process as the writer (recorded in each shard's stats)."""
    import dataclasses
    import os

    node = ray.get_runtime_context().get_node_id()[:8] if ray.is_initialized() else "local"
    return dataclasses.replace(spec, writer=f"node:{node}/pid:{os.getpid()}")


def load_inputs(rows: list[Row], limits, storage_options=None) -> tuple[dict[str, str], dict[str, dict]]:
    """CPU task: decode init images / masks / mix images. Returns (errors by id, inputs by id)."""
    from .images import load_row_inputs

    errors, inputs = {}, {}
    for r in rows:
        try:
            inputs[r.id] = load_row_inputs(r, limits, storage_options)
        except ValueError as e:
            errors[r.id] = str(e)
    return errors, inputs


def write_shard(spec, shard: str, ok_bases: dict[str, dict], error_records: list[dict], *payloads):
    """Flatten decoder outputs into one record per image, encode and commit one shard."""
    from .writer import write_shard as _write

    records, images = [], []
    for payload in payloads:
        for out in payload:  # DecoderOutput
            base = ok_bases[out.id]
            for i, img in enumerate(out.images):
                records.append({**base, "image_index": i, "status": "ok", "error": None,
                                "key": record_key(out.id, i), "prior_worker": out.prior_worker,
                                "decoder_worker": out.decoder_worker, "seconds": out.seconds,
                                "dtype": out.dtype or base.get("dtype")})
                images.append(img)
    for rec in error_records:
        records.append(rec)
        images.append(None)
    return _write(spec, shard, records, images)


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
        from .embeddings import write_embeddings_shard

        self.write = InDriver(lambda spec, *rest: write_shard(_as_writer(spec), *rest))
        self.write_embeddings = InDriver(lambda spec, *rest: write_embeddings_shard(_as_writer(spec), *rest))


def _omp(cfg: JobConfig, stage: str) -> dict:
    """Several torch threads on a shared CPU: OpenMP's busy-wait makes them 10-30x slower whenever another
    process takes a core (bench/RESULTS.md); passive waiting avoids that."""
    if _threads(cfg, stage) > 1 and cfg.resources.device != "cuda":
        return {"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}}
    return {}


def loader_task(cfg: JobConfig, scheduling_strategy=None):
    """The input-loading CPU task (``load_inputs``), optionally pinned (local input files: the driver's node)."""
    opts = {"scheduling_strategy": scheduling_strategy} if scheduling_strategy is not None else {}
    return ray.remote(load_inputs).options(num_cpus=cfg.resources.io_cpus, num_returns=2, max_retries=2, **opts)


def remote_classes(cfg: JobConfig, prior_gpus: float, decoder_gpus: float, writer_strategy=None):
    """(prior actor class, decoder actor class, input-loading task, writer actor class). With
    ``resources.colocate`` the prior class is None: decoder actors run the prior too. ``writer_strategy``:
    where writers go (default: spread over the nodes)."""
    r, rt = cfg.resources, cfg.retries
    # SPREAD: replicas land on different nodes where they can (multi-node clusters)
    common = dict(max_restarts=rt.max_actor_restarts, max_task_retries=0, scheduling_strategy="SPREAD")
    prior = None if cfg.colocated else ray.remote(PriorWorker).options(
        num_cpus=r.prior.cpus, num_gpus=prior_gpus, max_concurrency=r.prior.concurrency, **_omp(cfg, "prior"),
        **common)
    decoder = ray.remote(StagesWorker if cfg.colocated else DecoderWorker).options(
        num_cpus=r.decoder.cpus, num_gpus=decoder_gpus, max_concurrency=r.decoder.concurrency,
        **_omp(cfg, "decoder"), **common)
    loader = loader_task(cfg)
    writer = ray.remote(WriterWorker).options(num_cpus=r.io_cpus, max_restarts=2,
                                              scheduling_strategy=writer_strategy or "SPREAD")
    return prior, decoder, loader, writer


__all__ = ["PriorWorker", "DecoderWorker", "StagesWorker", "WriterWorker", "DriverWriter", "InDriver", "Raised",
           "DecoderOutput", "load_inputs", "loader_task", "write_shard", "remote_classes"]
