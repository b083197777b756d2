"""What kbatch runs sharing one Ray cluster tell each other (docs/clusters.md): plain dataclasses, no Ray.

A driver sends its :class:`JobDemand` to the cluster's coordinator on every heartbeat
(``kbatch.cluster.seat``); the coordinator answers with the run's :class:`Allotment` (``kbatch.cluster.allotment``
decides the amounts); ``kbatch jobs`` shows one :class:`JobRow` per registered run. The state lives in the
drivers: a new coordinator learns every run again from their next heartbeats.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

QUEUED = "QUEUED"
RUNNING = "RUNNING"
DRAINING = "DRAINING"
CANCELLING = "CANCELLING"
STATES = (QUEUED, RUNNING, DRAINING, CANCELLING)


@dataclass
class JobDemand:
    """What a driver tells the coordinator on every heartbeat."""

    run_id: str
    output: str
    priority: int = 0
    weight: float = 1.0
    resource: str = "GPU"  # "GPU", or "CPU" for CPU-only layouts
    unit: float = 1.0  # resource one replica asks: the smallest step of its allotment
    can_use: float = math.inf  # most it could use now (stage limits, fixed replicas, the tail)
    held: float = 0.0  # resource its placed replicas hold now
    asked: float = 0.0  # resource all its replicas ask, pending ones too (an upper bound of what it holds)
    rows_total: int = 0
    rows_done: int = 0
    img_s: float | None = None
    eta_s: float | None = None
    started_at: float = 0.0  # registration time: queue order within a level, earliest first
    draining: bool = False  # the driver is giving back replicas (held > allotted)
    ttl_s: float = 15.0  # the registration expires this long after the last heartbeat
    minimum: float = 0.0  # the least it can run with (one prior + one decoder replica); 0: one `unit`
    allotted: float | None = None  # the allotment it holds now (a new coordinator keeps it while it learns)
    overhead: float = 0.0  # resource it holds outside its allotment (writers, input loading: CPU layouts)
    cluster: float | None = None  # the driver's view of the resource the cluster can become (alive nodes
    # + nodes its autoscaler can still add); the coordinator divides the largest recent one

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Allotment:
    """What the coordinator answers a heartbeat: the run's share of the cluster."""

    run_id: str
    amount: float  # of the demand's `resource`; 0 -> QUEUED
    state: str  # QUEUED | RUNNING | DRAINING | CANCELLING
    queue_position: int | None = None  # 1-based among queued runs, None when running
    ahead: list[str] = field(default_factory=list)  # runs ahead of this one
    capacity: float = 0.0  # the resource kbatch runs may use (after non-kbatch usage)
    cancel: bool = False  # `kbatch cancel` asked this run to stop
    coordinator_epoch: int = 0
    handing_over: float = 0.0  # what other runs hold above their allotments (draining): placement waits for it

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class JobRow:
    """One line of ``kbatch jobs``."""

    run_id: str
    output: str
    priority: int
    weight: float
    state: str
    resource: str
    held: float
    allotted: float
    rows_done: int
    rows_total: int
    img_s: float | None
    eta_s: float | None
    queue_position: int | None
    ahead: list[str]
    last_seen_s: float

    def to_dict(self) -> dict:
        return asdict(self)
