"""What travels through a run: a batch of rows (``Unit``), a queue of them that counts its images, and a call
in flight (``Call``). Shared by the dispatch (which makes and sends them) and the outcomes (which settle them)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kbatch.plan.planner import images
from kbatch.run.shards import Shard
from kbatch.run.stage_pool import Replica, StagePool
from kbatch.schema.rows import Row


class StageFailed(RuntimeError):
    """A stage cannot go on (cannot be placed, cannot start, keeps dying): the run ends incomplete."""


@dataclass(eq=False)
class Unit:
    """A batch of rows on its way through the stages."""

    rows: list[Row]
    attempts: int = 0  # charged tries (crashes of a single row)
    inputs: list = field(default_factory=list)  # refs of input maps (decoded images) from loading tasks
    priors: list = field(default_factory=list)  # refs of prior payloads (decoder batches)
    extra: dict = field(default_factory=dict)  # per row id: manifest cells (stage prior) / stored location
    free_retries: int = 0
    node_losses: int = 0
    token: str = ""  # names this submission; the actor notes it in Ray's KV store while it runs it
    solo: bool = False  # its worker died while it ran beside other batches (lanes): rerun it alone
    weight: int = 1  # load it puts on its replica while in flight (a solo unit fills the replica)

    @property
    def images(self) -> int:
        return images(self.rows)


class UnitQueue(deque):
    """A deque of units that keeps the count of their images (the bounds read it on every dispatch)."""

    def __init__(self):
        super().__init__()
        self.images = 0

    def append(self, unit: Unit) -> None:
        super().append(unit)
        self.images += unit.images

    def appendleft(self, unit: Unit) -> None:
        super().appendleft(unit)
        self.images += unit.images

    def popleft(self) -> Unit:
        unit = super().popleft()
        self.images -= unit.images
        return unit


@dataclass
class Call:
    """One remote call in flight: what it was for, on which replica, with which payload ref."""

    kind: str  # ready | probe | load | prior | decoder | write
    unit: Unit | None = None
    replica: Replica | None = None
    pool: StagePool | None = None
    shard: Shard | None = None
    payload: object = None  # the payload ref of a prior/decoder call, the inputs ref of a load


def needs_inputs(r: Row) -> bool:
    """Whether a row has input images (init image, mask, mix images) that a loading task must decode."""
    return (r.init_image is not None or r.mask is not None
            or any(it.image is not None or it.image_uri is not None for it in r.mix))
