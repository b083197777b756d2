"""Replica arithmetic, in one place: what a replica asks of a node, how many fit where, and what the ``auto``
targets are on the nodes alive now.

* ``demand(cfg, stage)``: one replica's ask ({"CPU": .., "GPU": ..}; after ``kbatch.run.layout.resolve``).
* ``fits(demand, have)``: how many such replicas fit in ``have`` (a node, or what is left of the cluster).
* ``room(cfg, stage, nodes, writers, others)``: how many replicas of ``stage`` the alive nodes hold after what
  the rest of the job keeps (the other model stage's replicas, the writers, one input-loading task); for an
  ``auto`` other stage, ``others`` says how many of its replicas to keep room for.
* ``auto_replicas``: ``room``, at least 1 (a replica that does not fit waits for room; ``placement_timeout``
  decides), at most ``max_replicas``.
* ``budget``: on a cluster shared by kbatch runs, a run's ``auto`` targets hold at most its allotment
  (``kbatch.run.share``); without one, the whole cluster.
* How the GPUs are shared between an ``auto`` prior and the decoders follows their measured speeds:
  ``kbatch.run.balance`` (which asks this module what each split would hold).
"""
from __future__ import annotations

import math

from kbatch.config import AUTO, JobConfig, writer_count

MODEL_STAGES = ("prior", "decoder")


def fits(demand: dict[str, float], have: dict[str, float]) -> int:
    """How many replicas asking ``demand`` fit in ``have`` (a large number when it asks for nothing)."""
    counts = [math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in demand.items() if v > 0]
    return max(0, min(counts)) if counts else 1 << 20


def demand(cfg: JobConfig, stage: str) -> dict[str, float]:
    """What one replica of ``stage`` (prior | decoder | writer) asks of a node (after ``layout.resolve``)."""
    r = cfg.resources
    if stage == "writer":
        return {"CPU": r.io_cpus}
    s = getattr(r, stage)
    return {"CPU": float(s.cpus), "GPU": float(s.gpus)}


def has_pool(cfg: JobConfig, stage: str) -> bool:
    """Whether ``stage`` runs in processes of its own in this job (a colocated prior runs in the decoders')."""
    if stage == "prior":
        return cfg.stage in ("all", "prior") and not cfg.colocated
    return cfg.stage in ("all", "decoder")


def reserved(cfg: JobConfig, stage: str, writers: int, others: dict[str, int] | None = None,
             models_only: bool = False) -> dict[str, float]:
    """What the cluster keeps for everything but ``stage``: the other model stage's replicas (``replicas: N``,
    or ``others[name]`` for an ``auto`` one; an ``auto`` stage not in ``others`` keeps none), the writers and
    one input-loading task (not with ``models_only``)."""
    out = {"CPU": 0.0 if models_only else (writers + 1) * cfg.resources.io_cpus, "GPU": 0.0}
    for other in MODEL_STAGES:
        s = getattr(cfg.resources, other)
        if other == stage or not has_pool(cfg, other):
            continue
        n = int(s.replicas) if s.replicas != AUTO else int((others or {}).get(other, 0))
        for k, v in demand(cfg, other).items():
            out[k] = out.get(k, 0.0) + v * n
    return out


def room(cfg: JobConfig, stage: str, nodes: list[dict], writers: int, others: dict[str, int] | None = None,
         budget: dict[str, float] | None = None) -> int:
    """How many replicas of ``stage`` the alive ``nodes`` (``ray.nodes()`` entries) hold: per node, and in all
    after :func:`reserved`; capped by ``max_replicas``, and by ``budget`` (the run's allotment of a cluster
    shared by kbatch runs, ``{"GPU": 6.0}``: what its model replicas may hold in all). May be 0."""
    d = demand(cfg, stage)
    per_node = sum(fits(d, n.get("Resources", {})) for n in nodes)
    totals: dict[str, float] = {}
    for n in nodes:
        for k, v in n.get("Resources", {}).items():
            totals[k] = totals.get(k, 0.0) + v
    rest = reserved(cfg, stage, writers, others)
    left = {k: totals.get(k, 0.0) - rest.get(k, 0.0) for k in d}
    for k, amount in (budget or {}).items():  # the allotment, less the other model stage's replicas
        if k in left:
            left[k] = min(left[k], amount - reserved(cfg, stage, 0, others, models_only=True).get(k, 0.0))
    n = min(per_node, fits(d, left), len(nodes) if not any(v > 0 for v in d.values()) else 1 << 20)
    cap = getattr(cfg.resources, stage).max_replicas
    return max(0, min(n, cap) if cap else n)


def auto_replicas(cfg: JobConfig, stage: str, nodes: list[dict], writers: int,
                  others: dict[str, int] | None = None, budget: dict[str, float] | None = None) -> int:
    """The target of an ``auto`` pool: :func:`room`, at least 1."""
    return max(1, room(cfg, stage, nodes, writers, others, budget))


def decoders_for(cfg: JobConfig, nodes: list[dict], writers: int, priors: int,
                 budget: dict[str, float] | None = None) -> int:
    """Decoder replicas beside ``priors`` prior replicas: ``replicas: N``, or what the nodes hold (may be 0)."""
    s = cfg.resources.decoder
    if s.replicas != AUTO:
        return int(s.replicas)
    return room(cfg, "decoder", nodes, writers, {"prior": priors}, budget)


def max_priors(cfg: JobConfig, nodes: list[dict], writers: int, budget: dict[str, float] | None = None) -> int:
    """The most prior replicas the nodes hold while the decoders keep at least one replica (an ``auto``
    decoder pool) or their ``replicas: N``; at least 1."""
    return max(1, room(cfg, "prior", nodes, writers, {"decoder": 1}, budget))


def expected_writers(cfg: JobConfig, nodes: list[dict], decoders: int | None = None) -> int:
    """Writers for the decoders the cluster holds (``decoders``, or an ``auto`` pool's room beside one
    prior) (``resources.writers: 0``: one per 4 decoders)."""
    r = cfg.resources
    if r.writers:
        return r.writers
    if decoders is None:
        decoders = (r.decoder.replicas if r.decoder.replicas != AUTO
                    else auto_replicas(cfg, "decoder", nodes, 1, {"prior": 1}))
    return writer_count(r, int(decoders))
