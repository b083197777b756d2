"""One run per output location, fenced: a lease object at ``<output>/_lease.json``.

SPEC §6: a second run on an output that a live run holds exits 2 naming the holder; the holder of a run that
died does not block its rerun; a run that lost its lease writes nothing more and exits 3.

**Holding.** A run :meth:`Lease.acquire`\\ s the lease before it writes anything and renews it from then on
until its last byte is written, from a background thread (:meth:`Lease.start_renewing`, every ``ttl / 4``),
independent of what the run's main thread is doing (planning, starting Ray, the driver loop, the finish).
Each renewal changes the object (a ``renewals`` counter). A storage error in a renewal is retried until the
lease has gone ``ttl`` without one; then, or when the object is no longer this run's (another run's token,
or gone), the lease is *lost*: :attr:`Lease.lost` says why and :meth:`Lease.check` raises :class:`LeaseLost`.

**Taking over.** Each acquisition has its own random ``token`` and an ``epoch`` one above the lease it
replaced. A contender takes a lease over only

- at once when its holder ran on this machine (same host, same boot id, same pid namespace: all three known
  on both sides) and its process is gone (no such pid, a zombie, or a pid reused by a later process), or
- after *watching* the lease object unchanged (same bytes: every renewal changes them) for the holder's ttl,
  on the contender's own monotonic clock. Clocks are never compared to decide a takeover: the storage's
  timestamp only decides whether a lease is worth watching (written within its ttl by the storage's clock
  and not in the future: a live holder, exit 2 at once) or not (watch it, then take it over if it did not
  change). A contender whose clock is wrong therefore waits, or gives up, but never takes a live lease.

**Fencing.** A takeover is a compare-and-swap against exactly the object that was watched, so the old
holder's own compare-and-swaps fail from then on. The holder's writers (other processes, :class:`Fence`)
register each shard in the lease before writing it (a compare-and-swap that fails once the lease is
someone else's), and a shard becomes visible only by the exclusive creation of its commit record
(``kbatch.output.commits``). The run that takes over creates an *abort* record for every shard the old
lease lists, before it reads the output: a late commit of the old holder then finds the name taken and
commits nothing. ``_job.json`` and ``_SUCCESS`` are written through :meth:`Lease.write` /
:meth:`Lease.remove`: on a local disk and ``memory://`` under the same lock as the takeover, after checking
the token; on S3 after reading the lease back, and ``If-Match`` the object as this run last wrote it (the run
taking over rewrites ``_job.json`` first, so an old holder frozen between its lease check and its PUT still
fails; S3 has no conditional write across two objects, so ``_SUCCESS``, created once at the very end, keeps
that check-then-PUT window).

**Atomic compare-and-swap per store:**

- local filesystem: each change runs under ``fcntl.flock`` on ``_lease.json.lock`` (released by the kernel
  when its process dies), re-reads the lease and compares it with what the caller saw; the lease is written
  to a temp file and hard-linked (create: fails if it exists) or renamed (replace) into place. A filesystem
  that refuses the lock is refused (``LeaseUnsupported``, exit 2), never run unlocked.
- S3: create with ``If-None-Match: *``, replace and delete with ``If-Match: <etag>``; 412 / 409 mean
  "someone else got there first". After a winning takeover the lease is read back (a server that ignores
  the headers is caught when the two writes are not simultaneous).
- ``memory://``: fsspec's in-memory store is one dict per process; a lock makes check-and-set atomic.
- anything else (``gs://`` through gcsfs, whose write calls take no generation precondition; sftp, ...):
  refused with ``LeaseUnsupported`` (exit 2) naming the store, since two runs could both write there.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import random
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psutil

from kbatch import storage
from kbatch.config import ConfigError
from kbatch.output import commits
from kbatch.storage import (MEMORY_LOCK, TMP_MARK, display_path, dumps_json, get_fs, is_local, join,
                            s3_conflict, s3_error, write_bytes_atomic, write_synced)

try:
    import fcntl
except ImportError:  # not on POSIX: local leases are refused
    fcntl = None

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
LOCK_SUFFIX = ".lock"
DEFAULT_TTL = 120.0
PID_START_TOLERANCE = 1.0  # seconds: psutil's create_time is rounded to clock ticks
FUTURE_TOLERANCE = 2.0  # seconds a storage timestamp may be ahead of this clock and still count as "recent"
_ATTEMPTS = 20  # acquire retries after losing a compare-and-swap; each loss means another run made progress
_UPDATE_ATTEMPTS = 200  # compare-and-swap retries of a holder's own update (writers and the renewer contend)


class LeaseHeld(ConfigError):
    """Another live run holds the output (exit 2). The message names the holder and the lease path."""

    def __init__(self, message: str, holder: dict | None = None, path: str = ""):
        super().__init__(message)
        self.holder = holder
        self.path = path


class LeaseUnsupported(ConfigError):
    """The output's store cannot make the lease atomic (exit 2): kbatch refuses rather than risk two runs."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (or removed, or could not be renewed within its ttl): the run must stop
    writing. The message names the new holder when there is one."""


class Fenced(LeaseLost):
    """A write refused because the run it belongs to no longer holds the output's lease."""


# ---------------------------------------------------------------------------------------------- identity
def _now() -> float:
    return time.time()


def _iso(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).isoformat(timespec="seconds")


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _machine() -> dict:
    """Who "this machine" is, for the dead-pid rule: a pid can only be probed in the pid namespace of the
    same boot of the same host. Hostnames alone are not unique (containers, cloned VMs)."""
    pidns = None
    with contextlib.suppress(OSError):
        pidns = os.readlink("/proc/self/ns/pid")
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": pidns}


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def _same_machine(holder: dict, me: dict) -> bool:
    """Host, boot id and pid namespace all known on both sides and equal. A side without ``/proc`` (no boot
    id) is never "this machine": two hosts with one name would take each other's leases as dead pids."""
    return all(holder.get(k) is not None and me.get(k) is not None and holder.get(k) == me.get(k)
               for k in ("host", "boot_id", "pid_namespace"))


def _process_gone(pid: Any, started: Any) -> bool:
    """True when ``pid`` is not the process that wrote the lease any more: no such process, a zombie, or a
    process with another start time (the pid was reused)."""
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        created = proc.create_time()
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, OSError, TypeError, ValueError):
        return False  # cannot tell (no permission, bad field): leave it to the ttl rule
    return started is not None and abs(created - float(started)) > PID_START_TOLERANCE


def dead_reason(holder: dict | None, me: dict | None = None) -> str | None:
    """Why ``holder`` is certainly dead (its process on this machine is gone), or None."""
    if holder is None:
        return None
    if _same_machine(holder, me or _machine()) and _process_gone(holder.get("pid"), holder.get("pid_started")):
        return f"its process {holder.get('pid')} on {holder.get('host')} is gone"
    return None


def looks_recent(holder: dict | None, modified: float | None, ttl: float, now: float | None = None) -> bool:
    """A hint, never a reason to take over: the object was written within ``ttl`` by the storage's clock (its
    mtime / LastModified, read against this machine's clock; a time in the future beyond a small tolerance
    means the clocks disagree: not recent, watch it). Without a storage time, the holder's own stamp."""
    now = _now() if now is None else now
    stamp = modified if modified is not None else _float((holder or {}).get("renewed_epoch"))
    if stamp is None:
        return False
    return -FUTURE_TOLERANCE <= now - stamp <= ttl


def _ttl_of(holder: dict | None, default: float) -> float:
    return _float((holder or {}).get("ttl")) or default


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _ago(epoch: float | None, now: float) -> str:
    return "at an unknown time" if epoch is None else f"{max(0.0, now - epoch):.0f} s ago"


def describe(holder: dict | None, modified: float | None = None, now: float | None = None) -> str:
    """One line naming a lease holder, for messages and ``kbatch status``."""
    now = _now() if now is None else now
    if holder is None:
        return "an unreadable lease written " + _ago(modified, now)
    renewed, ttl = _float(holder.get("renewed_epoch")), _float(holder.get("ttl")) or 0.0
    return (f"run {holder.get('run_id')!r} (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"epoch {holder.get('epoch', '?')}, last renewed {holder.get('renewed', '?')} by its clock, "
            f"{_ago(renewed, now)} by ours, ttl {ttl:g} s)")


# ---------------------------------------------------------------------------------------------- storage
class _Conflict(Exception):
    """A compare-and-swap on the lease object lost: it is not (any more) what the caller saw."""


@dataclass(frozen=True)
class _Seen:
    """The lease object as read: its bytes, a version to compare against (bytes, or an S3 etag), its
    modification time (epoch seconds, the storage's clock; None if unknown)."""
    raw: bytes
    version: Any
    modified: float | None


def _epoch(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.timestamp()
    return None


@dataclass
class _FsStore:
    """The lease object on the local filesystem (``lock="flock"``) or ``memory://`` (``lock="memory"``);
    ``lock=None``: read only (``kbatch status``)."""
    fs: Any
    path: str
    lock: str | None

    def locked(self):
        if self.lock == "memory":
            return MEMORY_LOCK
        if self.lock == "flock":
            return _flock(self.path + LOCK_SUFFIX)
        return contextlib.nullcontext()

    def read(self) -> _Seen | None:
        try:
            raw = self.fs.cat_file(self.path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        modified = None
        with contextlib.suppress(Exception):
            modified = _epoch(self.fs.modified(self.path))
        return _Seen(raw, raw, modified)

    def create(self, data: bytes) -> _Seen:
        with self.locked():
            if is_local(self.fs):
                _link_new(self.path, data)
            else:
                try:
                    self.fs.pipe_file(self.path, data, mode="create")
                except FileExistsError:
                    raise _Conflict() from None
        return _Seen(data, data, _now())

    def replace(self, data: bytes, seen: _Seen) -> _Seen:
        with self.locked():
            self._check(seen)
            write_bytes_atomic(self.fs, self.path, data)  # temp + rename where renames are atomic
        return _Seen(data, data, _now())

    def delete(self, seen: _Seen) -> None:
        with self.locked():
            try:
                self._check(seen)
            except _Conflict:
                if self.read() is None:
                    return
                raise
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)

    def _check(self, seen: _Seen) -> None:
        current = self.read()
        if current is None or current.raw != seen.raw:
            raise _Conflict()


@contextlib.contextmanager
def _flock(lock_path: str):
    """Exclusive ``flock`` on ``lock_path`` (created if needed, never deleted: deleting a lock file races
    with its next user). A filesystem that refuses locks is refused: the lease would not be atomic."""
    if fcntl is None:
        raise LeaseUnsupported(f"cannot lock {lock_path}: no fcntl on this platform, so the output lease "
                               "cannot be made atomic on a local path; use object storage (s3://)")
    os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            raise LeaseUnsupported(f"cannot lock {lock_path} ({e}): this filesystem refuses flock, so the output "
                                   "lease cannot be made atomic there; use a filesystem with locks (local disk, "
                                   "NFSv4) or object storage (s3://)") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _link_new(path: str, data: bytes) -> None:
    """Create ``path`` holding ``data`` only if it does not exist (complete before its name appears)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex}"
    try:
        write_synced(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise _Conflict() from None
        except OSError:  # no hard links on this filesystem: exclusive create, then write
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise _Conflict() from None
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _s3_missing(exc: BaseException) -> bool:
    code, status = s3_error(exc)
    return isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "404") or status == 404


@dataclass
class _S3Store:
    """The lease object on S3 (or an S3-compatible server): conditional PUT / DELETE on the etag."""
    fs: Any
    path: str

    def locked(self):
        return contextlib.nullcontext()

    def _where(self) -> dict:
        bucket, key, _ = self.fs.split_path(self.path)
        return {"Bucket": bucket, "Key": key}

    def read(self) -> _Seen | None:
        async def get():  # the body streams on s3fs's event loop, so read it there
            resp = await self.fs._call_s3("get_object", **self._where())
            body = resp["Body"]
            try:
                return resp, await body.read()
            finally:
                with contextlib.suppress(Exception):
                    body.close()

        try:  # body, etag and time from one response, so that they belong together
            resp, raw = _run(self.fs, get)
        except Exception as e:  # noqa: BLE001
            if _s3_missing(e):
                return None
            raise
        return _Seen(raw, resp.get("ETag"), _epoch(resp.get("LastModified")))

    def _put(self, data: bytes, **condition) -> _Seen:
        try:
            resp = self.fs.call_s3("put_object", Body=data, **self._where(), **condition)
        except Exception as e:  # noqa: BLE001
            if s3_conflict(e) or (condition.get("IfMatch") and _s3_missing(e)):
                raise _Conflict() from None
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return _Seen(data, resp.get("ETag"), _now())

    def create(self, data: bytes) -> _Seen:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, seen: _Seen) -> _Seen:
        return self._put(data, IfMatch=seen.version)

    def delete(self, seen: _Seen) -> None:
        try:
            self.fs.call_s3("delete_object", **self._where(), IfMatch=seen.version)
        except Exception as e:  # noqa: BLE001
            if _s3_missing(e):
                return
            if s3_conflict(e):
                raise _Conflict() from None
            code, status = s3_error(e)
            if status not in (400, 501) and code not in ("NotImplemented", "InvalidArgument"):
                raise
            # a server without conditional DELETE: compare, then delete (a small window, at the end of a run)
            current = self.read()
            if current is None:
                return
            if current.raw != seen.raw:
                raise _Conflict() from None
            self.fs.call_s3("delete_object", **self._where())
        finally:
            self.fs.invalidate_cache(self.path)


def _run(fs, coroutine_function):
    """Run ``coroutine_function()`` on an async fsspec filesystem's event loop and return its result."""
    from fsspec.asyn import sync

    if getattr(fs, "asynchronous", False):
        raise RuntimeError("kbatch leases need a synchronous s3fs instance")
    return sync(fs.loop, coroutine_function)


def _store(fs, path: str):
    """The lease store of ``path``; raises :class:`LeaseUnsupported` where it cannot be atomic."""
    kind = storage.exclusive_kind(fs)
    if kind == "s3":
        return _S3Store(fs, path)
    if kind == "local":
        return _FsStore(fs, path, "flock")
    if kind == "memory":
        return _FsStore(fs, path, "memory")
    protocols = fs.protocol if isinstance(fs.protocol, (list, tuple)) else [fs.protocol]
    raise LeaseUnsupported(
        f"output {display_path(fs, path)}: kbatch cannot make the output lease and the shard commits atomic on "
        f"{'/'.join(sorted(protocols))} (no create-if-absent / compare-and-swap through fsspec; gcsfs's writes "
        "take no generation precondition), so two runs could both write this output. Use s3:// (also "
        "S3-compatible stores with conditional writes), a local or shared filesystem with flock, or memory://")


def _parse(seen: _Seen | None) -> dict | None:
    """The lease content, or None for a missing / corrupt / half-written / foreign object."""
    if seen is None:
        return None
    try:
        obj = json.loads(seen.raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) and obj.get("token") else None


def _last_job(fs, root: str | None) -> str:
    """Who wrote the output's ``_job.json`` last (names the run that took over and has since ended)."""
    if fs is None or root is None:
        return ""
    try:
        job = json.loads(fs.cat_file(join(root, "_job.json")).decode("utf-8"))
        return f" (the output's _job.json was last written by run {job.get('run_id')!r}, status {job.get('status')})"
    except Exception:  # noqa: BLE001 - only a hint in a message
        return ""


def _lost_message(who: str, path: str, seen: _Seen | None, fs=None, root: str | None = None) -> str:
    holder = _parse(seen)
    if seen is None:
        now_by = "the lease was removed" + _last_job(fs, root)
    else:
        now_by = "it is now held by " + describe(holder, seen.modified)
    return f"{who} lost the output lease {path}: {now_by}"


def _update(store, token: str, change, lost_message) -> dict:
    """Read-modify-compare-and-swap of the lease while it is ``token``'s: ``change(record) -> record``.
    Raises :class:`LeaseLost` (``lost_message(seen)``) when it is someone else's or gone. Contention (the
    renewer and the writers of one run all update it) is retried."""
    for i in range(_UPDATE_ATTEMPTS):
        seen = store.read()
        holder = _parse(seen)
        if holder is None or holder.get("token") != token:
            raise LeaseLost(lost_message(seen))
        new = change(dict(holder))
        try:
            store.replace(dumps_json(new), seen)
            return new
        except _Conflict:
            time.sleep(random.uniform(0.0, 0.002 * min(i + 1, 25)))
    raise OSError(f"the output lease {display_path(store.fs, store.path)} kept changing under "
                  f"{_UPDATE_ATTEMPTS} updates")


# ---------------------------------------------------------------------------------------------- the lease
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
    _seen: _Seen | None = field(default=None, init=False, repr=False)
    _store: Any = field(default=None, init=False, repr=False)
    _lost: str | None = field(default=None, init=False, repr=False)
    _thread: Any = field(default=None, init=False, repr=False)
    _stop: Any = field(default_factory=threading.Event, init=False, repr=False)
    _last_ok: float = field(default=0.0, init=False, repr=False)
    _mutex: Any = field(default_factory=threading.Lock, init=False, repr=False)
    _etags: dict = field(default_factory=dict, init=False, repr=False)  # S3: guarded objects as last written
    path: str = field(default="", init=False)  # what users see: a local path or a URL

    def __post_init__(self):
        if not (self.ttl > 0):
            raise ValueError(f"lease ttl must be > 0 seconds, got {self.ttl!r}")
        fs, root = get_fs(self.root, self.storage_options)
        self._fs, self._root = fs, root
        lease_path = join(root, LEASE_NAME)
        self._store = _store(fs, lease_path)
        self.path = display_path(fs, lease_path)

    @classmethod
    def acquire(cls, root: str, run_id: str, storage_options: dict | None = None,
                ttl: float = DEFAULT_TTL) -> "Lease":
        """Take the lease on ``root`` for ``run_id``; raises :class:`LeaseHeld` while a live run holds it.

        A lease whose holder may be alive is watched for its ttl (see the module docstring) before it is taken
        over with a compare-and-swap against exactly the object that was watched."""
        lease = cls(root, run_id, storage_options, ttl)
        lease._acquire()
        return lease

    def _acquire(self) -> None:
        me = _machine()
        now = _now()
        pid = os.getpid()
        self._record = {"run_id": self.run_id, **me, "pid": pid, "pid_started": _process_start(pid),
                        "started": _iso(now), "started_epoch": now, "renewed": _iso(now), "renewed_epoch": now,
                        "renewals": 0, "ttl": self.ttl, "token": self.token, "epoch": 1, "open": []}
        store = self._store
        for _ in range(_ATTEMPTS):
            self._record.pop("took_over", None)
            seen = store.read()
            holder = _parse(seen)
            if holder is not None and holder.get("token") == self.token:
                self._won(seen, None)  # ours: a write that "failed" after it landed (a retried PUT)
                return
            try:
                if seen is None:
                    self._record["epoch"] = 1
                    self._won(store.create(self._payload()), None)
                    return
                reason = dead_reason(holder, me)
                if reason is None:
                    ttl = _ttl_of(holder, self.ttl)
                    if looks_recent(holder, seen.modified, ttl):
                        raise LeaseHeld(self._held_message(holder, seen), holder, self.path)
                    reason = self._watch(seen, holder, ttl)
                    if reason is None:  # it went away meanwhile: look again
                        continue
                log.warning("taking over the output lease %s from %s: %s", self.path,
                            describe(holder, seen.modified), reason)
                self._record["took_over"] = {**_brief(holder), "reason": reason}
                self._record["epoch"] = int(_float((holder or {}).get("epoch")) or 0) + 1
                self._won(store.replace(self._payload(), seen), holder)
                return
            except _Conflict:
                continue
        seen = store.read()
        raise LeaseHeld(f"could not take the output lease {self.path}: other runs keep changing it "
                        f"(now {describe(_parse(seen), seen and seen.modified)})", _parse(seen), self.path)

    def _watch(self, seen: _Seen, holder: dict | None, ttl: float) -> str | None:
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
            current = self._store.read()
            if current is None:
                return None
            if current.raw != seen.raw or current.version != seen.version:
                now_holder = _parse(current)
                raise LeaseHeld(f"output {self.root} is in use by {describe(now_holder, current.modified)}: its "
                                f"lease {self.path} was renewed while this run watched it", now_holder, self.path)

    def _won(self, seen: _Seen, previous: dict | None) -> None:
        """This run holds the lease (``seen``): verify where headers may be ignored, then abort every shard
        the previous holder had in flight, so that none of them commits after this run reads the output."""
        self._seen = seen
        self.epoch = int(self._record.get("epoch") or 1)
        self._last_ok = time.monotonic()
        try:
            if isinstance(self._store, _S3Store):
                self._verify_ours()
            if previous is not None:
                self._abort_open(previous, f"lease taken over from run {previous.get('run_id')!r}")
                if isinstance(self._store, _S3Store):
                    self._mark_job_file(previous)
        except BaseException:
            self.release()
            raise

    def _verify_ours(self) -> None:
        seen = self._store.read()
        holder = _parse(seen)
        if holder is None or holder.get("token") != self.token:
            self._seen = None
            raise LeaseHeld(f"output lease {self.path} was taken by another run at the same moment: "
                            + describe(holder, seen and seen.modified), holder, self.path)
        self._seen = seen
        self._record = holder

    def _abort_open(self, holder: dict, why: str) -> None:
        by = {"run_id": self.run_id, "epoch": self.epoch, "reason": why}
        for shard in holder.get("open") or []:
            if not isinstance(shard, str) or not commits.valid_shard(shard):
                log.warning("kbatch: lease %s lists an invalid shard name %r; ignored", self.path, shard)
                continue
            existing = commits.abort(self._fs, self._root, shard, by)
            if existing is None:
                log.warning("kbatch: shard %s of run %r was in flight when its lease ended: aborted, it will "
                            "never commit", shard, holder.get("run_id"))

    def _held_message(self, holder: dict | None, seen: _Seen) -> str:
        ttl = _ttl_of(holder, self.ttl)
        if holder is None:
            return (f"output {self.root} is locked by {describe(None, seen.modified)} at {self.path}; a run takes "
                    f"it over after watching it unchanged for {ttl:g} s (delete it if no run uses it)")
        return (f"output {self.root} is in use by {describe(holder, seen.modified)}; lease {self.path}. "
                f"Wait for that run to end or stop it; if it died on another machine, a rerun takes its lease "
                f"over after watching it unchanged for its ttl ({ttl:g} s)")

    def _payload(self) -> bytes:
        return dumps_json(self._record)

    # ------------------------------------------------------------------------------------------ renewing
    def renew(self) -> None:
        """Refresh the lease now; raises :class:`LeaseLost` if another run took it over (or it was removed):
        this run must stop writing the output. Storage errors propagate (the renewer retries them)."""
        with self._mutex:
            if self._seen is None:
                raise LeaseLost(self._lost or f"output lease {self.path} is not held by run {self.run_id!r}")
            now = _now()

            def change(rec):
                rec.update(renewed=_iso(now), renewed_epoch=now, renewals=int(rec.get("renewals") or 0) + 1)
                return rec

            try:
                self._record = _update(self._store, self.token, change, self._lost_message)
            except LeaseLost as e:
                self._seen, self._lost = None, str(e)
                raise
            self._seen = _Seen(dumps_json(self._record), None, None)  # marks "held"; reads are always fresh
            self._last_ok = time.monotonic()

    def _lost_message(self, seen: _Seen | None) -> str:
        return _lost_message(f"run {self.run_id!r}", self.path, seen, self._fs, self._root)

    def start_renewing(self) -> None:
        """Renew from a daemon thread every :attr:`renew_interval` until :meth:`stop_renewing` (or
        :meth:`release`). A renewal that fails on a storage error is retried until the lease went ``ttl``
        without one; then, or on a takeover, :attr:`lost` is set."""
        if self._thread is not None or self._seen is None:
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
        if self._seen is None:
            raise LeaseLost(f"output lease {self.path} is not held by run {self.run_id!r} (released)")

    def verify(self) -> None:
        """Read the lease now; raise :class:`LeaseLost` (and remember why) if it is not this run's."""
        self.check()
        seen = self._store.read()
        holder = _parse(seen)
        if holder is None or holder.get("token") != self.token:
            self._lost = self._lost_message(seen)
            self._seen = None
            raise LeaseLost(self._lost)

    # ------------------------------------------------------------------------------------------ fenced writes
    @contextlib.contextmanager
    def guarded(self):
        """Hold this while writing an object only the holder may write (``_job.json``, ``_SUCCESS``): raises
        :class:`LeaseLost` instead of yielding once the lease is not this run's. Local disk and ``memory://``:
        checked under the lock a takeover takes, so no takeover can slip in before the write."""
        self.check()
        with self._store.locked():
            self.verify()
            yield

    def write(self, name: str, data: bytes) -> None:
        """Write ``<root>/<name>`` atomically, fenced (:meth:`guarded`). On S3 also ``If-Match`` the object as
        this run last wrote it: a run that takes the lease over changes ``_job.json`` first
        (:meth:`_mark_job_file`), so an old holder's write that passed its lease check just before the takeover
        still fails."""
        path = join(self._root, storage.check_relative(name))
        with self.guarded():
            if not isinstance(self._store, _S3Store):
                write_bytes_atomic(self._fs, path, data)
                return
            bucket, key, _ = self._fs.split_path(path)
            cond = {"IfMatch": self._etags[path]} if path in self._etags else {}
            try:
                resp = self._fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
            except Exception as e:  # noqa: BLE001
                if not (s3_conflict(e) or (cond and _s3_missing(e))):
                    raise
                self.verify()  # changed since this run wrote it: a takeover (LeaseLost), or a person's edit
                resp = self._fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data)
            finally:
                self._fs.invalidate_cache(path)
            self._etags[path] = resp.get("ETag")

    def _mark_job_file(self, previous: dict) -> None:
        """S3, after a takeover: note it in ``_job.json`` (a conditional rewrite), which makes every later
        conditional write of the old holder's fail."""
        path = join(self._root, "_job.json")
        bucket, key, _ = self._fs.split_path(path)
        for _ in range(10):
            seen = _S3Store(self._fs, path).read()
            if seen is None:
                return
            try:
                job = json.loads(seen.raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                job = None
            if not isinstance(job, dict):
                return
            job["lease_taken_over"] = {"by": self.run_id, "epoch": self.epoch, "from": previous.get("run_id")}
            try:
                resp = self._fs.call_s3("put_object", Bucket=bucket, Key=key, Body=dumps_json(job),
                                        IfMatch=seen.version)
            except Exception as e:  # noqa: BLE001
                if s3_conflict(e):
                    continue  # the old holder wrote it just now: read it again
                raise
            finally:
                self._fs.invalidate_cache(path)
            self._etags[path] = resp.get("ETag")
            return

    def write_json(self, name: str, obj: Any) -> None:
        self.write(name, dumps_json(obj))

    def remove(self, name: str) -> None:
        """Delete ``<root>/<name>`` (no error if missing), fenced."""
        path = join(self._root, storage.check_relative(name))
        with self.guarded():
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(path)
            with contextlib.suppress(Exception):
                self._fs.invalidate_cache(path)

    def fence(self) -> "Fence":
        """What this run's writers carry with each write call (picklable)."""
        return Fence(self.root, self.run_id, self.token, self.epoch, self.storage_options)

    # ------------------------------------------------------------------------------------------ releasing
    def release(self) -> None:
        """Stop renewing; abort the shards still registered in flight (a write that lands later commits
        nothing) and remove the lease if it is still ours. Best effort: never raises (a lease it cannot remove
        expires after its ttl); a lease that is gone or another run's stays as it is."""
        self.stop_renewing()
        with self._mutex:
            if self._seen is None:
                return
            self._seen = None
            try:
                seen = self._store.read()
                holder = _parse(seen)
                if holder is None or holder.get("token") != self.token:
                    if seen is not None:
                        log.warning("output lease %s is no longer held by run %r; leaving it", self.path,
                                    self.run_id)
                    return
                if holder.get("open"):
                    self._abort_open(holder, f"run {self.run_id!r} ended with these writes in flight")
                self._store.delete(seen)
            except _Conflict:
                log.warning("output lease %s changed while run %r released it; leaving it", self.path, self.run_id)
            except Exception as e:  # noqa: BLE001 - the run's outcome is decided; the lease expires by itself
                log.warning("kbatch: could not release the output lease %s (%s: %s); another run takes it over "
                            "after watching it unchanged for %g s", self.path, type(e).__name__, e, self.ttl)

    def holder(self) -> dict:
        """The lease content this run wrote (last renewal included)."""
        return dict(self._record)

    @property
    def held(self) -> bool:
        return self._seen is not None

    @property
    def renew_interval(self) -> float:
        """How often to renew: four renewals fit in one ttl, so one slow write does not expire it."""
        return self.ttl / 4

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass(frozen=True)
class Fence:
    """What a run's writers carry with each write call: the run's lease token and epoch. A writer registers
    each shard in the lease before writing it (:meth:`register`) and checks the lease before committing
    (:meth:`check`); both raise :class:`Fenced` once the lease is another run's (or gone)."""

    root: str
    run_id: str
    token: str = field(repr=False)
    epoch: int
    storage_options: dict | None = field(default=None, repr=False, compare=False)

    def _store(self):
        fs, root = get_fs(self.root, self.storage_options)
        return _store(fs, join(root, LEASE_NAME))

    def _message(self, store, seen: _Seen | None) -> str:
        root = store.path.rsplit("/", 1)[0] if "/" in store.path else ""
        hint = ""
        if seen is None and storage.exclusive_kind(store.fs) in ("local", "memory"):
            hint = (" (or this writer, on another node, does not see the driver's output folder: use object "
                    "storage or a shared filesystem)")
        return _lost_message(f"run {self.run_id!r} (lease epoch {self.epoch})", display_path(store.fs, store.path),
                             seen, store.fs, root) + hint + "; its write is refused"

    def check(self) -> None:
        store = self._store()
        seen = store.read()
        holder = _parse(seen)
        if holder is None or holder.get("token") != self.token:
            raise Fenced(self._message(store, seen))

    def _change(self, fn) -> None:
        store = self._store()
        try:
            _update(store, self.token, fn, lambda seen: self._message(store, seen))
        except Fenced:
            raise
        except LeaseLost as e:
            raise Fenced(str(e)) from None

    def register(self, shard: str) -> None:
        """List ``shard`` in the lease as in flight (a run taking the lease over aborts it)."""
        def add(rec):
            rec["open"] = [s for s in rec.get("open") or [] if s != shard] + [shard]
            return rec

        self._change(add)

    def deregister(self, shard: str) -> None:
        """``shard`` is committed (or given up): no longer in flight. Best effort."""
        def drop(rec):
            rec["open"] = [s for s in rec.get("open") or [] if s != shard]
            return rec

        try:
            self._change(drop)
        except Exception as e:  # noqa: BLE001 - an entry left behind only costs an abort that finds a commit
            log.debug("kbatch: could not take shard %s off the lease: %s", shard, e)


def _brief(holder: dict | None) -> dict:
    if holder is None:
        return {"run_id": None}
    return {k: holder.get(k) for k in ("run_id", "host", "pid", "renewed", "epoch")}


def read_lease(root: str, storage_options: dict | None = None) -> dict | None:
    """The current lease content at ``root`` (for ``kbatch status``), or None if there is none.

    An unreadable lease comes back as ``{"unreadable": True, "modified": <epoch or None>}``."""
    fs, path = get_fs(root, storage_options)
    seen = _store_quiet(fs, join(path, LEASE_NAME)).read()
    if seen is None:
        return None
    holder = _parse(seen)
    return holder if holder is not None else {"unreadable": True, "modified": seen.modified}


def _store_quiet(fs, path: str):
    """A store for reading only (any filesystem)."""
    if storage.exclusive_kind(fs) == "s3":
        return _S3Store(fs, path)
    return _FsStore(fs, path, None)
