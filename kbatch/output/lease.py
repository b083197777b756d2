"""One run per output location: a lease object at ``<output>/_lease.json``.

SPEC §6: a second run on an output that a live run holds exits 2 naming the holder; the holder of a run that
died (killed, crashed) does not block its rerun. A run :meth:`Lease.acquire`\\ s the lease before it writes
anything, :meth:`Lease.renew`\\ s it while it lives (every ``ttl / 4`` seconds or so), and
:meth:`Lease.release`\\ s it at the end. A lease is *stale*, and another run takes it over, when

- its holder ran on this machine and its process is gone (the pid does not exist, or exists with another
  start time: pids are reused), or
- it was not renewed for ``ttl`` seconds (the holder's own ttl, written in the lease): a holder on another
  machine cannot be probed, and a hung holder counts as dead.

Everything else (all decisions) is the same on every filesystem; what differs is how one compare-and-swap
on the lease object is made atomic, so that of two runs starting at the same moment exactly one wins:

- local filesystem: each change (create / replace / delete) runs under ``fcntl.flock`` on
  ``_lease.json.lock`` (released by the kernel when its process dies, so a crash never leaves it locked),
  re-reads the lease and compares it with what the caller saw; the lease itself is written to a temp file
  and hard-linked (create, fails if it exists: ``O_EXCL`` semantics even without the lock) or renamed
  (replace) into place, so readers never see half a lease. Renaming the lease away to a tombstone alone is
  not enough: a contender that renames away a lease another one *just* created cannot put it back atomically.
- S3: conditional writes: create with ``If-None-Match: *``, replace and delete with ``If-Match: <etag>``;
  412 PreconditionFailed / 409 ConditionalRequestConflict mean "someone else got there first". After a
  winning write the lease is read back, which also catches S3-compatible servers that ignore the headers
  (when the two writes are not simultaneous).
- ``memory://``: fsspec's in-memory store is one dict per process; a lock makes check-and-set atomic.
- anything else: read, check, write, with a warning that the lease is not atomic there.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psutil

from kbatch.config import ConfigError
from kbatch.storage import (TMP_MARK, display_path, dumps_json, get_fs, is_local, join, write_bytes_atomic,
                            write_synced)

try:
    import fcntl
except ImportError:  # not on POSIX: local leases fall back to O_EXCL create + unlocked compare
    fcntl = None

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
LOCK_SUFFIX = ".lock"
DEFAULT_TTL = 120.0
PID_START_TOLERANCE = 1.0  # seconds: psutil's create_time is rounded to clock ticks
_ATTEMPTS = 20  # acquire retries after losing a compare-and-swap; each loss means another run made progress

# fsspec's memory:// store is itself process-global (a class attribute), so its guard has to be as well.
# It holds no state of ours: it only makes the memory backend's compare-and-swap atomic between threads.
_MEMORY_LOCK = threading.Lock()


class LeaseHeld(ConfigError):
    """Another live run holds the output (exit 2). The message names the holder and the lease path."""

    def __init__(self, message: str, holder: dict | None = None, path: str = ""):
        super().__init__(message)
        self.holder = holder
        self.path = path


class LeaseLost(RuntimeError):
    """This run's lease was taken over (or removed) by someone else: the run must stop writing."""


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
    if holder.get("host") != me["host"]:
        return False
    # Fields an older or foreign writer left out do not count against it.
    return all(holder.get(k) in (None, me[k]) or me[k] is None for k in ("boot_id", "pid_namespace"))


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


def stale_reason(holder: dict | None, modified: float | None, ttl: float = DEFAULT_TTL,
                 now: float | None = None) -> str | None:
    """Why the lease ``holder`` (None: unreadable) is stale, or None while its holder must be presumed alive.

    ``modified`` is the lease object's modification time (the storage's clock). The age of a lease is taken
    from the newer of that and the holder's own ``renewed`` time, so a lease only expires when both clocks
    agree it is old: a holder whose clock runs behind is not taken over early."""
    now = _now() if now is None else now
    if holder is None:
        if modified is None or now - modified > ttl:
            return "the lease is unreadable and was last written " + _ago(modified, now)
        return None
    if _same_machine(holder, _machine()) and _process_gone(holder.get("pid"), holder.get("pid_started")):
        return f"its process {holder.get('pid')} on {holder.get('host')} is gone"
    ttl = _float(holder.get("ttl")) or ttl
    last = max(_float(holder.get("renewed_epoch")) or 0.0, modified or 0.0)
    if now - last > ttl:
        return f"it was not renewed for {now - last:.0f} s (ttl {ttl:g} s)"
    return None


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
            f"last renewed {holder.get('renewed', '?')}, {_ago(renewed, now)}, ttl {ttl:g} s)")


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
    """The lease object on a filesystem reached through fsspec (local disk, memory://, others).

    ``lock``: what makes a compare-and-swap atomic ("flock", "memory", or None for best effort)."""
    fs: Any
    path: str
    lock: str | None

    def _locked(self):
        if self.lock == "memory":
            return _MEMORY_LOCK
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
        with self._locked():
            if is_local(self.fs):
                _link_new(self.path, data)
            else:
                try:
                    self.fs.pipe_file(self.path, data, mode="create")
                except FileExistsError:
                    raise _Conflict() from None
        return _Seen(data, data, _now())

    def replace(self, data: bytes, seen: _Seen) -> _Seen:
        with self._locked():
            self._check(seen)
            write_bytes_atomic(self.fs, self.path, data)  # temp + rename where renames are atomic
        return _Seen(data, data, _now())

    def delete(self, seen: _Seen) -> None:
        with self._locked():
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
    with its next user). Where the filesystem refuses locks, warn and go on unlocked."""
    os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = False
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                locked = True
            except OSError as e:
                log.warning("cannot lock %s (%s): the output lease is not atomic on this filesystem", lock_path, e)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _write_local(path: str, data: bytes, publish) -> None:
    """Write ``data`` to a temp file next to ``path`` and ``publish(tmp)`` it (link or rename), so that no
    reader ever sees a half-written lease."""
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex}"
    try:
        write_synced(tmp, data)
        publish(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _link_new(path: str, data: bytes) -> None:
    """Create ``path`` holding ``data`` only if it does not exist: ``link`` fails with EEXIST like
    ``O_CREAT|O_EXCL`` (also on NFS), and the content is complete before the name appears."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def publish(tmp):
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise _Conflict() from None
        except OSError:  # no hard links on this filesystem: exclusive create, then write
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)

    try:
        _write_local(path, data, publish)
    except FileExistsError:
        raise _Conflict() from None


_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}


def _s3_error(exc: BaseException) -> tuple[str | None, int | None]:
    """``(code, http status)`` of the botocore error behind an s3fs exception (s3fs translates them, keeping
    the original as ``__cause__``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            err = response.get("Error") or {}
            return err.get("Code"), (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        exc = exc.__cause__ or exc.__context__
    return None, None


def _s3_conflict(exc: BaseException) -> bool:
    if isinstance(exc, FileExistsError):  # s3fs's translation of If-None-Match failing
        return True
    code, status = _s3_error(exc)
    return code in _CONFLICT_CODES or status == 412


def _s3_missing(exc: BaseException) -> bool:
    code, status = _s3_error(exc)
    return isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "404") or status == 404


@dataclass
class _S3Store:
    """The lease object on S3 (or an S3-compatible server): conditional PUT / DELETE on the etag."""
    fs: Any
    path: str

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
            if _s3_conflict(e) or (condition.get("IfMatch") and _s3_missing(e)):
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
            if _s3_conflict(e):
                raise _Conflict() from None
            code, status = _s3_error(e)
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


def _protocols(fs) -> set[str]:
    p = fs.protocol
    return {p} if isinstance(p, str) else set(p)


def _store(fs, path: str):
    protocols = _protocols(fs)
    if protocols & {"s3", "s3a"} and hasattr(fs, "call_s3"):
        return _S3Store(fs, path)
    if is_local(fs):
        return _FsStore(fs, path, "flock")
    if "memory" in protocols:
        return _FsStore(fs, path, "memory")
    log.warning("the output lease at %s is not atomic on %s: two runs started at the same moment could both "
                "write this output", display_path(fs, path), "/".join(sorted(protocols)))
    return _FsStore(fs, path, None)


def _parse(seen: _Seen) -> dict | None:
    """The lease content, or None for a corrupt / half-written / foreign object."""
    try:
        obj = json.loads(seen.raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) and obj.get("token") else None


# ---------------------------------------------------------------------------------------------- the lease
@dataclass
class Lease:
    """This run's hold on one output location. Create it with :meth:`acquire`."""

    root: str
    run_id: str
    storage_options: dict | None = None
    ttl: float = DEFAULT_TTL
    token: str = field(default_factory=lambda: secrets.token_hex(16), init=False, repr=False)
    _record: dict = field(default_factory=dict, init=False, repr=False)
    _seen: _Seen | None = field(default=None, init=False, repr=False)
    _store: Any = field(default=None, init=False, repr=False)
    path: str = field(default="", init=False)  # what users see: a local path or a URL

    def __post_init__(self):
        if not (self.ttl > 0):
            raise ValueError(f"lease ttl must be > 0 seconds, got {self.ttl!r}")
        fs, root = get_fs(self.root, self.storage_options)
        lease_path = join(root, LEASE_NAME)
        self._store = _store(fs, lease_path)
        self.path = display_path(fs, lease_path)

    @classmethod
    def acquire(cls, root: str, run_id: str, storage_options: dict | None = None,
                ttl: float = DEFAULT_TTL) -> "Lease":
        """Take the lease on ``root`` for ``run_id``; raises :class:`LeaseHeld` while a live run holds it.

        A stale lease (see :func:`stale_reason`) is taken over with a compare-and-swap against exactly the
        object that was judged stale; losing a swap means another run moved first, so look again."""
        lease = cls(root, run_id, storage_options, ttl)
        lease._acquire()
        return lease

    def _acquire(self) -> None:
        me = _machine()
        now = _now()
        pid = os.getpid()
        self._record = {"run_id": self.run_id, **me, "pid": pid, "pid_started": _process_start(pid),
                        "started": _iso(now), "started_epoch": now, "renewed": _iso(now), "renewed_epoch": now,
                        "ttl": self.ttl, "token": self.token}
        store = self._store
        for _ in range(_ATTEMPTS):
            self._record.pop("took_over", None)
            seen = store.read()
            holder = _parse(seen) if seen is not None else None
            if holder is not None and holder.get("token") == self.token:
                self._seen = seen  # ours: a write that "failed" after it landed (a retried PUT)
                return
            try:
                if seen is None:
                    self._seen = store.create(self._payload())
                else:
                    reason = stale_reason(holder, seen.modified, self.ttl)
                    if reason is None:
                        raise LeaseHeld(self._held_message(holder, seen), holder, self.path)
                    log.warning("taking over the output lease %s from %s: %s", self.path,
                                describe(holder, seen.modified), reason)
                    self._record["took_over"] = {**_brief(holder), "reason": reason}
                    self._seen = store.replace(self._payload(), seen)
            except _Conflict:
                continue
            if not isinstance(store, _FsStore) or store.lock is None:
                self._verify()  # servers that ignore conditional headers; best-effort filesystems
            return
        seen = store.read()
        raise LeaseHeld(f"could not take the output lease {self.path}: other runs keep changing it "
                        f"(now {describe(_parse(seen) if seen else None, seen and seen.modified)})",
                        _parse(seen) if seen else None, self.path)

    def _verify(self) -> None:
        seen = self._store.read()
        holder = _parse(seen) if seen is not None else None
        if holder is None or holder.get("token") != self.token:
            self._seen = None
            raise LeaseHeld(f"output lease {self.path} was taken by another run at the same moment: "
                            + describe(holder, seen and seen.modified), holder, self.path)
        self._seen = seen

    def _held_message(self, holder: dict | None, seen: _Seen) -> str:
        now = _now()
        if holder is None:
            return (f"output {self.root} is locked by {describe(None, seen.modified, now)} at {self.path}; it "
                    f"counts as stale {self.ttl:g} s after it was written (delete it if no run uses it)")
        ttl = _float(holder.get("ttl")) or self.ttl
        last = max(_float(holder.get("renewed_epoch")) or 0.0, seen.modified or 0.0)
        return (f"output {self.root} is in use by {describe(holder, seen.modified, now)}; lease {self.path}. "
                f"Wait for that run to end or stop it; if it died on another machine its lease expires in "
                f"{max(0.0, ttl - (now - last)):.0f} s")

    def _payload(self) -> bytes:
        return dumps_json(self._record)

    def renew(self) -> None:
        """Refresh ``renewed``; raises :class:`LeaseLost` if another run took the lease over (or it was
        removed): this run must stop writing the output."""
        if self._seen is None:
            raise LeaseLost(f"output lease {self.path} is not held by run {self.run_id!r} (released?)")
        now = _now()
        previous = dict(self._record)
        self._record.update(renewed=_iso(now), renewed_epoch=now)
        try:
            self._seen = self._store.replace(self._payload(), self._seen)
        except _Conflict:
            self._record = previous
            seen = self._store.read()
            holder = _parse(seen) if seen is not None else None
            if holder is not None and holder.get("token") == self.token:  # a retried write that had landed
                self._seen, self._record = seen, holder
                return
            self._seen = None
            now_by = "removed" if seen is None else "now held by " + describe(holder, seen.modified)
            raise LeaseLost(f"run {self.run_id!r} lost the output lease {self.path}: {now_by}") from None

    def release(self) -> None:
        """Remove the lease if it is still ours. Never raises for a lease that is gone or belongs to another
        run now (that run's lease stays)."""
        if self._seen is None:
            return
        seen, self._seen = self._seen, None
        try:
            self._store.delete(seen)
        except _Conflict:
            log.warning("output lease %s is no longer held by run %r; leaving it", self.path, self.run_id)

    def holder(self) -> dict:
        """The lease content this run wrote (last renewal included)."""
        return dict(self._record)

    @property
    def held(self) -> bool:
        return self._seen is not None

    @property
    def renew_interval(self) -> float:
        """How often to :meth:`renew`: several renewals fit in one ttl, so one slow write does not expire it."""
        return self.ttl / 4

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _brief(holder: dict | None) -> dict:
    if holder is None:
        return {"run_id": None}
    return {k: holder.get(k) for k in ("run_id", "host", "pid", "renewed")}


def read_lease(root: str, storage_options: dict | None = None) -> dict | None:
    """The current lease content at ``root`` (for ``kbatch status``), or None if there is none.

    An unreadable lease comes back as ``{"unreadable": True, "modified": <epoch or None>}``.
    ``stale_reason(content, None)`` tells a live holder from a dead one (by the holder's clock only)."""
    fs, path = get_fs(root, storage_options)
    seen = _store_quiet(fs, join(path, LEASE_NAME)).read()
    if seen is None:
        return None
    holder = _parse(seen)
    return holder if holder is not None else {"unreadable": True, "modified": seen.modified}


def _store_quiet(fs, path: str):
    """A store for reading only: no warning about atomicity."""
    if _protocols(fs) & {"s3", "s3a"} and hasattr(fs, "call_s3"):
        return _S3Store(fs, path)
    return _FsStore(fs, path, None)
