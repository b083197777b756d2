"""Is a lease holder alive? Host/pid liveness and the storage-clock hint, never a clock comparison.

Promises (docs/output.md, "The lease"):

- :func:`dead_reason` says a holder is *certainly* dead only when it ran on this machine (same host, same
  boot id, same pid namespace: all three known on both sides) and its process is gone (no such pid, a zombie,
  or a pid reused by a later process). Anything else is left to the ttl rule of ``kbatch.output.lease``.
- :func:`looks_recent` is a hint only: whether the lease object was written within its ttl by the storage's
  clock (a time in the future means the clocks disagree: not recent). It decides whether a contender exits 2
  at once or watches the lease; it never decides a takeover.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import socket
import time
from typing import Any

import psutil

PID_START_TOLERANCE = 1.0  # seconds: psutil's create_time is rounded to clock ticks
FUTURE_TOLERANCE = 2.0  # seconds a storage timestamp may be ahead of this clock and still count as "recent"


def now() -> float:
    return time.time()


def iso(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).isoformat(timespec="seconds")


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def machine() -> dict:
    """Who "this machine" is, for the dead-pid rule: a pid can only be probed in the pid namespace of the
    same boot of the same host. Hostnames alone are not unique (containers, cloned VMs)."""
    pidns = None
    with contextlib.suppress(OSError):
        pidns = os.readlink("/proc/self/ns/pid")
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": pidns}


def process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def same_machine(holder: dict, me: dict) -> bool:
    """Host, boot id and pid namespace all known on both sides and equal. A side without ``/proc`` (no boot
    id) is never "this machine": two hosts with one name would take each other's leases as dead pids."""
    return all(holder.get(k) is not None and me.get(k) is not None and holder.get(k) == me.get(k)
               for k in ("host", "boot_id", "pid_namespace"))


def process_gone(pid: Any, started: Any) -> bool:
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
    if same_machine(holder, me or machine()) and process_gone(holder.get("pid"), holder.get("pid_started")):
        return f"its process {holder.get('pid')} on {holder.get('host')} is gone"
    return None


def to_float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def looks_recent(holder: dict | None, modified: float | None, ttl: float, now: float | None = None) -> bool:
    """A hint, never a reason to take over: the object was written within ``ttl`` by the storage's clock (its
    mtime / LastModified, read against this machine's clock; a time in the future beyond a small tolerance
    means the clocks disagree: not recent, watch it). Without a storage time, the holder's own stamp."""
    now = time.time() if now is None else now
    stamp = modified if modified is not None else to_float((holder or {}).get("renewed_epoch"))
    if stamp is None:
        return False
    return -FUTURE_TOLERANCE <= now - stamp <= ttl


def ttl_of(holder: dict | None, default: float) -> float:
    return to_float((holder or {}).get("ttl")) or default


def _ago(epoch: float | None, now: float) -> str:
    return "at an unknown time" if epoch is None else f"{max(0.0, now - epoch):.0f} s ago"


def describe(holder: dict | None, modified: float | None = None, now: float | None = None) -> str:
    """One line naming a lease holder, for messages and ``kbatch status``."""
    now = time.time() if now is None else now
    if holder is None:
        return "an unreadable lease written " + _ago(modified, now)
    renewed, ttl = to_float(holder.get("renewed_epoch")), to_float(holder.get("ttl")) or 0.0
    return (f"run {holder.get('run_id')!r} (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"epoch {holder.get('epoch', '?')}, last renewed {holder.get('renewed', '?')} by its clock, "
            f"{_ago(renewed, now)} by ours, ttl {ttl:g} s)")
