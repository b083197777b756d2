"""The layout a job gets on the cluster it runs on: ``auto`` resources made concrete.

* A cluster **with GPUs**: each stage asks for its ``gpus`` share; ``colocate: auto`` is off; ``concurrency:
  auto`` is 1; ``cpus: auto`` is 0.5; ``replicas: auto`` is as many replicas as the alive nodes hold (re-read
  at every tick of the run: the pool grows when nodes join).
* A cluster **without GPUs** (or ``device: cpu`` on one): GPU requests drop to 0, and the layout measured
  fastest on CPUs (bench/RESULTS.md: 1.02x a plain in-process diffusers loop, against 0.76-0.83x for one
  process per stage) is the default: ``colocate: auto`` puts the prior in the decoder process, ``cpus: auto``
  gives that process the node's CPUs less one writer's and one loader's io share, and ``concurrency: auto``
  runs one lane (a batch at once, sharing the weights) per CPU, up to 4, with one torch thread each.

Explicit values in the config always win. The resolved layout is logged and kept in ``_job.json``.
"""
from __future__ import annotations

import dataclasses
import math

from kbatch.config import AUTO, JobConfig, writer_count
from kbatch.run.stage_pool import fits

MAX_AUTO_LANES = 4  # lanes beyond this were not measured (small models gain little per lane past 2-3)


def _node_cpus(nodes: list[dict], driver_node: str | None) -> float:
    """CPUs of the node a CPU layout is sized for: the driver's (a single machine), else the largest."""
    for n in nodes:
        if n.get("NodeID") == driver_node and n.get("Resources", {}).get("CPU"):
            return n["Resources"]["CPU"]
    return max((n.get("Resources", {}).get("CPU", 0.0) for n in nodes), default=1.0) or 1.0


def resolve(cfg: JobConfig, nodes: list[dict], driver_node: str | None = None) -> JobConfig:
    """``cfg`` with every ``auto`` of ``resources`` made concrete for the alive ``nodes`` (``ray.nodes()``
    entries), except ``replicas: auto``, which the stage pools keep following."""
    r = cfg.resources
    gpus_here = sum(n.get("Resources", {}).get("GPU", 0.0) for n in nodes)
    cpu_layout = gpus_here == 0
    colocate = r.colocate if r.colocate != AUTO else (cpu_layout and cfg.stage == "all")
    node_cpus = _node_cpus(nodes, driver_node)

    def stage(s, name: str):
        gpus = s.gpus if gpus_here else 0.0
        lanes = s.concurrency
        cpus = s.cpus
        if cpu_layout and name == "decoder":
            if cpus == AUTO:
                cpus = max(1.0, node_cpus - 2 * r.io_cpus)
            if lanes == AUTO:
                lanes = max(1, min(MAX_AUTO_LANES, int(node_cpus)))
        threads = s.threads
        if cpus == AUTO:
            cpus = 0.5
        if lanes == AUTO:
            lanes = 1
        if cpu_layout and name == "decoder" and s.threads == 0 and s.concurrency == AUTO:
            threads = max(1, math.floor(cpus / lanes))
        return dataclasses.replace(s, gpus=gpus, cpus=float(cpus), concurrency=int(lanes), threads=threads)

    res = dataclasses.replace(r, prior=stage(r.prior, "prior"), decoder=stage(r.decoder, "decoder"),
                              colocate=bool(colocate))
    return dataclasses.replace(cfg, resources=res)


def demand(cfg: JobConfig, stage: str) -> dict[str, float]:
    """What one replica of ``stage`` (prior | decoder | writer) asks of a node (after :func:`resolve`)."""
    r = cfg.resources
    if stage == "writer":
        return {"CPU": r.io_cpus}
    s = getattr(r, stage)
    return {"CPU": float(s.cpus), "GPU": float(s.gpus)}


def reserved(cfg: JobConfig, stage: str, writers: int) -> dict[str, float]:
    """What the cluster keeps for everything but an auto ``stage``: the other model stage's fixed replicas,
    the writers and one input-loading task."""
    out = {"CPU": (writers + 1) * cfg.resources.io_cpus, "GPU": 0.0}
    for other in ("prior", "decoder"):
        s = getattr(cfg.resources, other)
        if other == stage or s.replicas == AUTO or (other == "prior" and cfg.colocated):
            continue
        if (other == "prior" and cfg.stage == "decoder") or (other == "decoder" and cfg.stage == "prior"):
            continue
        for k, v in demand(cfg, other).items():
            out[k] = out.get(k, 0.0) + v * int(s.replicas)
    return out


def auto_replicas(cfg: JobConfig, stage: str, nodes: list[dict], writers: int) -> int:
    """How many replicas of ``stage`` the alive ``nodes`` hold (``replicas: auto``): per node, and in all
    after what the rest of the job needs; at least 1, at most ``max_replicas`` when set."""
    d = demand(cfg, stage)
    per_node = sum(fits(d, n.get("Resources", {})) for n in nodes)
    totals: dict[str, float] = {}
    for n in nodes:
        for k, v in n.get("Resources", {}).items():
            totals[k] = totals.get(k, 0.0) + v
    rest = reserved(cfg, stage, writers)
    left = {k: totals.get(k, 0.0) - rest.get(k, 0.0) for k in d}
    n = min(per_node, fits(d, left), len(nodes) if not any(v > 0 for v in d.values()) else 1 << 20)
    cap = getattr(cfg.resources, stage).max_replicas
    return max(1, min(n, cap) if cap else n)


def expected_writers(cfg: JobConfig, nodes: list[dict]) -> int:
    """Writers for the decoders the cluster holds now (``resources.writers: 0``: one per 4 decoders)."""
    r = cfg.resources
    if r.writers:
        return r.writers
    decoders = r.decoder.replicas if r.decoder.replicas != AUTO else auto_replicas(cfg, "decoder", nodes, 1)
    return writer_count(r, int(decoders))
