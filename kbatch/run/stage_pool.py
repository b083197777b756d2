"""Stage pools: the actors of one stage, their load, their placement and their deaths.

A pool never waits for an actor. Each replica is *pending* (asked for; maybe not placed, maybe loading its
models) until its ``ready()`` call returns, then *running*; only running replicas get work. A pending
replica notes its node in Ray's KV store as the first thing it does (``workers.note_placed``), so the pool
can tell "loading" from "the cluster has no room for it": a stage with no replica placed or running for
``resources.placement_timeout`` seconds ends the run, naming what it asked for and what the cluster has.

Deaths are classified before anyone is charged (``Death``): a replica whose node died (spot preemption, a
node removed) costs nothing; a process that died on a live node (a row crashed it, OOM) is charged to the
batches it was running. ``replicas: auto`` sets the target from the cluster's alive nodes at every tick, so
the pool grows when nodes join and shrinks when they leave; a fixed ``replicas: N`` replaces what it loses.

A replica above the target (``auto`` after a node count that overshot, or one stopped to make room for a
starved stage: ``kbatch.run.room_policy``, or to give GPUs back to another run of a shared cluster:
``kbatch.run.share``) is *draining*: it gets no new work and is stopped when its last batch ends.

Picking a replica for a batch costs O(max load), not O(replicas): running replicas sit in buckets by load.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from kbatch.run.balance import Speed
from kbatch.run.replicas import fits

log = logging.getLogger("kbatch")

NODE, CRASH, STOPPED = "node", "crash", "stopped"  # why a replica is gone


@dataclass(eq=False)
class Replica:
    handle: object
    slot: str  # KV key: where it notes its node and the batches it runs
    seq: int
    created: float
    limit: int  # batches in flight at once (lanes + queued)
    state: str = "pending"  # pending | running | suspect | draining | dead
    node: str | None = None  # node id (hex), once known
    placed: bool = False  # its process started (it noted its node), even if its models still load
    worker: str = ""  # "node:.../gpu:.../pid:..." from ready()
    load: int = 0
    death: str | None = None  # NODE | CRASH | STOPPED
    cause: str = ""  # the error it died with
    limbo: list = field(default_factory=list)  # calls that failed while its fate was unknown
    probing: bool = False

    @property
    def holds_room(self) -> bool:
        """It holds its resources on a node: running (or suspect, draining), or its process started."""
        return self.placed or self.state in ("running", "suspect", "draining")


class NodeTable:
    """Which nodes are alive, from ``ray.nodes()``, refreshed at most every ``every`` seconds."""

    def __init__(self, ray, every: float = 1.0):
        self.ray, self.every = ray, every
        self.alive: dict[str, dict] = {}  # node id -> its entry (Resources, NodeManagerAddress, ...)
        self.dead: set[str] = set()
        self._unreported: set[str] = set()  # died at a forced read: the next refresh() still reports them
        self.at = -math.inf
        self._free: dict[str, dict] = {}  # node id -> free resources (room_for)
        self._free_at = -math.inf
        self.scaler = None  # kbatch.run.autoscaler.Autoscaler: the nodes the autoscaler can add (build_stages)

    def can_become(self) -> list[dict]:
        """The alive nodes, and the nodes the autoscaler can still add (``"Virtual": True`` entries): what
        the layout and the ``auto`` targets size the job for. Without an autoscaler: the alive nodes."""
        alive = list(self.alive.values())
        return alive + (self.scaler.can_add(alive) if self.scaler is not None else [])

    def refresh(self, force: bool = False) -> set[str]:
        """Re-read the table (at most every ``every`` s unless ``force``); returns the nodes that died since
        the last refresh that returned any. A forced read (a call failed: is its node gone?) keeps what it
        found for the next one, so the driver's tick still redoes the dead node's work."""
        now = time.monotonic()
        if not force and now - self.at < self.every:
            return set()
        self.at = now
        alive = {}
        for n in self.ray.nodes():
            if n.get("Alive"):
                alive[n["NodeID"]] = n
            else:
                self.dead.add(n["NodeID"])
        self._unreported |= set(self.alive) - set(alive)
        self.alive = alive
        if force:
            return set()
        newly_dead, self._unreported = self._unreported, set()
        return newly_dead

    def is_dead(self, node: str | None) -> bool:
        return node is not None and node in self.dead

    def room_for(self, demand: dict[str, float]) -> bool:
        """Whether some alive node has ``demand`` free right now (Ray places a replica there at once), or the
        autoscaler is launching a node that holds it (a boot is not a cluster too small: placement_timeout
        and the room policy wait for it)."""
        if self.scaler is not None and self.scaler.starting_for(demand):
            return True
        now = time.monotonic()
        if now - self._free_at >= self.every:
            self._free_at = now
            try:
                from ray._private.state import available_resources_per_node

                self._free = available_resources_per_node()
            except Exception:  # noqa: BLE001 - a private Ray API: without it, never claim room
                self._free = {}
        return any(fits(demand, free) > 0 for node, free in self._free.items() if node in self.alive)

    def capacity(self) -> dict[str, dict]:
        """Alive node id -> its resources (totals, not what is free)."""
        return {node: n.get("Resources", {}) for node, n in self.alive.items()}

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for n in self.alive.values():
            for k, v in n.get("Resources", {}).items():
                out[k] = out.get(k, 0.0) + v
        return out


class StagePool:
    """The replicas of one stage (``name``: prior | decoder | writer).

    ``factory(slot)`` creates one actor (a Ray actor handle, or an in-driver stand-in). ``demand``: what one
    replica asks of a node ({"CPU": .., "GPU": ..}). ``replicas``: a number, or "auto" with
    ``target_fn()`` giving the number the cluster can hold now (``kbatch.run.replicas``, and for the prior
    beside the decoders ``kbatch.run.balance``). ``lanes``: batches one replica runs at once (its
    ``concurrency``), for its measured speed."""

    def __init__(self, name: str, factory: Callable[[str], object], demand: dict[str, float], replicas, *,
                 limit: int, run_id: str, target_fn: Callable[[], int] | None = None, max_start_failures: int = 3,
                 max_crashes: int = 8, kill: Callable[[object], None] | None = None, lanes: int = 1):
        self.name, self.factory, self.demand, self.replicas = name, factory, demand, replicas
        self.limit, self.run_id, self.target_fn = limit, run_id, target_fn
        self.max_start_failures, self.max_crashes = max_start_failures, max_crashes
        self.kill = kill or (lambda handle: None)
        self.all: dict[int, Replica] = {}  # seq -> replica (pending, running, suspect)
        self._buckets: list[dict[Replica, None]] = [{} for _ in range(limit + 1)]  # running, by load
        self._seq = 0
        self.start_failures = 0  # in a row, without a replica starting in between
        self.crashes = 0  # process deaths in a row, without a batch finishing in between
        self.last_error = ""  # why the last replica could not start / died
        self.started = 0  # replicas ever running
        self.lost_to_nodes = 0
        self.drained = 0  # replicas stopped above the target or to make room for another stage
        self.unplaced_since: float | None = None  # since when nothing of this stage is placed (checks)
        self.broken: str | None = None  # set when the stage cannot go on: the run ends (exit 3)
        self.lanes = lanes
        # replicas the work left can use (the driver's count of batches ahead of the stage; None: not known
        # yet): an auto pool's target never exceeds it, so near the tail pending replicas stop asking the
        # autoscaler for nodes and idle ones drain, letting their nodes go
        self.work_cap: Callable[[], int | None] | None = None
        # seconds per image of one replica, measured, per stage it runs (a colocated pool runs two)
        self.speeds: dict[str, Speed] = {name: Speed(lanes)}
        # on a cluster shared by kbatch runs, whether this run is QUEUED (allotment 0: no replica at all,
        # whatever ``replicas`` says; kbatch.run.share). None: a run alone
        self.queued: Callable[[], bool] | None = None

    # -- size --------------------------------------------------------------------------------------------
    @property
    def target(self) -> int:
        if self.queued is not None and self.queued():
            return 0
        if self.replicas == "auto":
            n = max(1, self.target_fn() if self.target_fn else 1)
            cap = self.work_cap() if self.work_cap is not None else None
            return n if cap is None else max(1, min(n, cap))
        return int(self.replicas)

    def running(self) -> list[Replica]:
        return [r for r in self.all.values() if r.state == "running"]

    def n_running(self) -> int:
        return sum(len(b) for b in self._buckets)

    def pending(self) -> list[Replica]:
        return [r for r in self.all.values() if r.state == "pending"]

    def staying(self) -> list[Replica]:
        """Replicas that count towards the target: all but the dead and the draining."""
        return [r for r in self.all.values() if r.state not in ("dead", "draining")]

    def has_placed(self) -> bool:
        """Some replica holds its resources on a node (running, or its process started)."""
        return any(r.holds_room for r in self.all.values())

    def scale(self, now: float | None = None, grow: bool = True) -> list[Replica]:
        """Create replicas up to the target (after start failures: none, until one starts; ``grow`` False:
        none, another stage needs the room); above it (auto, when the node count overshot or nodes left),
        drop pending replicas, newest first, then drain running ones, least loaded first. Returns the new
        replicas: the caller tracks their ready()."""
        new = []
        if self.broken:
            return new
        target = self.target
        alive = self.staying()
        if self.start_failures and self.n_running() == 0 and len(alive) > 0:
            return new  # one attempt at a time while replicas fail to start
        while grow and len(alive) + len(new) < target:
            if self.start_failures >= self.max_start_failures:
                break
            new.append(self._create(now or time.monotonic()))
            if self.start_failures:
                break
        extra = len(alive) - target
        for r in sorted(self.pending(), key=lambda r: -r.seq):
            if extra <= 0:
                break
            self.remove(r, STOPPED)
            extra -= 1
        self.drain_least_loaded(extra)
        return new

    def drain_least_loaded(self, n: int) -> None:
        """Drain the ``n`` least loaded running replicas (the newest first among equals)."""
        for r in sorted(self.running(), key=lambda r: (r.load, -r.seq))[:max(0, n)]:
            self.drain(r)

    def drain(self, r: Replica) -> None:
        """No new work for ``r``; it stops when its batches in flight end (now, if it has none)."""
        if r.state != "running":
            return
        self._unbucket(r)
        r.state = "draining"
        self.drained += 1
        log.info("kbatch: stopping a %s replica (%s) when its %d batch(es) in flight end", self.name,
                 r.worker or r.slot, r.load)
        if r.load == 0:
            self.remove(r, STOPPED)

    def _create(self, now: float) -> Replica:
        self._seq += 1
        slot = f"{self.run_id}/{self.name}/{self._seq}"
        r = Replica(self.factory(slot), slot, self._seq, now, self.limit)
        self.all[r.seq] = r
        return r

    # -- state changes -------------------------------------------------------------------------------------
    def on_ready(self, r: Replica, info: dict) -> None:
        if r.state == "dead":
            return
        r.state, r.placed = "running", True
        r.node = info.get("node") or r.node
        r.worker = info.get("worker", "")
        self.start_failures = 0
        self.started += 1
        self._bucket(r, None)

    def on_placed(self, r: Replica, node: str) -> None:
        r.placed, r.node = True, node

    def start_failed(self, r: Replica, cause: str) -> None:
        """Its ``__init__`` raised (models that will not load): not a row's fault; after
        ``max_start_failures`` in a row with nothing running, the stage is broken."""
        self.start_failures += 1
        self.last_error = cause
        self.remove(r, CRASH)
        if self.start_failures >= self.max_start_failures and self.n_running() == 0:
            self.broken = (f"{self.name} workers cannot start ({self.start_failures} tries): {cause}")

    def suspect(self, r: Replica) -> None:
        """A call failed and the replica's fate is being found out: no new work meanwhile."""
        if r.state == "running":
            self._unbucket(r)
        if r.state not in ("dead", "draining"):
            r.state = "suspect"

    def revive(self, r: Replica) -> None:
        if r.state == "suspect":
            r.state = "running"
            self._bucket(r, None)

    def lost(self, r: Replica, why: str, cause: str = "") -> None:
        """``r`` died: NODE (its node is gone: free) or CRASH (its process died on a live node)."""
        if r.death is not None:
            return
        if why == NODE:
            self.lost_to_nodes += 1
        else:
            self.crashes += 1
            self.last_error = cause or self.last_error
            if self.crashes > self.max_crashes:
                self.broken = (f"{self.name} workers keep dying: {self.crashes} crashes in a row without a "
                               f"finished batch (retries.max_actor_restarts = {self.max_crashes}); last: "
                               f"{self.last_error}")
        self.remove(r, why)

    def remove(self, r: Replica, why: str) -> None:
        if r.state == "running":
            self._unbucket(r)
        r.state, r.death = "dead", r.death or why
        self.all.pop(r.seq, None)
        self.kill(r.handle)

    @property
    def speed(self) -> Speed:
        """This pool's stage's measured seconds per image per replica (``kbatch.run.balance``)."""
        return self.speeds[self.name]

    def on_success(self, images: int = 0, seconds: float = 0.0, stage: str | None = None) -> None:
        """A batch finished (its rows may still have failed): the crash streak ends. ``images`` made in
        ``seconds`` of the replica's own time (``Status.seconds``) feed the measured speed of ``stage``
        (default: the pool's; a colocated pool runs the prior's batches too)."""
        self.crashes = 0
        stage = stage or self.name
        if stage not in self.speeds:
            self.speeds[stage] = Speed(self.lanes)
        self.speeds[stage].add(images, seconds)

    def stop(self) -> None:
        for r in list(self.all.values()):
            self.remove(r, STOPPED)

    # -- load ----------------------------------------------------------------------------------------------
    def pick(self, solo: bool = False) -> Replica | None:
        """The least loaded running replica with room; ``solo``: only an idle one."""
        top = 1 if solo else self.limit
        for load in range(top):
            bucket = self._buckets[load]
            if bucket:
                return next(iter(bucket))
        return None

    def add_load(self, r: Replica, n: int) -> None:
        old = r.load
        r.load += n
        if r.state == "running":
            self._bucket(r, old)

    def drop_load(self, r: Replica, n: int) -> None:
        old = r.load
        r.load = max(0, r.load - n)
        if r.state == "running":
            self._bucket(r, old)
        elif r.state == "draining" and r.load == 0:
            self.remove(r, STOPPED)

    def _bucket(self, r: Replica, old: int | None) -> None:
        if old is not None and old < len(self._buckets):
            self._buckets[old].pop(r, None)
        if r.load < len(self._buckets):
            self._buckets[r.load][r] = None

    def _unbucket(self, r: Replica) -> None:
        if r.load < len(self._buckets):
            self._buckets[r.load].pop(r, None)

    # -- placement -----------------------------------------------------------------------------------------
    def placement_check(self, now: float, timeout: float, describe: Callable[[], str],
                        room: Callable[[dict], bool] = lambda demand: False) -> None:
        """Track how long the stage has had no replica placed or running while no node had room for one
        (``room(demand)``: a replica still starting its process is not a cluster too small); past
        ``timeout``: broken."""
        if self.has_placed() or room(self.demand):
            self.unplaced_since = None
            return
        if self.unplaced_since is None:
            self.unplaced_since = now
        elif now - self.unplaced_since > timeout and not self.broken:
            self.broken = (f"no {self.name} replica could be placed in {timeout:.0f} s (resources.placement_timeout): "
                           f"{describe()}")
