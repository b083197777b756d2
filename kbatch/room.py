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

A stage with one replica left never gives it up: two stages that cannot both fit end the run through
``placement_timeout`` (exit 3, naming what was asked and what the cluster has).
"""
from __future__ import annotations

import logging
from typing import Callable

from .pool import STOPPED, StagePool

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

    def starved(self, pool: StagePool, needs: bool, room_for: Callable[[dict], bool]) -> bool:
        return (needs and not pool.broken and bool(pool.pending()) and not pool.has_placed()
                and not room_for(pool.demand))

    def step(self, now: float, pools: list[StagePool], needs: Callable[[StagePool], bool],
             room_for: Callable[[dict], bool]) -> None:
        """Once per tick, before the pools scale (``grows(pool)`` then says whether one may grow)."""
        self.held = set()
        for s in pools:
            if not self.starved(s, needs(s), room_for):
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
                    victim = min(running, key=lambda r: (r.load, -r.seq))
                    log.warning("kbatch: no node has room for a %s replica (asks %s) and none is placed: stopping "
                                "one of %d %s replicas to make room", s.name, s.demand, len(running), o.name)
                    o.drain(victim)

    def grows(self, pool: StagePool) -> bool:
        return pool.name not in self.held
