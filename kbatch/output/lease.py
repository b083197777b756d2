"""One run per output location, fenced: the lease protocol on ``<output>/_lease.json``.

Promises (docs/output.md, "The lease"; docs/faults.md): a second run on an output that a live run holds exits
2 naming the holder; the holder of a run that died does not block its rerun; a run that lost its lease writes
nothing more and exits 3. Every write goes through the output's conditional store
(``kbatch.storage.conditional``: read with version, create-if-absent, replace-if-version, delete-if-version):
no code here knows which store it is.

**Holding.** A run :meth:`Lease.acquire`\\ s the lease before it writes anything and renews it from then on
until its last byte is written, from a background thread (:meth:`Lease.start_renewing`, every ``ttl / 4``):
each renewal is one replace-if-version of the object as this run last wrote it. A storage error in a renewal
is retried until the lease has gone ``ttl`` without one; then, or when the object is no longer this run's,
the lease is *lost*: :attr:`Lease.lost` says why and :meth:`Lease.check` raises :class:`LeaseLost`.

**Taking over.** Each acquisition has its own random ``token`` and an ``epoch`` one above the record it
replaced. A contender takes a lease over at once when it was *released* (``state: released``) or its holder
ran on this machine and its process is gone (``kbatch.output.liveness``); otherwise only after *watching*
it unchanged for the holder's ttl on its own monotonic clock (the storage's timestamp only decides whether it
is worth watching, never whether to take it). The takeover is a replace-if-version of exactly the object that
was watched, so the old holder's own replaces fail from then on.

**The lease is never deleted.** Releasing writes ``state: released`` (after aborting this run's shards still
in flight); the epoch therefore only grows, and a commit record's epoch orders it against every takeover.

**Durable takeover.** The record a takeover writes carries ``aborting``: the shards of the old holder's
intents (``kbatch.output.intents``, listed before the swap) plus whatever an earlier, unfinished takeover
carried. After the swap the new holder lists the intents again, aborts every listed and carried shard
(``kbatch.output.commits.abort``), removes the intents and only then clears ``aborting`` (another
replace-if-version). A takeover interrupted anywhere (its swap answered 500 and retried into 412, an error or
a SIGKILL during the aborts) leaves ``aborting`` in the record: this run finishes it when it finds the record
its own, and any later acquirer carries it over and finishes it, before the output is read.

**Overwrite.** ``--overwrite`` marks the record ``overwriting`` before it removes anything and clears it when
done (``kbatch.output.overwrite``); a run that takes over a record still marked finishes the overwrite first.

**Writers** never write the lease: a shard in flight is an intent object, and a writer checks the lease (a
read) after creating its intent and before creating its commit record (``kbatch.output.fence``).
``_job.json`` and ``_SUCCESS`` are written through :meth:`Lease.write` / :meth:`Lease.remove`
(``kbatch.output.markers``: conditional on the version this run last saw, after a lease check).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kbatch import storage
from kbatch.config import ConfigError
from kbatch.output import intents
from kbatch.output.liveness import (dead_reason, describe, iso, looks_recent, machine, process_start, to_float,
                                    ttl_of)
from kbatch.storage import dumps_json
from kbatch.storage.conditional import PreconditionFailed, Versioned

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
DEFAULT_TTL = 120.0
HELD, RELEASED = "held", "released"
TAKEOVER_REASON = "lease taken over"  # in abort records: a writer that meets one raises Fenced
_ATTEMPTS = 20  # acquire retries after losing a compare-and-swap; each loss means another run made progress
_UPDATE_ATTEMPTS = 20  # a holder's own update: only a lost answer or a byte-equal rewrite makes it retry

# names kept importable from here (older callers and tests)
_machine = machine
__all__ = ["Lease", "LeaseHeld", "LeaseLost", "LeaseUnsupported", "Fenced", "read_lease", "dead_reason",
           "looks_recent", "describe", "LEASE_NAME", "DEFAULT_TTL"]


def _now() -> float:
    return time.time()


class LeaseHeld(ConfigError):
    """Another live run holds the output (exit 2). The message names the holder and the lease path."""

    def __init__(self, message: str, holder: dict | None = None, path: str = ""):
        super().__init__(message)
        self.holder = holder
        self.path = path

    def __reduce__(self):
        return (type(self), (str(self), self.holder, self.path))


class LeaseUnsupported(ConfigError):
    """The output's store cannot make the lease atomic (exit 2): kbatch refuses rather than risk two runs."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (or released, or could not be renewed within its ttl): the run must
    stop writing. The message names the new holder when there is one."""


class Fenced(LeaseLost):
    """A write refused because the run it belongs to no longer holds the output's lease."""


def open_store(root: str, storage_options: dict | None = None):
    """The output's conditional store; :class:`LeaseUnsupported` (exit 2) where there is none."""
    try:
        return storage.conditional_store(root, storage_options)
    except storage.Unsupported as e:
        raise LeaseUnsupported(f"output {root}: kbatch cannot make the output lease and the shard commits "
                               f"atomic there ({e}), so two runs could both write this output") from None


def parse(seen: Versioned | None) -> dict | None:
    """The lease record, or None for a missing / corrupt / half-written / foreign object."""
    obj = None if seen is None else seen.json_object()
    return obj if obj is not None and obj.get("token") else None


def holds(record: dict | None, token: str) -> bool:
    """``record`` is held (not released) under ``token``."""
    return bool(record) and record.get("token") == token and record.get("state", HELD) != RELEASED


def _last_job(store) -> str:
    """Who wrote the output's ``_job.json`` last (names the run that took over and has since ended)."""
    try:
        seen = store.read("_job.json")
        job = json.loads(seen.data.decode("utf-8"))
        return f" (the output's _job.json was last written by run {job.get('run_id')!r}, status {job.get('status')})"
    except Exception:  # noqa: BLE001 - only a hint in a message
        return ""


def lost_message(who: str, path: str, seen: Versioned | None, store=None) -> str:
    holder = parse(seen)
    if seen is None:
        now_by = "the lease was removed" + (_last_job(store) if store is not None else "")
    elif holder is not None and holder.get("state") == RELEASED:
        now_by = (f"it was released by run {holder.get('run_id')!r} (epoch {holder.get('epoch')})"
                  + (_last_job(store) if store is not None else ""))
    else:
        now_by = "it is now held by " + describe(holder, seen.modified)
    return f"{who} lost the output lease {path}: {now_by}"


def _shards(value) -> list[str]:
    if isinstance(value, dict):
        value = value.get("shards")
    return [s for s in value or [] if isinstance(s, str)]


def _brief(holder: dict | None) -> dict:
    if holder is None:
        return {"run_id": None}
    return {k: holder.get(k) for k in ("run_id", "host", "pid", "renewed", "epoch")}


@dataclass
class Lease:
    """This run's hold on one output location. Create it with :meth:`acquire`."""

    root: str
    run_id: str
    storage_options: dict | None = field(default=None, repr=False)  # credentials: never in a repr
    ttl: float = DEFAULT_TTL
    token: str = field(default_factory=lambda: secrets.token_hex(16), init=False, repr=False)
    epoch: int = field(default=0, init=False)
    _record: dict = field(default_factory=dict, init=False, repr=False)
    _version: str | None = field(default=None, init=False, repr=False)  # the object as this run last wrote it
    _store: Any = field(default=None, init=False, repr=False)
    _lost: str | None = field(default=None, init=False, repr=False)
    _thread: Any = field(default=None, init=False, repr=False)
    _stop: Any = field(default_factory=threading.Event, init=False, repr=False)
    _last_ok: float = field(default=0.0, init=False, repr=False)
    _mutex: Any = field(default_factory=threading.RLock, init=False, repr=False)
    _markers: Any = field(default=None, init=False, repr=False)
    path: str = field(default="", init=False)  # what users see: a local path or a URL

    def __post_init__(self):
        if not (self.ttl > 0):
            raise ValueError(f"lease ttl must be > 0 seconds, got {self.ttl!r}")
        self._store = open_store(self.root, self.storage_options)
        self.path = f"{self._store.url.rstrip('/')}/{LEASE_NAME}"
        from kbatch.output.markers import Markers

        self._markers = Markers(self._store, self)

    @property
    def store(self):
        """The output's conditional store (``kbatch.storage.conditional``)."""
        return self._store

    @classmethod
    def acquire(cls, root: str, run_id: str, storage_options: dict | None = None,
                ttl: float = DEFAULT_TTL) -> "Lease":
        """Take the lease on ``root`` for ``run_id``; raises :class:`LeaseHeld` while a live run holds it.

        The store is probed first (``kbatch.storage.probe``: it must refuse a second create of one name). A
        lease whose holder may be alive is watched for its ttl (module docstring) before it is taken over with
        a replace-if-version of exactly the object that was watched."""
        lease = cls(root, run_id, storage_options, ttl)
        lease._probe()
        lease._acquire()
        return lease

    def _probe(self) -> None:
        try:
            from kbatch.storage.probe import probe_conditional_writes
        except ImportError:  # pragma: no cover - the probe lands with the storage backends
            return
        probe_conditional_writes(self._store)

    def _fresh_record(self) -> dict:
        me = machine()
        now = _now()
        pid = os.getpid()
        return {"run_id": self.run_id, **me, "pid": pid, "pid_started": process_start(pid), "state": HELD,
                "started": iso(now), "started_epoch": now, "renewed": iso(now), "renewed_epoch": now,
                "renewals": 0, "ttl": self.ttl, "token": self.token, "epoch": 1}

    def _acquire(self) -> None:
        me = machine()
        store = self._store
        for _ in range(_ATTEMPTS):
            record = self._fresh_record()
            seen = store.read(LEASE_NAME)
            holder = parse(seen)
            if holder is not None and holder.get("token") == self.token:
                self._won(seen, holder)  # ours: a write whose answer was lost, retried into a 412
                return
            try:
                if seen is None:
                    record["epoch"] = self._epoch_after_a_lost_lease() + 1
                    carried = [s for s, _, _ in intents.listed(store)]
                    if carried:
                        record["aborting"] = {"shards": sorted(set(carried)),
                                              "reason": f"{TAKEOVER_REASON} (no lease record was left)"}
                    data = dumps_json(record)
                    self._won(Versioned(data, store.create(LEASE_NAME, data)), record)
                    return
                if holder is not None and holder.get("state") == RELEASED:
                    reason = f"run {holder.get('run_id')!r} released it"
                else:
                    reason = dead_reason(holder, me)
                if reason is None:
                    ttl = ttl_of(holder, self.ttl)
                    if looks_recent(holder, seen.modified, ttl, now=_now()):
                        raise LeaseHeld(self._held_message(holder, seen), holder, self.path)
                    reason = self._watch(seen, holder, ttl)
                    if reason is None:  # it went away meanwhile: look again
                        continue
                if holder is None or holder.get("state") != RELEASED:
                    log.warning("taking over the output lease %s from %s: %s", self.path,
                                describe(holder, seen.modified), reason)
                record["took_over"] = {**_brief(holder), "reason": reason,
                                       "released": bool(holder and holder.get("state") == RELEASED)}
                record["epoch"] = int(to_float((holder or {}).get("epoch")) or 0) + 1
                # always carried, even empty: the aborts run after the swap and list the intents again
                carried = (set(_shards((holder or {}).get("aborting"))) | set(_shards((holder or {}).get("open")))
                           | {s for s, _, _ in intents.listed(store)})
                prior = (holder or {}).get("aborting") or {}
                record["aborting"] = {
                    "shards": sorted(carried),
                    "reason": (prior.get("reason") if isinstance(prior, dict) and prior.get("reason")
                               else f"{TAKEOVER_REASON} from run {(holder or {}).get('run_id')!r}")}
                if (holder or {}).get("overwriting"):
                    record["overwriting"] = holder["overwriting"]
                data = dumps_json(record)
                self._won(Versioned(data, store.replace(LEASE_NAME, data, seen.version)), record)
                return
            except PreconditionFailed:
                continue
        seen = store.read(LEASE_NAME)
        raise LeaseHeld(f"could not take the output lease {self.path}: other runs keep changing it "
                        f"(now {describe(parse(seen), seen and seen.modified)})", parse(seen), self.path)

    def _epoch_after_a_lost_lease(self) -> int:
        """The lease object is missing (never taken, or removed by hand): the epoch ``_job.json`` last
        recorded, so that epochs keep growing even then."""
        try:
            seen = self._store.read("_job.json")
            job = json.loads(seen.data.decode("utf-8")) if seen is not None else {}
            return int(to_float(((job or {}).get("lease") or {}).get("epoch")) or 0)
        except Exception:  # noqa: BLE001
            return 0

    def _watch(self, seen: Versioned, holder: dict | None, ttl: float) -> str | None:
        """Watch the lease for ``ttl`` seconds on this machine's monotonic clock. Returns the takeover reason
        when it did not change; None when it disappeared; raises LeaseHeld when it changed (a live holder)."""
        log.warning("kbatch: output lease %s is held by %s and was not written recently by the storage's clock; "
                    "watching it for %.0f s before taking it over", self.path, describe(holder, seen.modified), ttl)
        start = time.monotonic()
        poll = min(2.0, max(0.05, ttl / 20))
        while True:
            left = ttl - (time.monotonic() - start)
            if left <= 0:
                return f"it did not change for {ttl:g} s (its ttl) while this run watched it"
            time.sleep(min(poll, left))
            current = self._store.read(LEASE_NAME)
            if current is None:
                return None
            if current.data != seen.data or current.version != seen.version:
                now_holder = parse(current)
                if now_holder is not None and now_holder.get("state") == RELEASED:
                    return None  # released meanwhile: look again (taken at once)
                raise LeaseHeld(f"output {self.root} is in use by {describe(now_holder, current.modified)}: its "
                                f"lease {self.path} was renewed while this run watched it", now_holder, self.path)

    def _won(self, seen: Versioned, record: dict) -> None:
        """This run holds the lease (``seen``): finish what the record carries (the aborts of shards still in
        flight), then note the takeover in ``_job.json``, before anything reads the output."""
        self._version, self._record = seen.version, dict(record)
        self.epoch = int(record.get("epoch") or 1)
        self._last_ok = time.monotonic()
        try:
            previous = record.get("took_over")
            if record.get("aborting"):
                self._finish_aborts()
            if previous is not None and not previous.get("released"):
                self._markers.mark_taken_over(previous)  # an old holder's next _job.json write fails
        except BaseException:
            self.release()  # best effort: a record still "aborting" is finished by the next acquirer
            raise

    def _finish_aborts(self) -> None:
        """Abort the shards the record carries and every intent listed now; then clear ``aborting``."""
        pending = self._record.get("aborting") or {}
        reason = pending.get("reason") if isinstance(pending, dict) else None
        by = {"run_id": self.run_id, "epoch": self.epoch, "reason": reason or TAKEOVER_REASON}
        aborted = intents.abort_in_flight(self._store, _shards(pending), by)
        for shard in aborted:
            log.warning("kbatch: shard %s was in flight when its run's lease ended: aborted, it will never commit",
                        shard)

        def clear(rec):
            rec.pop("aborting", None)
            return rec

        self._update(clear)

    def _held_message(self, holder: dict | None, seen: Versioned) -> str:
        ttl = ttl_of(holder, self.ttl)
        if holder is None:
            return (f"output {self.root} is locked by {describe(None, seen.modified)} at {self.path}; a run takes "
                    f"it over after watching it unchanged for {ttl:g} s")
        return (f"output {self.root} is in use by {describe(holder, seen.modified)}; lease {self.path}. "
                f"Wait for that run to end or stop it; if it died on another machine, a rerun takes its lease "
                f"over after watching it unchanged for its ttl ({ttl:g} s)")

    # ------------------------------------------------------------------------------------------ updating
    def _lost_message(self, seen: Versioned | None) -> str:
        return lost_message(f"run {self.run_id!r}", self.path, seen, self._store)

    def _update(self, change) -> dict:
        """Replace the record (``change(record) -> record``) if-version the object as this run last wrote it.
        Raises :class:`LeaseLost` when it is not this run's any more. Storage errors propagate."""
        with self._mutex:
            if self._version is None:
                raise LeaseLost(self._lost or f"output lease {self.path} is not held by run {self.run_id!r}")
            for _ in range(_UPDATE_ATTEMPTS):
                new = change(dict(self._record))
                data = dumps_json(new)
                try:
                    self._version = self._store.replace(LEASE_NAME, data, self._version)
                    self._record = new
                    return new
                except PreconditionFailed:
                    seen = self._store.read(LEASE_NAME)
                    holder = parse(seen)
                    if not holds(holder, self.token):
                        self._version, self._lost = None, self._lost_message(seen)
                        raise LeaseLost(self._lost) from None
                    self._version, self._record = seen.version, holder  # ours, rewritten: again
            raise OSError(f"the output lease {self.path} kept changing under {_UPDATE_ATTEMPTS} updates")

    # ------------------------------------------------------------------------------------------ renewing
    def renew(self) -> None:
        """Refresh the lease now; raises :class:`LeaseLost` if another run took it over (or it was removed):
        this run must stop writing the output. Storage errors propagate (the renewer retries them)."""
        now = _now()

        def change(rec):
            rec.update(renewed=iso(now), renewed_epoch=now, renewals=int(rec.get("renewals") or 0) + 1)
            return rec

        self._update(change)
        self._last_ok = time.monotonic()

    def start_renewing(self) -> None:
        """Renew from a daemon thread every :attr:`renew_interval` until :meth:`stop_renewing` (or
        :meth:`release`). A renewal that fails on a storage error is retried until the lease went ``ttl``
        without one; then, or on a takeover, :attr:`lost` is set."""
        if self._thread is not None or self._version is None:
            return
        self._stop.clear()
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._renew_loop, name=f"kbatch-lease-{self.run_id}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        interval = self.renew_interval
        wait = interval
        while not self._stop.wait(wait):
            try:
                self.renew()
                wait = interval
            except LeaseLost as e:
                self._lost = self._lost or str(e)
                log.error("kbatch: %s", self._lost)
                return
            except Exception as e:  # noqa: BLE001 - a storage hiccup: retry within the ttl
                since = time.monotonic() - self._last_ok
                if since >= self.ttl:
                    self._lost = (f"run {self.run_id!r} could not renew the output lease {self.path} for "
                                  f"{since:.0f} s (its ttl {self.ttl:g} s), so another run may hold it now: "
                                  f"{type(e).__name__}: {e}")
                    log.error("kbatch: %s", self._lost)
                    return
                wait = min(max(0.05, interval / 4), max(0.05, self.ttl - since) / 2)
                log.warning("kbatch: renewing the output lease %s failed (%s: %s); retrying in %.1f s (%.0f s of "
                            "its %g s ttl left)", self.path, type(e).__name__, e, wait, self.ttl - since, self.ttl)

    def stop_renewing(self) -> None:
        t, self._thread = self._thread, None
        if t is not None:
            self._stop.set()
            if t is not threading.current_thread():
                t.join(timeout=max(5.0, self.ttl))

    @property
    def lost(self) -> str | None:
        """Why this run no longer holds its lease (None while it does)."""
        return self._lost

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the renewer found the lease lost (no storage access)."""
        if self._lost is not None:
            raise LeaseLost(self._lost)
        if self._version is None:
            raise LeaseLost(f"output lease {self.path} is not held by run {self.run_id!r} (released)")

    def verify(self) -> None:
        """Read the lease now; raise :class:`LeaseLost` (and remember why) if it is not this run's."""
        self.check()
        seen = self._store.read(LEASE_NAME)
        if not holds(parse(seen), self.token):
            self._lost = self._lost_message(seen)
            self._version = None
            raise LeaseLost(self._lost)

    # ------------------------------------------------------------------------------------------ fenced writes
    def write(self, name: str, data: bytes) -> None:
        """Write ``<root>/<name>`` (``_job.json``, ``_SUCCESS``), fenced and conditional
        (``kbatch.output.markers``): raises :class:`LeaseLost` once the lease is not this run's."""
        self._markers.write(name, data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write(name, dumps_json(obj))

    def remove(self, name: str) -> None:
        """Delete ``<root>/<name>`` (no error if missing), fenced and if-version."""
        self._markers.remove(name)

    def read_marker(self, name: str) -> dict | None:
        """``<root>/<name>`` as JSON, remembering its version for this run's next conditional write."""
        return self._markers.read_json(name)

    def fence(self):
        """What this run's writers carry with each write call (picklable): ``kbatch.output.fence.Fence``."""
        from kbatch.output.fence import Fence

        return Fence(self.root, self.run_id, self.token, self.epoch, self.storage_options)

    # ------------------------------------------------------------------------------------------ overwrite
    @property
    def overwrite_pending(self) -> dict | None:
        """An overwrite this run's record carries from a holder that did not finish it (or this run's own)."""
        return self._record.get("overwriting") or None

    def begin_overwrite(self) -> None:
        """Mark the record ``overwriting`` (a run taking over finishes the overwrite before it reads)."""
        mark = self._record.get("overwriting") or {"run_id": self.run_id, "epoch": self.epoch, "started": iso(_now())}

        def change(rec):
            rec["overwriting"] = mark
            return rec

        self._update(change)

    def end_overwrite(self) -> None:
        def change(rec):
            rec.pop("overwriting", None)
            return rec

        self._update(change)

    # ------------------------------------------------------------------------------------------ releasing
    def release(self) -> None:
        """Stop renewing; abort this run's shards still in flight (a write that lands later commits nothing)
        and mark the lease released (never deleted: the epoch only grows). Best effort: never raises (a lease
        it cannot mark expires after its ttl; aborts it could not make stay in the record for the next run)."""
        self.stop_renewing()
        with self._mutex:
            if self._version is None:
                return
            done = False
            try:
                pending = self._record.get("aborting") or {}
                reason = (pending.get("reason") if isinstance(pending, dict) and pending.get("reason")
                          else f"run {self.run_id!r} ended with these writes in flight")
                intents.abort_in_flight(self._store, _shards(pending),
                                        {"run_id": self.run_id, "epoch": self.epoch, "reason": reason})
                done = True
            except Exception as e:  # noqa: BLE001
                log.warning("kbatch: could not abort the shards in flight of run %r (%s: %s); the next run on "
                            "this output aborts them", self.run_id, type(e).__name__, e)
            now = _now()

            def change(rec):
                if done:
                    rec.pop("aborting", None)
                elif not rec.get("aborting"):
                    rec["aborting"] = {"shards": [], "reason": f"run {self.run_id!r} ended with writes in flight"}
                rec.update(state=RELEASED, released=iso(now), released_epoch=now)
                return rec

            try:
                self._update(change)
            except LeaseLost:
                log.warning("output lease %s is no longer held by run %r; leaving it", self.path, self.run_id)
            except Exception as e:  # noqa: BLE001 - the run's outcome is decided; the lease expires by itself
                log.warning("kbatch: could not release the output lease %s (%s: %s); another run takes it over "
                            "after watching it unchanged for %g s", self.path, type(e).__name__, e, self.ttl)
            self._version = None

    def holder(self) -> dict:
        """The lease content this run wrote (last renewal included)."""
        return dict(self._record)

    @property
    def held(self) -> bool:
        return self._version is not None

    @property
    def renew_interval(self) -> float:
        """How often to renew: four renewals fit in one ttl, so one slow write does not expire it."""
        return self.ttl / 4

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_lease_record(root: str, storage_options: dict | None = None) -> dict | None:
    """The lease object's content at ``root`` whatever its state (None: no object; an unreadable one comes back
    as ``{"unreadable": True, "modified": <epoch or None>}``)."""
    try:
        store = storage.conditional_store(root, storage_options)
    except storage.Unsupported:
        return None
    seen = store.read(LEASE_NAME)
    if seen is None:
        return None
    holder = parse(seen)
    return holder if holder is not None else {"unreadable": True, "modified": seen.modified}


def read_lease(root: str, storage_options: dict | None = None) -> dict | None:
    """Who holds the output at ``root`` (for ``kbatch status``): the lease record, or None when no run holds
    it (never taken, or released). An unreadable lease comes back as ``{"unreadable": True, ...}``."""
    rec = read_lease_record(root, storage_options)
    if rec is not None and rec.get("state") == RELEASED:
        return None
    return rec
