"""A run's share of a cluster shared by kbatch runs (docs/clusters.md): what it asks the coordinator, the
budget its pools follow, and its queue state.

The runner gives the run a :class:`~kbatch.cluster.seat.Seat` when it runs on a Ray it did not start (a
cluster others may use). :class:`Share` then, at every driver tick:

* tells the seat the run's demand: its resource (GPUs; CPUs for a CPU-only layout), what one replica asks
  (``unit``), the least it runs with (one replica of each model stage: ``minimum``), the most it can use now
  (``can_use``: fixed ``replicas: N``, ``max_replicas``, and near the tail the batches it has left), what its
  replicas hold (``held``), and the cluster it can see (alive nodes and those the autoscaler can add);
* gives the pools the allotment as a budget (:meth:`budget`: the ``auto`` targets and the prior:decoder
  balance hold at most that; ``kbatch.run.replicas``) and the queue state (:meth:`queued`: allotment 0, no
  replica at all). Replicas above a smaller allotment drain at batch boundaries (``kbatch.run.stage_pool``);
* keeps the clocks honest: ``placement_timeout`` does not run while the run is QUEUED or while other runs
  still hold what the coordinator gave this one (:meth:`placement_waits`); ``schedule.queue_timeout`` bounds
  the time QUEUED (exit 3, naming the runs ahead);
* stops the run when ``kbatch cancel`` asks (:class:`~kbatch.cluster.seat.RunCancelled`);
* describes the run's place (:meth:`snapshot`): ``_job.json``'s ``schedule`` and ``Progress.set_schedule``.

A run whose seat never got an answer runs as if alone (the whole cluster), as it does on a Ray it started.
"""
from __future__ import annotations

import logging
import math
import time

from kbatch.cluster.seat import RunCancelled, Seat
from kbatch.cluster.state import QUEUED, JobDemand
from kbatch.config import AUTO, JobConfig
from kbatch.output.job_file import now_iso
from kbatch.run.work import StageFailed

log = logging.getLogger("kbatch")

HISTORY = 50  # state moves kept in _job.json (the first one always)


class Share:
    def __init__(self, cfg: JobConfig, seat: Seat):
        self.cfg, self.seat = cfg, seat
        self.resource = seat.demand.resource
        self.state: str | None = None
        self.since: str | None = None  # ISO time the current state began
        self.queued_since: float | None = None  # monotonic, while QUEUED
        self.queued_seconds = 0.0  # in all
        self.changed = False  # the state or position moved since the last snapshot (write _job.json now)
        self._key = None
        self.t0 = time.monotonic()
        self.history: list[dict] = []  # the state's moves: {t (s since the seat), state, allotted}

    @staticmethod
    def demand_for(cfg: JobConfig, run_id: str, output: str, pools: list, nodes) -> JobDemand:
        """The run's first demand, from its resolved config, its model pools (not yet scaled) and the nodes."""
        gpu = any(p.demand.get("GPU", 0.0) > 0 for p in pools)
        resource = "GPU" if gpu else "CPU"
        units = [p.demand.get(resource, 0.0) for p in pools]
        unit = (pools[-1].demand.get(resource, 0.0) if pools else 1.0) or 1.0  # the decoder's, when it has one
        s = cfg.schedule
        return JobDemand(run_id, output, s.priority, s.weight, resource, unit=unit, minimum=sum(units),
                         started_at=time.time(), cluster=_cluster(nodes, resource))

    # ----------------------------------------------------------------------------------- what pools read
    def budget(self) -> dict[str, float] | None:
        amount = self.seat.amount
        return None if amount is None else {self.resource: amount}

    def queued(self) -> bool:
        return self.seat.queued

    def placement_waits(self) -> bool:
        """The placement clock waits: QUEUED, or other runs still hold (draining) what this one was given."""
        a = self.seat.allotment
        return a is not None and (a.state == QUEUED or a.handing_over > 1e-9)

    # --------------------------------------------------------------------------------------- every tick
    def tick(self, now: float, pools: list, writers, progress, nodes) -> None:
        """Tell the seat the run's demand; stop on cancel or queue_timeout; follow the state."""
        snap = progress.snapshot() if progress is not None else {}
        self.seat.update(held=sum(p.demand.get(self.resource, 0.0) for p in pools for r in p.all.values()
                                  if r.holds_room),
                         asked=sum(p.demand.get(self.resource, 0.0) for p in pools for r in p.all.values()
                                   if r.state != "dead"),
                         can_use=self._can_use(pools),
                         overhead=(0.0 if self.resource == "GPU" or writers is None else
                                   sum(writers.demand.get("CPU", 0.0) for r in writers.all.values() if r.holds_room)),
                         draining=any(r.state == "draining" for p in pools for r in p.all.values()),
                         rows_total=snap.get("rows_total", 0), rows_done=snap.get("rows_done", 0),
                         img_s=snap.get("images_per_second_recent"), eta_s=snap.get("eta_seconds"),
                         cluster=_cluster(nodes, self.resource))
        a = self.seat.allotment
        if a is None:
            return
        if a.cancel:
            raise RunCancelled(f"cancelled by `kbatch cancel {self.seat.demand.run_id}` (committed shards are kept; "
                               "rerun to resume)")
        key = (a.state, a.queue_position)
        if key != self._key:
            self._key, self.changed = key, True
            if a.state != self.state:
                self.state, self.since = a.state, now_iso()
                self.history.append({"t": round(now - self.t0, 1), "state": a.state, "allotted": a.amount})
                del self.history[1:-HISTORY]
                log.info("kbatch: %s on the shared cluster (%s %g allotted of %g%s)", a.state, self.resource,
                         a.amount, a.capacity, f"; position {a.queue_position}, behind {', '.join(a.ahead)}"
                         if a.state == QUEUED else "")
        if a.state == QUEUED:
            if self.queued_since is None:
                self.queued_since = now
            waited = now - self.queued_since
            limit = self.cfg.schedule.queue_timeout
            if limit is not None and waited > limit:
                behind = ", ".join(a.ahead) or "other kbatch runs"
                raise StageFailed(f"waited queued for {waited:.0f} s behind {behind} "
                                  f"(schedule.queue_timeout = {limit:g} s)")
        elif self.queued_since is not None:
            self.queued_seconds += now - self.queued_since
            self.queued_since = None

    def _can_use(self, pools: list) -> float:
        total = 0.0
        for p in pools:
            per = p.demand.get(self.resource, 0.0)
            if p.replicas != AUTO:
                total += int(p.replicas) * per
                continue
            cap = getattr(self.cfg.resources, p.name).max_replicas or math.inf
            work = p.work_cap() if p.work_cap is not None else None
            n = min(cap, math.inf if work is None else max(1, work))
            total += n * per
        return total

    def snapshot(self) -> dict:
        """``_job.json``'s ``schedule`` (and ``Progress.set_schedule``'s): the run's place now."""
        self.changed = False
        a, d = self.seat.allotment, self.seat.demand
        queued = self.queued_seconds + (time.monotonic() - self.queued_since if self.queued_since else 0.0)
        return {"state": a.state if a else None, "queue_position": a.queue_position if a else None,
                "ahead": list(a.ahead) if a else [], "allotted": a.amount if a else None, "held": d.held,
                "priority": d.priority, "weight": d.weight, "since": self.since, "resource": self.resource,
                "capacity": a.capacity if a else None, "coordinator": self.seat.failures == 0 and a is not None,
                "queued_seconds": round(queued, 1), "coordinators": self.seat.coordinators,
                "history": list(self.history)}

    def close(self) -> None:
        self.seat.close()


def _cluster(nodes, resource: str) -> float:
    """The resource of the alive nodes and of those the autoscaler can still add."""
    return float(sum(n.get("Resources", {}).get(resource, 0.0) for n in nodes.can_become()))


__all__ = ["Share", "RunCancelled"]
