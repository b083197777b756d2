"""A run's seat at the cluster's table (docs/clusters.md): the driver side of the coordinator.

:class:`Seat` registers the run with the cluster's coordinator (``kbatch.cluster.coordinator``: created by
this call when none runs), then sends its :class:`~kbatch.cluster.state.JobDemand` every ``EVERY`` seconds
from a thread of its own and keeps the answer (:attr:`Seat.allotment`) for the driver's loop to read.

* **The coordinator gone** (killed, its node lost): the seat keeps the last allotment (the run never stops
  for it) and the next heartbeat creates a new coordinator (``get_if_exists``), which learns the run again.
* **The driver gone** (SIGKILL): no more heartbeats; the coordinator drops the registration after its
  ``ttl_s`` and the run's share goes to the others.
* **The end**: :meth:`Seat.close` deregisters (the share goes back at once).
* **Cancelled** (``kbatch cancel``): the answer says ``cancel``; the driver stops as on SIGTERM
  (:class:`RunCancelled`).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time

from kbatch.cluster.coordinator import coordinator, note_registered
from kbatch.cluster.state import QUEUED, Allotment, JobDemand

log = logging.getLogger("kbatch")

EVERY = 2.0  # seconds between heartbeats
CALL_TIMEOUT = 10.0  # seconds a heartbeat may take before the coordinator counts as gone
FIRST_TIMEOUT = 60.0  # seconds the registration may take (a new coordinator's process starts)


class RunCancelled(Exception):
    """``kbatch cancel`` asked this run to stop (it stops as on SIGTERM: committed shards kept, resumable)."""


class Seat:
    def __init__(self, ray, demand: JobDemand, every: float = EVERY, call_timeout: float = CALL_TIMEOUT):
        self.ray, self.every, self.call_timeout = ray, every, call_timeout
        self.demand = dataclasses.replace(demand, started_at=demand.started_at or time.time())
        self.allotment: Allotment | None = None
        self.epoch: int | None = None  # the coordinator's, as last answered
        self.coordinators = 0  # coordinators this run registered with (1 + restarts seen)
        self.failures = 0  # heartbeats without an answer in a row
        self._actor = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --------------------------------------------------------------------------------------- the driver
    def start(self) -> Allotment | None:
        """Register (one heartbeat, waited for) and start the heartbeat thread. None: no coordinator
        answered; the run goes on alone (the whole cluster) and keeps trying."""
        note_registered(self.demand.run_id, True)
        t0 = time.monotonic()
        for _ in range(3):  # a coordinator that was just ending (idle): ask again, a while at most
            self.beat(timeout=FIRST_TIMEOUT)
            if self.allotment is not None or time.monotonic() - t0 > FIRST_TIMEOUT / 2:
                break
            time.sleep(0.5)
        self._thread = threading.Thread(target=self._loop, name="kbatch-seat", daemon=True)
        self._thread.start()
        return self.allotment

    def update(self, **fields) -> None:
        """New values for the next heartbeat's demand (the driver's tick)."""
        with self._lock:
            self.demand = dataclasses.replace(self.demand, **fields)

    @property
    def amount(self) -> float | None:
        """The run's allotment now, or None while no coordinator ever answered (the whole cluster)."""
        a = self.allotment
        return None if a is None else a.amount

    @property
    def queued(self) -> bool:
        """Allotment 0 (QUEUED, or DRAINING down to nothing): the run holds no replica at all."""
        a = self.allotment
        return a is not None and (a.state == QUEUED or a.amount <= 1e-9)

    def close(self) -> None:
        """Stop heartbeating and deregister (best effort: a dead coordinator forgets the run by its ttl)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.call_timeout + 1)
        try:
            if self._actor is not None:
                self.ray.get(self._actor.deregister.remote(self.demand.run_id), timeout=self.call_timeout)
        except Exception as e:  # noqa: BLE001
            log.debug("kbatch: deregistering from the coordinator failed: %s", e)
        note_registered(self.demand.run_id, False)

    # ------------------------------------------------------------------------------------------ the beat
    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.beat()

    def beat(self, timeout: float | None = None) -> None:
        with self._lock:
            demand = dataclasses.replace(self.demand, allotted=self.amount)
        try:
            if self._actor is None:
                self._actor = coordinator(self.ray)
            a = self.ray.get(self._actor.heartbeat.remote(demand), timeout=timeout or self.call_timeout)
        except Exception as e:  # noqa: BLE001 - the coordinator died or hangs: keep the last allotment
            self.failures += 1
            if self.failures == 1:
                log.warning("kbatch: the cluster's coordinator did not answer (%s: %s); keeping this run's "
                            "allotment (%s) and registering with a new one", type(e).__name__, str(e)[:200],
                            self.amount)
            self._actor = None  # the next beat finds (or creates) the coordinator again
            return
        self.failures = 0
        if a.coordinator_epoch != self.epoch:
            self.coordinators += 1
            if self.epoch is not None:
                log.warning("kbatch: registered with a new coordinator (the old one is gone); allotment %g",
                            a.amount)
            self.epoch = a.coordinator_epoch
        self.allotment = a
