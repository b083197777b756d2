"""How the cluster is divided among its kbatch runs (docs/clusters.md): pure policy, no Ray.

:func:`allot` gives every registered run (a :class:`~kbatch.cluster.state.JobDemand`) an amount of its
resource (GPUs; CPUs for CPU-only layouts; each resource is divided on its own):

* **strict priority**: a level is served before any lower one gets anything;
* **weighted fair share within a level** (water-filling): each run gets ``weight x level`` clamped between
  its minimum and what it can use, the level chosen so the amounts fill the capacity left;
* **what a run cannot use goes to the others**: ``can_use`` (its stage limits, fixed replicas, the batches
  it has left) caps its amount and the rest is filled by the others;
* **whole replicas**: an amount is the run's ``minimum`` (one prior + one decoder replica: the least it can
  run with) plus whole ``unit``\\ s (what one replica asks); what rounding leaves goes unit by unit to the
  runs furthest below their exact share;
* **the head of the queue always runs**: the first run in queue order gets at least its minimum even when
  the capacity is smaller (a cluster too small for a run is not a queue: ``placement_timeout`` decides, as
  for a run alone);
* **admission in queue order**: within a level, runs are admitted earliest registration first while their
  minimums fit; a run whose minimum does not fit waits (amount 0: ``QUEUED``), and a later, smaller run may
  use what it cannot (it is preempted, at batch boundaries, once the earlier one fits).

:func:`capacity_left` takes out what non-kbatch workloads hold; :func:`queue_states` says which runs are
QUEUED, RUNNING or DRAINING, their queue positions and what runs ahead of them.
"""
from __future__ import annotations

import math

from kbatch.cluster.state import DRAINING, QUEUED, RUNNING, JobDemand

EPS = 1e-6


def first_amount(j: JobDemand) -> float:
    """The least a run can do anything with: its ``minimum``, at least one ``unit``."""
    return max(j.minimum, j.unit, EPS)


def usable(j: JobDemand) -> float:
    """The most a run can use, in whole units above its minimum (0 when that is below its minimum)."""
    lo = first_amount(j)
    if j.can_use < lo - EPS:
        return 0.0
    if math.isinf(j.can_use):
        return math.inf
    return lo + math.floor((j.can_use - lo) / max(j.unit, EPS) + EPS) * j.unit


def queue_order(jobs: list[JobDemand]) -> list[JobDemand]:
    """Highest priority first; within a level, earliest registration first (then run id)."""
    return sorted(jobs, key=lambda j: (-j.priority, j.started_at, j.run_id))


def allot(jobs: list[JobDemand], capacity: float) -> dict[str, float]:
    """Each run's amount of ``capacity`` (all runs ask the same resource; see the module's text)."""
    out = {j.run_id: 0.0 for j in jobs}
    left = max(0.0, capacity)
    for level in sorted({j.priority for j in jobs}, reverse=True):
        admitted, need = [], 0.0
        for j in queue_order([j for j in jobs if j.priority == level]):
            lo = first_amount(j)
            if usable(j) <= 0:
                continue
            head = not any(out.values()) and not admitted  # the queue's head always runs (see below)
            if need + lo > left + EPS and not head:
                continue
            admitted.append(j)
            need += lo
        for j, x in _fill(admitted, max(left, need)).items():
            out[j] = x
            left -= x
    return out


def _fill(jobs: list[JobDemand], total: float) -> dict[str, float]:
    """Weighted water-filling of ``total`` among ``jobs`` (their minimums fit), in whole units."""
    if not jobs:
        return {}
    lo = {j.run_id: first_amount(j) for j in jobs}
    hi = {j.run_id: usable(j) for j in jobs}
    w = {j.run_id: max(j.weight, EPS) for j in jobs}

    def at(lam: float) -> dict[str, float]:
        return {r: min(hi[r], max(lo[r], w[r] * lam)) for r in lo}

    goal = min(total, sum(hi.values()))
    a, b = 0.0, 1.0
    while sum(at(b).values()) < goal - EPS and b < 1e12:
        b *= 2
    for _ in range(100):
        m = (a + b) / 2
        if sum(at(m).values()) < goal:
            a = m
        else:
            b = m
    exact = at(b) if not math.isinf(goal) else at(a)
    unit = {j.run_id: max(j.unit, EPS) for j in jobs}
    given = {r: lo[r] + math.floor(max(0.0, exact[r] - lo[r]) / unit[r] + EPS) * unit[r] for r in lo}
    spare = total - sum(given.values())
    order = [j.run_id for j in queue_order(jobs)]
    while True:  # what rounding left: a unit at a time to the run furthest below its exact share
        fits = [r for r in order if unit[r] <= spare + EPS and given[r] + unit[r] <= hi[r] + EPS]
        if not fits:
            break
        r = max(fits, key=lambda r: (exact[r] - given[r]) / w[r] - order.index(r) * 1e-9)
        given[r] += unit[r]
        spare -= unit[r]
    return given


def capacity_left(total: float, used: float, kbatch_held: float) -> float:
    """What kbatch runs may divide: the cluster's ``total`` less what non-kbatch workloads hold (``used`` by
    everything, less what the runs say their replicas hold)."""
    return max(0.0, total - max(0.0, used - kbatch_held))


def queue_states(jobs: list[JobDemand], amounts: dict[str, float]) -> dict[str, tuple[str, int | None, list[str]]]:
    """run id -> (state, queue position, runs ahead). QUEUED: it wants some and got none (position 1-based
    in queue order; ahead: the runs holding an allotment, then the runs queued before it); DRAINING: it holds
    more than its allotment (giving replicas back at batch boundaries; QUEUED once it holds none); else
    RUNNING."""
    order = queue_order(jobs)
    holding = [j.run_id for j in order if amounts.get(j.run_id, 0.0) > EPS]
    out, queued = {}, []
    for j in order:
        amount = amounts.get(j.run_id, 0.0)
        if j.held > amount + EPS:
            out[j.run_id] = (DRAINING, None, [])
        elif amount <= EPS and j.can_use > EPS:
            queued.append(j.run_id)
            out[j.run_id] = (QUEUED, len(queued), holding + queued[:-1])
        else:
            out[j.run_id] = (RUNNING, None, [])
    return out
