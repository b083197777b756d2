"""The layout a job gets on the cluster it runs on: ``auto`` resources made concrete.

* A cluster **with GPUs**: each stage asks for its ``gpus`` share; ``colocate: auto`` is off; ``concurrency:
  auto`` is 1; ``cpus: auto`` is 0.5; ``replicas: auto`` is as many replicas as the alive nodes hold (re-read
  at every tick of the run: the pool grows when nodes join), an ``auto`` prior and the decoders sharing them
  by their measured speeds (``kbatch.run.replicas``, ``kbatch.run.balance``).
* A cluster with **fewer GPUs than one per stage** (one GPU; the prior's and the decoder's ``gpus`` do not fit
  side by side): ``colocate: auto`` is on, the two stages share the card in one process (``StagesWorker``),
  which runs a prior batch or a decoder batch at a time: ~``1 / (prior_s + decoder_s)`` img/s. Chosen over
  two processes with fractional shares (0.5 / 0.5), reasoned on CPU (no GPU to measure on yet): without MPS
  a GPU time-slices between processes, so two processes cannot make the card do more work than one running
  the stages in turn, while they cost a second CUDA context (~0.3-0.5 GiB), context switches, a second
  model-loading process, and a prior that only a separate split policy could keep from idling (with one
  process the actor's queue keeps the card busy whichever stage has work). The one-process layout is the
  one already measured fastest on CPUs. Explicit fractions (``configs/one_gpu.yaml``: 0.2 / 0.8, which fit)
  or ``colocate: false`` keep two processes.
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

from kbatch.config import AUTO, JobConfig

MAX_AUTO_LANES = 4  # lanes beyond this were not measured (small models gain little per lane past 2-3)


def _node_cpus(nodes: list[dict], driver_node: str | None) -> float:
    """CPUs of the node a CPU layout is sized for: the driver's (a single machine), else the largest."""
    for n in nodes:
        if n.get("NodeID") == driver_node and n.get("Resources", {}).get("CPU"):
            return n["Resources"]["CPU"]
    return max((n.get("Resources", {}).get("CPU", 0.0) for n in nodes), default=1.0) or 1.0


def shares_card(cfg: JobConfig, gpus: float) -> bool:
    """A GPU cluster (``gpus`` in all) without room for one prior and one decoder replica side by side."""
    r = cfg.resources
    return 0 < gpus < r.prior.gpus + r.decoder.gpus - 1e-9


def resolve(cfg: JobConfig, nodes: list[dict], driver_node: str | None = None) -> JobConfig:
    """``cfg`` with every ``auto`` of ``resources`` made concrete for the alive ``nodes`` (``ray.nodes()``
    entries), except ``replicas: auto``, which the stage pools keep following."""
    r = cfg.resources
    gpus_here = sum(n.get("Resources", {}).get("GPU", 0.0) for n in nodes)
    cpu_layout = gpus_here == 0
    colocate = r.colocate if r.colocate != AUTO else (cfg.stage == "all" and (cpu_layout or shares_card(cfg, gpus_here)))
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
