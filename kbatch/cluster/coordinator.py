"""The cluster's coordinator (docs/clusters.md): one detached, named Ray actor that knows every kbatch run on
the cluster and answers each run's heartbeat with its allotment.

* **Where:** the actor ``kbatch-coordinator`` in Ray namespace ``kbatch``, ``lifetime="detached"``,
  ``num_cpus=0`` (it takes no CPU a job could use), on the head node (never keeping a worker from scaling
  down), created by the first run's heartbeat with ``get_if_exists=True`` (:func:`coordinator`), so it
  outlives the runs and every later run finds it.
* **What:** ``heartbeat(demand) -> Allotment`` (registers a run on its first call), ``deregister(run_id)``,
  ``jobs() -> [JobRow]``, ``cancel(run_id) -> JobRow | None``. Every answer divides the cluster again with
  ``kbatch.cluster.allotment`` (pure policy) over the capacity left after non-kbatch workloads.
* **State lives in the drivers.** A registration not renewed within its ``ttl_s`` is dropped (a SIGKILLed
  driver, a lost node): its share goes to the others. A coordinator that dies loses nothing: drivers keep
  their last allotments, and the next heartbeat's ``get_if_exists`` creates a new coordinator, which learns
  every run again from their heartbeats. Until it has heard every run that the cluster's KV store lists as
  registered (or for ``WARMUP`` seconds at most), it keeps each run at the allotment that run says it holds
  and queues new runs, so a run that re-registers first does not take the others' GPUs. With no run
  registered for ``IDLE_EXIT`` seconds it ends itself: nothing of kbatch stays on a cluster between jobs.
* **Non-kbatch workloads:** what Ray says is in use, less what kbatch runs say their replicas hold, is taken;
  the smallest such reading of the last ``USED_WINDOW`` seconds is used (a replica just placed, or just
  stopped, is not mistaken for a stranger and does not make a run drain).
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque

from kbatch.cluster.allotment import EPS, allot, capacity_left, queue_states
from kbatch.cluster.state import CANCELLING, QUEUED, RUNNING, Allotment, JobDemand, JobRow

log = logging.getLogger("kbatch")

NAME = "kbatch-coordinator"
NAMESPACE = "kbatch"
KV_NAMESPACE = "kbatch-runs"  # run/<run id>: registered (written by seats, read by a new coordinator)
KV_PREFIX = "run/"
WARMUP = 8.0  # seconds a new coordinator waits at most to hear runs registered before it
USED_WINDOW = 6.0  # seconds of cluster usage readings: the smallest non-kbatch usage is taken
READ_EVERY = 1.0  # seconds between reads of the cluster's resources
HEAD = "node:__internal_head__"  # the resource only Ray's head node has
IDLE_EXIT = 10.0  # seconds without any registered run after which the coordinator actor ends


class Coordinator:
    """The coordinator's state and answers. ``resources()`` returns ``(totals, available)`` of the cluster
    (Ray's ``cluster_resources()`` / ``available_resources()`` in the actor); ``registered()`` the run ids
    listed in the KV store when it starts; ``clock`` a monotonic clock (tests drive both)."""

    def __init__(self, resources=None, registered=None, clock=time.monotonic, warmup: float = WARMUP):
        self.clock = clock
        self.resources = resources or (lambda: ({}, {}))
        self.t0 = clock()
        self.epoch = int(time.time() * 1000)
        self.demands: dict[str, JobDemand] = {}
        self.seen: dict[str, float] = {}
        self.cancelled: set[str] = set()
        self.answers: dict[str, Allotment] = {}
        self.expected = set(registered() if registered is not None else ())
        self.warmup = warmup if self.expected else 0.0
        self._used: deque = deque()  # (time, {resource: non-kbatch usage})
        self._read_at = -math.inf
        self._totals: dict = {}
        self.idle_since = self.t0  # since when no run is registered

    # ---------------------------------------------------------------------------------------- the calls
    def heartbeat(self, demand: JobDemand) -> Allotment:
        now = self.clock()
        if demand.run_id not in self.demands:  # what it holds was counted as a stranger's: read again
            self._used.clear()
            self._read_at = -math.inf
        self.demands[demand.run_id] = demand
        self.seen[demand.run_id] = now
        self._divide(now)
        return self.answers[demand.run_id]

    def deregister(self, run_id: str) -> None:
        for d in (self.demands, self.seen, self.answers):
            d.pop(run_id, None)
        self.cancelled.discard(run_id)
        self.expected.discard(run_id)
        self._divide(self.clock())

    def jobs_rows(self) -> list[JobRow]:
        now = self.clock()
        self._divide(now)
        return [self._row(self.demands[r], now) for r in self._order()]

    def cancel(self, run_id: str) -> JobRow | None:
        if run_id not in self.demands:
            return None
        self.cancelled.add(run_id)
        now = self.clock()
        self._divide(now)
        return self._row(self.demands[run_id], now)

    def info(self) -> dict:
        return {"epoch": self.epoch, "jobs": len(self.demands), "warming": self._warming(self.clock())}

    # ------------------------------------------------------------------------------------------ dividing
    def _order(self) -> list[str]:
        return [r for r, _ in sorted(self.demands.items(), key=lambda kv: (-kv[1].priority, kv[1].started_at, kv[0]))]

    def _warming(self, now: float) -> bool:
        if not self.expected:
            return False
        if self.expected <= set(self.demands):
            self.expected = set()
            return False
        if now - self.t0 >= self.warmup:  # listed but silent: runs that died without deregistering
            for run_id in self.expected - set(self.demands):
                self.forget(run_id)
            self.expected = set()
            return False
        return True

    def forget(self, run_id: str) -> None:
        """A run that died without deregistering: out of the KV store's list (the actor overrides it)."""

    def _expire(self, now: float) -> None:
        for run_id in [r for r, t in self.seen.items() if now - t > self.demands[r].ttl_s]:
            log.warning("kbatch: run %s sent no heartbeat for %.0f s: its share goes to the others", run_id,
                        now - self.seen[run_id])
            for d in (self.demands, self.seen, self.answers):
                d.pop(run_id, None)
            self.cancelled.discard(run_id)
            self.expected.discard(run_id)
            self.forget(run_id)

    def _non_kbatch(self, now: float) -> tuple[dict, dict]:
        """(totals, non-kbatch usage) per resource, the usage the smallest of the last USED_WINDOW s."""
        if now - self._read_at >= READ_EVERY:
            self._read_at = now
            try:
                totals, free = self.resources()
            except Exception:  # noqa: BLE001 - keep the last reading
                totals, free = self._totals, None
            if free is not None:
                self._totals = dict(totals)
                held: dict[str, float] = {}
                for j in self.demands.values():
                    # pending replicas too: one Ray has just placed is not mistaken for a stranger's
                    held[j.resource] = held.get(j.resource, 0.0) + max(j.held, j.asked) + j.overhead
                used = {k: max(0.0, v - free.get(k, 0.0) - held.get(k, 0.0)) for k, v in totals.items()}
                self._used.append((now, used))
        while self._used and now - self._used[0][0] > USED_WINDOW and len(self._used) > 1:
            self._used.popleft()
        keys = set().union(*(u for _, u in self._used)) if self._used else set()
        return self._totals, {k: min(u.get(k, 0.0) for _, u in self._used) for k in keys}

    def _divide(self, now: float) -> None:
        self._expire(now)
        if self.demands:
            self.idle_since = now
        totals, strangers = self._non_kbatch(now)
        warming = self._warming(now)
        for resource in {j.resource for j in self.demands.values()}:
            jobs = [j for j in self.demands.values() if j.resource == resource]
            views = [j.cluster for j in jobs if j.cluster is not None]
            total = max([totals.get(resource, 0.0)] + views)
            overhead = sum(j.overhead for j in jobs)  # the runs' writers and loaders (CPU layouts)
            capacity = max(0.0, capacity_left(total, strangers.get(resource, 0.0), 0.0) - overhead)
            live = [j for j in jobs if j.run_id not in self.cancelled]
            if warming:  # runs keep what they hold; new ones wait until every run is heard again
                amounts = {j.run_id: (j.allotted or 0.0) for j in live}
            else:
                amounts = allot(live, capacity)
            states = queue_states(live, amounts)
            for j in jobs:
                amount = amounts.get(j.run_id, 0.0)
                state, position, ahead = states.get(j.run_id, (CANCELLING, None, []))
                over = sum(max(0.0, o.held - amounts.get(o.run_id, 0.0)) for o in jobs if o is not j)
                self.answers[j.run_id] = Allotment(
                    j.run_id, amount, CANCELLING if j.run_id in self.cancelled else state, position, ahead,
                    capacity, cancel=j.run_id in self.cancelled, coordinator_epoch=self.epoch, handing_over=over)

    def _row(self, j: JobDemand, now: float) -> JobRow:
        a = self.answers.get(j.run_id) or Allotment(j.run_id, 0.0, QUEUED)
        return JobRow(j.run_id, j.output, j.priority, j.weight, a.state, j.resource, j.held, a.amount, j.rows_done,
                      j.rows_total, j.img_s, j.eta_s, a.queue_position, list(a.ahead),
                      round(now - self.seen.get(j.run_id, now), 1))


class CoordinatorActor(Coordinator):
    """The Ray actor: the cluster's resources from Ray, the registered runs from the KV store."""

    def __init__(self):
        import ray

        def resources():
            return ray.cluster_resources(), ray.available_resources()

        super().__init__(resources, registered_runs)
        log.info("kbatch: coordinator %s started (runs registered before it: %d)", self.epoch, len(self.expected))
        import threading

        self._lock = threading.Lock()
        threading.Thread(target=self._exit_when_idle, daemon=True).start()

    def _exit_when_idle(self) -> None:
        """No run registered for IDLE_EXIT seconds: the actor ends (nothing of kbatch stays on the cluster;
        the next run's heartbeat starts a new one)."""
        import ray

        while True:
            time.sleep(1.0)
            with self._lock:
                if not self.demands and self.clock() - self.idle_since > IDLE_EXIT:
                    log.info("kbatch: coordinator %s: no run for %.0f s, exiting", self.epoch, IDLE_EXIT)
                    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                    return

    def heartbeat(self, demand: JobDemand) -> Allotment:
        with self._lock:
            return super().heartbeat(demand)

    def deregister(self, run_id: str) -> None:
        with self._lock:
            super().deregister(run_id)

    def jobs(self) -> list[JobRow]:  # the actor's name for jobs_rows
        with self._lock:
            return self.jobs_rows()

    def cancel(self, run_id: str) -> JobRow | None:
        with self._lock:
            return super().cancel(run_id)

    def forget(self, run_id: str) -> None:
        note_registered(run_id, False)


def registered_runs() -> list[str]:
    """Run ids the seats listed in the KV store (a new coordinator waits to hear them)."""
    from ray.experimental.internal_kv import _internal_kv_list

    try:
        keys = _internal_kv_list(KV_PREFIX, namespace=KV_NAMESPACE)
        return [(k.decode() if isinstance(k, bytes) else k)[len(KV_PREFIX):] for k in keys]
    except Exception:  # noqa: BLE001 - no list: no warm-up
        return []


def note_registered(run_id: str, on: bool) -> None:
    """A seat lists its run in the KV store (``on``) or takes it out at the end (best effort)."""
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    try:
        if on:
            _internal_kv_put(KV_PREFIX + run_id, b"1", overwrite=True, namespace=KV_NAMESPACE)
        else:
            _internal_kv_del(KV_PREFIX + run_id, namespace=KV_NAMESPACE)
    except Exception:  # noqa: BLE001
        pass


def coordinator(ray):
    """The cluster's coordinator actor: the running one, or a new one (``get_if_exists``)."""
    actor = ray.remote(CoordinatorActor)
    extra = {}
    try:  # on the head node: a coordinator on a worker would keep the autoscaler from removing that node
        if any(HEAD in n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")):
            extra["resources"] = {HEAD: 0.001}
    except Exception:  # noqa: BLE001
        pass
    return actor.options(name=NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
                         max_concurrency=1, **extra).remote()


def find(ray):
    """The running coordinator, or None (``kbatch jobs`` must not start one)."""
    try:
        return ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        return None


__all__ = ["Coordinator", "CoordinatorActor", "coordinator", "find", "NAME", "NAMESPACE", "RUNNING", "EPS"]
