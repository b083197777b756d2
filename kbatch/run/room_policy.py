"""Room for a starved stage: a stage with work ahead and no replica placed, while no node has room for it.

Stages share the cluster's GPUs and CPUs, and Ray places whichever actor asks first. When a prior dies with
its node, the decoders of an ``auto`` pool may already have taken the room it needs (their target was
counted while the dead node still looked alive, or a fixed pool's surplus replica was waiting for the next
free GPU). Without this policy the prior would wait for ``placement_timeout`` and the run end with nothing
wrong with the cluster. With it, once the stage has waited ``grace`` seconds, every other stage that asks
for the same resources

* stops growing, and drops its replicas that are not placed yet (they compete for the same room);
* gives up one running replica (drained: it finishes its batches first) if it has more than one, at most
  one replica every ``grace`` seconds, until the starved stage has a replica placed.

Starved means the replicas of the other stages, where their nodes are known, fill every alive node: a
replica of the stage that is merely slow to start its process (it holds its resources before it can say
where it is) is not starved. A stage with one replica left never gives it up: two stages that cannot both
fit end the run through ``placement_timeout`` (exit 3, naming what was asked and what the cluster has).
"""
from __future__ import annotations

import logging
from typing import Callable

from kbatch.run.replicas import fits
from kbatch.run.stage_pool import STOPPED, StagePool

log = logging.getLogger("kbatch")

GRACE = 5.0  # seconds a stage waits for room before the others make some


def _competes(starved: dict[str, float], other: dict[str, float]) -> bool:
    """Whether ``other``'s replicas hold what ``starved`` lacks: GPUs if it asks for any, else CPUs."""
    key = "GPU" if starved.get("GPU", 0.0) > 0 else "CPU"
    return starved.get(key, 0.0) > 0 and other.get(key, 0.0) > 0


class Room:
    def __init__(self, grace: float = GRACE):
        self.grace = grace
        self.since: dict[str, float] = {}  # starved pool's name -> since when
        self.last_drain = -float("inf")
        self.held: set[str] = set()  # pools that must not grow now

    @staticmethod
    def taken_by_others(pool: StagePool, pools: list[StagePool], capacity: Callable[[], dict[str, dict]]) -> bool:
        """Whether the replicas of the other stages whose node is known fill every alive node, for ``pool``'s
        ask. (A replica of ``pool`` still starting its process also leaves no room free, but then what the
        others hold leaves room: that is a slow start, not a starved stage.) No alive node that could hold
        one even empty (GPU nodes an autoscaler has yet to launch): nothing the others could free."""
        left = {node: dict(res) for node, res in capacity().items()}
        if not any(fits(pool.demand, res) > 0 for res in left.values()):
            return False
        for o in pools:
            if o is pool:
                continue
            for r in o.all.values():
                if r.node in left and r.holds_room:
                    for k, v in o.demand.items():
                        left[r.node][k] = left[r.node].get(k, 0.0) - v
        return not any(fits(pool.demand, res) > 0 for res in left.values())

    def starved(self, pool: StagePool, pools: list[StagePool], needs: bool, room_for: Callable[[dict], bool],
                capacity: Callable[[], dict[str, dict]]) -> bool:
        return (needs and not pool.broken and bool(pool.pending()) and not pool.has_placed()
                and not room_for(pool.demand) and self.taken_by_others(pool, pools, capacity))

    def step(self, now: float, pools: list[StagePool], needs: Callable[[StagePool], bool],
             room_for: Callable[[dict], bool], capacity: Callable[[], dict[str, dict]]) -> None:
        """Once per tick, before the pools scale (``grows(pool)`` then says whether one may grow).
        ``room_for(demand)``: some alive node has it free now; ``capacity()``: alive node id -> its resources
        (read only for a stage that looks starved)."""
        self.held = set()
        for s in pools:
            if not self.starved(s, pools, needs(s), room_for, capacity):
                self.since.pop(s.name, None)
                continue
            since = self.since.setdefault(s.name, now)
            if now - since < self.grace:
                continue
            for o in pools:
                if o is s or not _competes(s.demand, o.demand):
                    continue
                self.held.add(o.name)
                for r in [r for r in o.pending() if not r.placed]:
                    o.remove(r, STOPPED)
                running = o.running()
                draining = any(r.state == "draining" for r in o.all.values())
                if len(running) > 1 and not draining and now - self.last_drain >= self.grace:
                    self.last_drain = now
                    log.warning("kbatch: no node has room for a %s replica (asks %s) and none is placed: stopping "
                                "one of %d %s replicas to make room", s.name, s.demand, len(running), o.name)
                    o.drain_least_loaded(1)

    def grows(self, pool: StagePool) -> bool:
        return pool.name not in self.held
