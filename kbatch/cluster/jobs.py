"""The kbatch jobs of a Ray cluster as a user sees and steers them: ``kbatch jobs`` (:func:`list_jobs`, one
:class:`~kbatch.cluster.state.JobRow` per registered run, and :func:`format_table`) and ``kbatch cancel``
(:func:`cancel`), asked of the cluster's coordinator (``kbatch.cluster.coordinator``; docs/clusters.md).

``address`` is the cluster as ``kbatch submit`` and Ray take it: ``None`` (the Ray this process is connected
to, else ``RAY_ADDRESS``, else a Ray running on this machine), a GCS address (``head:6379``, ``auto``), a Ray
client address (``ray://head:10001``), or the job server (``http://head:8265``, as ``kbatch submit``), through
which the question runs as a short Ray job on the cluster (kbatch must be importable there, as for every
kbatch job). Nothing here starts a Ray: no cluster at ``address`` raises :class:`NoCluster`. A cluster
without a coordinator (no kbatch job has run on it since it started) has no kbatch jobs: ``[]``.
"""
from __future__ import annotations

import json
import os
import time

from kbatch.cluster.state import QUEUED, JobRow

COORDINATOR_NAME, COORDINATOR_NAMESPACE = "kbatch-coordinator", "kbatch"
# ``kbatch jobs --json`` through a job server: the reply is the job's log line that starts with this
REPLY_MARKER = "kbatch-jobs-reply:"
JOB_SERVER_TIMEOUT = 120.0  # seconds a question sent through a job server may take (job start included)


class NoCluster(ConnectionError):
    """No Ray cluster answers at the address (``kbatch jobs`` / ``kbatch cancel`` exit 2, naming it)."""


def _names() -> tuple[str, str]:
    try:  # the coordinator's own constants, where it defines them
        from kbatch.cluster import coordinator as c

        return getattr(c, "NAME", COORDINATOR_NAME), getattr(c, "NAMESPACE", COORDINATOR_NAMESPACE)
    except ImportError:
        return COORDINATOR_NAME, COORDINATOR_NAMESPACE


def _job_server(address: str | None) -> bool:
    return bool(address) and str(address).startswith(("http://", "https://"))


def _address(address: str | None) -> str | None:
    """The address to ask: ``address``; else, when this process is not connected to a Ray, a job server's
    ``RAY_ADDRESS`` (``http://head:8265``, as ``ray job submit`` and ``kbatch submit`` take it); else None
    (the connected Ray, a GCS ``RAY_ADDRESS``, or a Ray running on this machine)."""
    if address:
        return address
    import ray

    env = os.environ.get("RAY_ADDRESS")
    return env if not ray.is_initialized() and _job_server(env) else None


def _reachable(address: str, timeout: float = 5.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) that refuses connections is no cluster: say so at once
    (``ray.init`` would retry a dead GCS address for minutes)."""
    import socket

    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or "/" in hostport:
        return  # "auto", "local" or another form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise NoCluster(f"no Ray cluster at {address!r} ({e.strerror or type(e).__name__}); give the cluster's "
                        "address with --address (head:6379, ray://head:10001 or http://head:8265) or "
                        "RAY_ADDRESS") from None


class _Connection:
    """Ray connected for one question: the connection this process has, or one opened (and closed) here
    to an existing cluster. Never starts a local Ray."""

    def __init__(self, address: str | None):
        self.address, self.opened = address, False

    def __enter__(self):
        import logging

        import ray

        if ray.is_initialized():
            return ray
        address = self.address or os.environ.get("RAY_ADDRESS") or "auto"
        _reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as e:
            raise NoCluster(f"no Ray cluster at {address!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            "give the cluster's address with --address (head:6379, ray://head:10001 or "
                            "http://head:8265) or RAY_ADDRESS") from None
        self.opened = True
        return ray

    def __exit__(self, *exc):
        if self.opened:
            import ray

            ray.shutdown()


def _coordinator(ray):
    name, namespace = _names()
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:  # no such actor: no kbatch job has registered on this cluster
        return None


def _rows(value) -> list[JobRow]:
    out = []
    for r in value or []:  # JobRows from the coordinator, dicts from a job server's reply
        if isinstance(r, JobRow):
            out.append(r)
        elif isinstance(r, dict):
            fields = JobRow.__dataclass_fields__
            out.append(JobRow(**{k: r.get(k) for k in fields}))
    return out


def order(rows: list[JobRow]) -> list[JobRow]:
    """Running (and draining) runs first, by priority (highest first), then the queue in its order."""
    def key(r: JobRow):
        queued = r.state == QUEUED
        return (queued, (r.queue_position or 0) if queued else -int(r.priority or 0), r.run_id)

    return sorted(rows, key=key)


def survey(address: str | None = None, timeout: float = 30.0) -> tuple[bool, list[JobRow]]:
    """(whether the cluster has a kbatch coordinator, the runs registered with it in :func:`order`).
    :class:`NoCluster` when no cluster answers at ``address``."""
    address = _address(address)
    if _job_server(address):
        reply = _ask_job_server(address, ["jobs"])
        return bool(reply.get("coordinator")), order(_rows(reply.get("jobs")))
    with _Connection(address) as ray:
        actor = _coordinator(ray)
        if actor is None:
            return False, []
        return True, order(_rows(ray.get(actor.jobs.remote(), timeout=timeout)))


def list_jobs(address: str | None = None, timeout: float = 30.0) -> list[JobRow]:
    """The kbatch runs registered with the cluster's coordinator, running ones first, then the queue in its
    order; ``[]`` when no coordinator runs (no kbatch job has run on the cluster since it started).
    :class:`NoCluster` when no cluster answers at ``address``."""
    return survey(address, timeout)[1]


def resolve(rows: list[JobRow], run_id: str) -> JobRow | None:
    """The row of ``run_id``: an exact run id, or a prefix of exactly one (as ``kbatch cancel`` takes it)."""
    exact = [r for r in rows if r.run_id == run_id]
    if exact:
        return exact[0]
    matches = [r for r in rows if r.run_id.startswith(run_id)] if run_id else []
    return matches[0] if len(matches) == 1 else None


def cancel(run_id: str, address: str | None = None, timeout: float = 30.0) -> JobRow | None:
    """Ask the run ``run_id`` (or the one run whose id starts with it) to stop: the coordinator marks it,
    its driver sees the mark on its next heartbeat (every few seconds) and stops as on SIGTERM: the batches
    in flight end, its lease is released, the output stays resumable, exit code 3. Returns the run's row
    (state ``CANCELLING``), or None when the cluster has no such run."""
    address = _address(address)
    if _job_server(address):
        rows = _rows([(_ask_job_server(address, ["cancel", run_id]) or {}).get("row")])
        return rows[0] if rows else None
    with _Connection(address) as ray:
        actor = _coordinator(ray)
        if actor is None:
            return None
        row = resolve(_rows(ray.get(actor.jobs.remote(), timeout=timeout)), run_id)
        if row is None:
            return None
        got = _rows([ray.get(actor.cancel.remote(row.run_id), timeout=timeout)])
        return got[0] if got else None


def wait_gone(run_id: str, address: str | None = None, timeout: float | None = None, poll: float = 2.0) -> bool:
    """Block until the run ``run_id`` is no longer registered (it stopped, or its registration expired);
    False if it still is after ``timeout`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if all(r.run_id != run_id for r in list_jobs(address)):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(poll)


# ============================================================================ through a job server
def _ask_job_server(address: str, args: list[str]):
    """Run ``python -m kbatch.cli ARGS --address auto --reply`` as a Ray job on the cluster behind the job
    server at ``address`` and return the JSON it replies (a dashboard address reaches no actor itself)."""
    import logging

    from ray.job_submission import JobStatus, JobSubmissionClient

    logging.getLogger("ray.dashboard").setLevel(logging.WARNING)  # "Uploading package ..." on every question
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise NoCluster(f"no Ray job server at {address!r} ({type(e).__name__}: {e})") from None
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the kbatch package itself
    job_id = client.submit_job(entrypoint="python -m kbatch.cli " + " ".join(_quote(a) for a in args) + " --reply",
                               runtime_env={"py_modules": [package]}, metadata={"kbatch": "jobs"})
    deadline = time.monotonic() + JOB_SERVER_TIMEOUT
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise TimeoutError(f"the question sent to {address} as Ray job {job_id} took over "
                               f"{JOB_SERVER_TIMEOUT:g} s")
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    for line in reversed(logs.splitlines()):
        if line.startswith(REPLY_MARKER):
            return json.loads(line[len(REPLY_MARKER):])
    raise RuntimeError(f"Ray job {job_id} on {address} ended {status} without a reply; its logs end with:\n"
                       + "\n".join(logs.splitlines()[-10:]))


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(str(arg))


# ================================================================================================ table
def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(max(0.0, float(seconds))))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _amount(v: float | None) -> str:
    if v is None:
        return "?"
    return f"{v:g}" if float(v) == int(v) else f"{v:.2f}"


def _short(text: str, width: int) -> str:
    text = str(text)
    return text if len(text) <= width else "…" + text[-(width - 1):]


def queue_text(row: JobRow, width: int | None = None) -> str:
    """``#2 behind A, B``: a queued run's position and the runs ahead of it; ``-`` for a running one."""
    if row.state != QUEUED:
        return "-"
    ahead = [a.get("run_id", "?") if isinstance(a, dict) else str(a) for a in (row.ahead or [])]
    text = f"#{row.queue_position}" if row.queue_position else "queued"
    if ahead:
        text += " behind " + ", ".join(ahead)
    return _short(text, width) if width else text


HEADER = ("RUN", "OUTPUT", "PRIO", "WEIGHT", "STATE", "HELD/ALLOTTED", "ROWS", "IMG/S", "ETA", "QUEUE")


def format_table(rows: list[JobRow], output_width: int = 40) -> str:
    """``kbatch jobs``' table: one line per run (see :data:`HEADER`)."""
    lines = [HEADER]
    for r in rows:
        rows_text = f"{r.rows_done:,}/{r.rows_total:,}" if r.rows_total else f"{r.rows_done or 0:,}/?"
        lines.append((r.run_id, _short(r.output, output_width), str(r.priority), _amount(r.weight), r.state,
                      f"{_amount(r.held)}/{_amount(r.allotted)} {r.resource}", rows_text,
                      "-" if r.img_s is None else f"{r.img_s:.2f}",
                      _duration(None if r.state == QUEUED else r.eta_s), queue_text(r)))  # queued: no rate to go by
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)
