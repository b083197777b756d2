"""The stages of a run on the cluster it found: layout resolved, actor pools and tasks built.

``build_stages`` is where a run meets Ray: it reads the alive nodes, makes the ``auto`` resources concrete
(``kbatch.run.layout``), and builds one ``StagePool`` per actor stage (prior, decoder, writers) plus the CPU
tasks (input loading; stored embeddings for ``stage: decoder``). Storage that lives in one process
(``memory://``) is written and read in the driver; a local output path prefers the driver's node.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from kbatch.config import AUTO, ConfigError, JobConfig
from kbatch.run.balance import Balance
from kbatch.run.layout import resolve, shares_card
from kbatch.run.replicas import auto_replicas, decoders_for, demand, expected_writers, max_priors
from kbatch.run.stage_pool import NodeTable, StagePool

log = logging.getLogger("kbatch")


@dataclass
class Stages:
    cfg: JobConfig  # resolved for this cluster
    layout: dict  # what the run got, for _job.json and the log
    spec: object  # writer.OutputSpec
    prior: StagePool | None
    decoder: StagePool | None
    writers: StagePool
    loaders: tuple  # (task anywhere, task on the driver's node, in-driver stand-in)
    stored_priors: object | None
    describe: object  # pool -> "what it asks, what the cluster has"
    balance: Balance | None = None  # an auto prior beside the decoders: the split by measured speeds
    compile: dict | None = None  # models.compile and the decoder batch: decision, rule, inputs (_job.json)


def _worker_config(cfg: JobConfig) -> JobConfig:
    """The config the model actors get: model folders that exist here, and the fault-injection file, as
    absolute paths (actors run in the directory Ray started in). The job's own config, its fingerprint and
    the model names in the records keep what the user wrote."""
    from kbatch.storage import absolute_if_exists, absolute_local

    m, f = cfg.models, cfg.faults
    folders = {k: absolute_if_exists(getattr(m, k)) for k in ("prior", "decoder", "inpaint")}
    faults = dataclasses.replace(f, crash_decoder_once_file=absolute_local(f.crash_decoder_once_file),
                                 crash_writer_once_file=absolute_local(f.crash_writer_once_file))
    return dataclasses.replace(cfg, models=dataclasses.replace(m, **folders), faults=faults)


def _driver_node(ray):
    """Soft affinity to the driver's node: preferred, elsewhere when that node has no room or no CPUs."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)


def build_stages(ray, cfg: JobConfig, run_id: str, output: str, storage_options, nodes: NodeTable,
                 need_inpaint: bool, shapes: list, shape_images: dict | None = None, budget=None) -> Stages:
    """``shape_images``: images still to render per ``Row.unet_shape()`` (``ShapeImages``), for
    ``models.compile: auto`` and the decoder batch (``kbatch.models.compile_plan``). ``budget()``: the run's
    allotment on a cluster shared by kbatch runs (``{"GPU": 6.0}``, or None: the whole cluster;
    ``kbatch.run.share``), which the ``auto`` targets and the balance follow."""
    budget = budget or (lambda: None)
    from kbatch import storage
    from kbatch.models.actors import DriverWriter, InDriver, actor_classes, io_task, load_inputs, read_stored_priors
    from kbatch.output.writer import OutputSpec

    alive = list(nodes.alive.values())
    if nodes.scaler is None:  # the node types the autoscaler can launch (kbatch.run.autoscaler)
        from kbatch.run.autoscaler import Autoscaler, read_cluster_shape

        nodes.scaler = Autoscaler(ray, read_cluster_shape(ray))
    gpus_in_cluster = sum(n.get("Resources", {}).get("GPU", 0.0) for n in alive)
    if cfg.resources.device == "cuda" and not (gpus_in_cluster or nodes.scaler.shape.max_resources().get("GPU")):
        raise ConfigError("config key 'resources.device' is 'cuda' but the Ray cluster has no GPU")
    driver_node = ray.get_runtime_context().get_node_id()
    rcfg = resolve(cfg, nodes.can_become(), driver_node)  # GPU node types at 0 alive: the GPU layout
    rcfg, compile_info = _compile_and_batch(cfg, rcfg, alive, gpus_in_cluster, shape_images)
    r = rcfg.resources
    in_driver = storage.process_local(output)  # memory://: the driver writes it, no writer actors
    local_out = storage.node_local(output)
    here = _driver_node(ray)
    if local_out and len(alive) > 1:
        log.warning("kbatch: output %s is a local path on a cluster of several nodes: writers prefer this "
                    "node, but any that run elsewhere write to that node's disk unless the path is a shared "
                    "mount; use object storage (s3://, gs://) or a shared filesystem", output)
    PriorA, DecoderA, WriterA = actor_classes(rcfg, r.prior.gpus, r.decoder.gpus, here if local_out else None)
    wcfg = _worker_config(rcfg)
    n_writers = 1 if in_driver else expected_writers(rcfg, alive)

    def now_alive() -> list[dict]:  # and the nodes the autoscaler can still add: pending replicas are demand
        return nodes.can_become()

    balance = None  # an auto prior beside its own decoders: the GPUs split by the stages' measured speeds
    if cfg.stage == "all" and not rcfg.colocated and r.prior.replicas == AUTO:
        balance = Balance(lambda p: decoders_for(rcfg, now_alive(), n_writers, p, budget()),
                          lambda: max_priors(rcfg, now_alive(), n_writers, budget()),
                          lambda: (prior.speed, decoder.speed))

    def target(stage: str):
        if balance is not None:
            return balance.target if stage == "prior" else lambda: max(1, balance.decoders())
        return lambda: auto_replicas(rcfg, stage, now_alive(), n_writers, budget=budget())

    def kill(handle):
        if isinstance(handle, ray.actor.ActorHandle):
            try:
                ray.kill(handle)
            except Exception:  # noqa: BLE001 - already gone
                pass

    common = dict(run_id=run_id, max_crashes=rcfg.retries.max_actor_restarts, kill=kill)
    decoder = prior = None
    if cfg.stage != "prior":
        s = r.decoder
        decoder = StagePool("decoder", lambda slot: DecoderA.remote(wcfg, slot, need_inpaint, shapes),
                            demand(rcfg, "decoder"), s.replicas, limit=r.max_in_flight + s.concurrency - 1,
                            target_fn=target("decoder") if s.replicas == AUTO else None, lanes=s.concurrency,
                            **common)
    if cfg.stage == "prior" or (cfg.stage == "all" and not rcfg.colocated):
        s = r.prior
        prior = StagePool("prior", lambda slot: PriorA.remote(wcfg, slot), demand(rcfg, "prior"), s.replicas,
                          limit=r.max_in_flight + s.concurrency - 1,
                          target_fn=target("prior") if s.replicas == AUTO else None, lanes=s.concurrency, **common)
    elif rcfg.colocated:
        prior = decoder  # the decoder processes run the prior too
    if in_driver:
        writers = StagePool("writer", lambda slot: DriverWriter(), {}, 1, limit=r.pending_writes, **common)
    else:
        writers = StagePool("writer", lambda slot: WriterA.remote(slot, wcfg.faults), demand(rcfg, "writer"),
                            r.writers or AUTO, limit=r.pending_writes,
                            target_fn=lambda: expected_writers(rcfg, now_alive(),
                                                               decoder.target if decoder is not None else None),
                            **common)
    loaders = (io_task(load_inputs, rcfg), io_task(load_inputs, rcfg, scheduling_strategy=here),
               InDriver(load_inputs, num_returns=2))
    stored = None
    if cfg.stage == "decoder":  # embeddings in memory:// are this process's: read them here
        stored = (InDriver(read_stored_priors, num_returns=2) if storage.process_local(cfg.manifest)
                  else io_task(read_stored_priors, rcfg))
    spec = OutputSpec(root=output, format="embeddings" if cfg.stage == "prior" else cfg.output.format,
                      image_format=cfg.output.image_format, quality=cfg.output.quality,
                      png_compress_level=cfg.output.png_compress_level, storage_options=storage_options,
                      image_embeddings=cfg.quality.image_embeddings and cfg.stage != "prior")
    layout = {"colocate": rcfg.colocated, "device": r.device,
              "shares_card": rcfg.colocated and shares_card(rcfg, gpus_in_cluster),  # one GPU: one process
              "split": "measured" if balance is not None else "fixed",  # prior:decoder (kbatch.run.balance)
              "prior": None if cfg.stage == "decoder" else dataclasses.asdict(r.prior),
              "decoder": None if cfg.stage == "prior" else dataclasses.asdict(r.decoder),
              "writers": "in driver" if in_driver else (r.writers or "auto"),
              "nodes": len(alive), "cluster": {k: v for k, v in nodes.totals().items() if k in ("CPU", "GPU")}}
    if nodes.scaler.shape.autoscaling:
        layout["autoscaler"] = nodes.scaler.shape.describe()
    log.info("kbatch: layout %s", layout)

    def describe(pool: StagePool) -> str:
        try:
            free = ray.available_resources()
        except Exception:  # noqa: BLE001
            free = {}
        totals = nodes.totals()
        have = ", ".join(f"{k} {totals.get(k, 0.0):g} ({free.get(k, 0.0):g} free)" for k in ("GPU", "CPU"))
        asked = {k: v for k, v in pool.demand.items() if v}
        n = pool.replicas if pool.replicas != AUTO else "auto"
        shape = nodes.scaler.shape if nodes.scaler is not None else None
        types = ", ".join(f"{t.max_workers} x {t.name} {t.resources}" for t in shape.node_types) if shape else ""
        more = f"; the autoscaler ({shape.source}) can add {types}" if shape is not None and shape.autoscaling else ""
        return (f"resources.{pool.name} asks {n} replica(s) of {asked}; the cluster has {have} "
                f"on {len(nodes.alive)} alive node(s){more}")

    return Stages(rcfg, layout, spec, prior, decoder, writers, loaders, stored, describe, balance, compile_info)


def _compile_and_batch(cfg: JobConfig, rcfg: JobConfig, alive: list[dict], gpus_in_cluster: float,
                       shape_images: dict | None) -> tuple[JobConfig, dict | None]:
    """``models.compile`` (true | false | auto) and ``resources.decoder.batch_size`` (N | auto) made concrete
    for this cluster and job (``kbatch.models.compile_plan.decide``); the decision for ``_job.json``.
    Simulated decoders and prior-only jobs: compile off, batch auto = 16, nothing recorded."""
    from kbatch.config import SIM
    from kbatch.models.compile_plan import ShapeImages, card_gib, decide

    m, dec = cfg.models, rcfg.resources.decoder
    info = None
    if cfg.stage == "prior" or m.decoder == SIM:
        on, batch = False, (16 if dec.batch_size == AUTO else dec.batch_size)
    else:
        shape_images = shape_images if shape_images is not None else ShapeImages()
        # CUDA: decoders asking a GPU on a cluster with GPUs; none alive yet with a GPU layout (an autoscaler
        # to start them): not known
        if rcfg.resources.device == "cpu" or not dec.gpus:
            cuda = False
        else:
            cuda = True if gpus_in_cluster else None
        replicas = dec.replicas
        if replicas == AUTO:
            # the decoders at the start (beside 1 auto prior; the measured split may only give the prior more)
            replicas = auto_replicas(rcfg, "decoder", alive, 1, {"prior": 1}) if gpus_in_cluster else 1
        d = decide(m.compile, cuda=cuda, shape_images=shape_images,
                   max_num_images=getattr(shape_images, "max_num_images", 0), replicas=replicas,
                   batch_setting=dec.batch_size, card=card_gib(alive), lanes=dec.concurrency)
        on, batch, info = d.on, d.batch, d.to_dict()
        log.info("kbatch: compile %s (%s); decoder batch %d (%s)", "on" if on else "off", d.reason, batch,
                 d.batch_reason)
    models = dataclasses.replace(rcfg.models, compile=on)
    res = dataclasses.replace(rcfg.resources, decoder=dataclasses.replace(dec, batch_size=int(batch)))
    return dataclasses.replace(rcfg, models=models, resources=res), info
