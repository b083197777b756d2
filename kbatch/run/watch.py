"""The progress view of a run, from its output location alone: ``kbatch status OUTPUT --watch``,
``JobHandle.progress()`` and the notebook widget of ``kbatch.render``.

What a run writes while it runs (``_job.json``'s ``progress``, refreshed by the driver every few seconds:
``kbatch.run.runner.PROGRESS_EVERY``; ``_lease.json``, renewed while its driver lives) is all the view
reads, so it works wherever the output is readable (local, S3, GCS: any fsspec URL), from any machine. It
never scans the records: that is ``kbatch status`` (``kbatch.run.status``), run once when the watch ends.

A view's ``state``:

* ``waiting``: no ``_job.json`` yet (a submitted job that has not started its run);
* ``running``: ``_job.json`` says running and its run holds a live lease;
* ``queued``: the same, but the run waits in the cluster's queue behind other kbatch jobs (``_job.json``'s
  ``schedule``: its position and the runs ahead; docs/clusters.md): it holds no GPU yet;
* ``ended``: ``_job.json`` has the run's end (status, exit code);
* ``lost``: ``_job.json`` still says running but its run's lease is gone or stale (the driver was killed):
  the run will not write its end; a rerun resumes it.
"""
from __future__ import annotations

import datetime as _dt
import html as _html
import json
import sys
import time
from typing import Any, TextIO

from kbatch import storage
from kbatch.output.job_file import JOB_FILE, SUCCESS_FILE

STAGE_ORDER = ("planned", "loading", "prior", "waiting_for_decoder", "decoder", "shard_buffer", "writes")


# ============================================================================================ the view
def read_view(root: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The progress view of the output at ``root``: plain JSON-able values (see the module docstring)."""
    from kbatch.output.lease import read_lease

    lease = _quiet(read_lease, root, storage_options)
    job = _quiet(storage.read_json, root, JOB_FILE, storage_options)
    if job and job.get("status") == "running" and not _holds(job, lease):
        job = _quiet(storage.read_json, root, JOB_FILE, storage_options) or job  # it may have ended just now
    from kbatch.output.markers import complete, read_marker

    # _SUCCESS counts only when it names the run of _job.json, complete (kbatch.output.markers)
    return make_view(root, job, lease, complete(job, _quiet(read_marker, root, SUCCESS_FILE, storage_options)))


def _quiet(fn, *args):
    """Reads that may race a writer (a half-listed folder, a transient storage error) count as nothing yet."""
    try:
        return fn(*args)
    except (OSError, ValueError):
        return None


def _holds(job: dict, lease: dict | None) -> bool:
    """The run of ``job`` holds a live lease (its driver is alive, or not yet known to be dead): the lease
    names the run, its process is not known to be gone (same machine), and it was renewed within twice its
    ttl by the holder's own clock (a watch only shows this; it never takes a lease over)."""
    from kbatch.output import lease as leases

    if not lease or lease.get("unreadable"):
        return bool(lease)  # an unreadable lease: presume its holder alive
    if lease.get("run_id") != job.get("run_id"):
        return False
    dead = getattr(leases, "dead_reason", None)
    try:
        if dead is not None and dead(lease):
            return False
        ttl = float(lease.get("ttl") or leases.DEFAULT_TTL)
        renewed = float(lease.get("renewed_epoch") or 0.0)
    except (TypeError, ValueError):
        return True
    return not renewed or time.time() - renewed <= 2 * ttl


def make_view(root: str, job: dict | None, lease: dict | None = None, success: bool = False,
              progress: dict | None = None) -> dict[str, Any]:
    """The view from what the output holds (``job``: ``_job.json``; ``progress``: a live snapshot that
    replaces ``job['progress']``, for the view of the run in this process)."""
    job = job or {}
    p = dict(progress if progress is not None else job.get("progress") or {})
    status = job.get("status")
    if not job:
        state = "waiting"
    elif status != "running":
        state = "ended"
    elif progress is not None or _holds(job, lease):
        state = "running"
    else:
        state = "lost"
    schedule = schedule_of(job)
    if state == "running" and schedule and schedule["state"] == "QUEUED":
        state = "queued"
    total = p.get("rows_total", job.get("total_rows"))
    done = p.get("rows_done")
    failed = p.get("rows_failed")
    queues = dict(p.get("queues") or {})
    replicas = queues.pop("replicas", None) or {}
    result = job.get("result") or {}
    if state == "ended" and result:  # the run's own end counts
        done = result.get("rows_total", 0) - result.get("rows_missing", 0)
        failed = result.get("rows_failed", 0) + result.get("rows_failed_before", 0)
        total = result.get("rows_total", total)
    missing = (total - done) if total is not None and done is not None else None
    return {
        "root": root, "run_id": job.get("run_id"), "state": state, "status": status,
        "exit_code": job.get("exit_code"), "success_marker": success, "error": job.get("error"),
        "rows_total": total, "rows_done": done, "rows_failed": failed,
        "rows_ok": (done - failed) if done is not None and failed is not None else None,
        "rows_missing": missing, "images": p.get("images"),
        "images_per_second": p.get("images_per_second"),
        "images_per_second_recent": p.get("images_per_second_recent", p.get("images_per_second")),
        "eta_seconds": p.get("eta_seconds") if state == "running" else None, "schedule": schedule,
        "seconds": p.get("seconds"), "updated": p.get("updated"),
        "queues": queues, "replicas": replicas,
        "started": job.get("started"), "finished": job.get("finished"),
        "lease": {k: lease.get(k) for k in ("run_id", "host", "pid", "renewed", "renewed_epoch", "ttl")}
        if lease and not lease.get("unreadable") else None,
    }


def schedule_of(job: dict | None) -> dict | None:
    """``_job.json``'s ``schedule`` (the run's place among the cluster's kbatch jobs, written by its driver
    on every heartbeat to the coordinator), with every field present; None for a run alone on its Ray."""
    s = (job or {}).get("schedule")
    if not isinstance(s, dict) or not s.get("state"):
        return None
    ahead = [a.get("run_id", "?") if isinstance(a, dict) else str(a) for a in (s.get("ahead") or [])]
    return {"state": str(s["state"]).upper(), "queue_position": s.get("queue_position"), "ahead": ahead,
            "allotted": s.get("allotted"), "held": s.get("held"), "priority": s.get("priority", 0),
            "weight": s.get("weight", 1), "since": s.get("since"), "resource": s.get("resource") or "GPU",
            "capacity": s.get("capacity"), "coordinator": s.get("coordinator", True)}


# ======================================================================================= formatting
def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(max(0.0, float(seconds))))
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def _age(iso: str | None, now: float) -> str:
    try:
        return duration(now - _dt.datetime.fromisoformat(str(iso)).timestamp()) + " ago"
    except (TypeError, ValueError):
        return "?"


def _n(v) -> str:
    return "?" if v is None else f"{v:,}" if isinstance(v, int) else str(v)


def _rate(v) -> str:
    return "?" if v is None else f"{float(v):.2f}"


def _fraction(v: dict) -> float | None:
    total, done = v.get("rows_total"), v.get("rows_done")
    if not total or done is None:
        return None if total != 0 else 1.0
    return max(0.0, min(1.0, done / total))


def _queues_text(queues: dict) -> str:
    keys = [k for k in STAGE_ORDER if k in queues] + sorted(k for k in queues if k not in STAGE_ORDER)
    return " · ".join(f"{k} {queues[k]}" for k in keys)


def _replicas_text(replicas: dict) -> str:
    parts = []
    for stage, r in replicas.items():
        bits = [f"{r.get('running', 0)} running"]
        for k in ("pending", "draining"):
            if r.get(k):
                bits.append(f"{r[k]} {k}")
        parts.append(f"{stage} " + ", ".join(bits))
    return " · ".join(parts)


def _amount(v) -> str:
    return "?" if v is None else f"{float(v):g}"


def queue_text(sched: dict) -> str:
    """``position 2 in the cluster's queue, behind A, B``."""
    pos = sched.get("queue_position")
    text = f"position {pos} in the cluster's queue" if pos else "in the cluster's queue"
    ahead = sched.get("ahead") or []
    if ahead:
        text += ", behind " + ", ".join(ahead[:3]) + (f" and {len(ahead) - 3} more" if len(ahead) > 3 else "")
    return text


def schedule_line(sched: dict) -> str:
    """The run's share of the cluster: priority, weight, GPUs held / allotted (``kbatch jobs`` shows all runs)."""
    r = sched.get("resource") or "GPU"
    text = (f"priority {sched.get('priority')} · weight {_amount(sched.get('weight'))} · {r} "
            f"{_amount(sched.get('held'))} held / {_amount(sched.get('allotted'))} allotted")
    if sched.get("capacity") is not None:
        text += f" of {_amount(sched['capacity'])}"
    if sched.get("coordinator") is False:
        text += " (no coordinator answers: keeping the last allotment)"
    return text


def state_text(v: dict) -> str:
    s = v["state"]
    sched = v.get("schedule") or {}
    if s == "queued":
        return f"QUEUED ({queue_text(sched)}; it starts when it gets GPUs)"
    if s == "running" and sched.get("state") == "DRAINING":
        return "RUNNING, DRAINING (giving replicas back at batch boundaries to a job of higher priority or share)"
    if s == "running" and sched.get("state") == "CANCELLING":
        return "RUNNING, CANCELLING (kbatch cancel asked it to stop: it ends after its batches in flight)"
    if s == "waiting":
        return "WAITING (no _job.json yet: the run has not started)"
    if s == "lost":
        return "LOST (the run's driver is gone: its lease expired; a rerun resumes it)"
    if s == "ended":
        code = v.get("exit_code")
        return f"ENDED {str(v.get('status') or '?').upper()}" + (f" (exit code {code})" if code is not None else "")
    return "RUNNING"


def format_frame(v: dict, now: float | None = None, width: int = 40) -> str:
    """The multi-line view (a terminal frame; also ``str()`` of ``JobHandle.progress()``)."""
    now = time.time() if now is None else now
    lines = [f"kbatch   {v['root']}" + (f"   run {v['run_id']}" if v.get("run_id") else ""),
             f"state    {state_text(v)}"]
    f = _fraction(v)
    if f is not None:
        bar = "#" * int(round(f * width))
        lines.append(f"rows     [{bar:-<{width}}] {100 * f:5.1f}%  {_n(v['rows_done'])}/{_n(v['rows_total'])}")
    else:
        lines.append(f"rows     {_n(v.get('rows_done'))}/{_n(v.get('rows_total'))}")
    lines.append(f"         ok {_n(v.get('rows_ok'))}   failed {_n(v.get('rows_failed'))}   "
                 f"missing {_n(v.get('rows_missing'))}   images {_n(v.get('images'))}")
    if v["state"] in ("running", "lost") or v.get("images_per_second") is not None:
        eta = f"   ETA {duration(v['eta_seconds'])}" if v["state"] == "running" else ""
        lines.append(f"speed    {_rate(v.get('images_per_second_recent'))} img/s (last minute)   "
                     f"{_rate(v.get('images_per_second'))} img/s (run)" + eta)
    if v.get("queues") and v["state"] == "running":  # the last ones of an ended run mean nothing now
        lines.append(f"queues   {_queues_text(v['queues'])}")
    if v.get("replicas") and v["state"] == "running":
        lines.append(f"replicas {_replicas_text(v['replicas'])}")
    if v.get("schedule") and v["state"] in ("running", "queued"):
        lines.append(f"cluster  {schedule_line(v['schedule'])}")
    if v.get("updated"):
        lease = v.get("lease") or {}
        held = (f" · driver {lease.get('host')} pid {lease.get('pid')}, lease renewed "
                f"{duration(now - float(lease['renewed_epoch']))} ago" if lease.get("renewed_epoch") else "")
        lines.append(f"updated  {v['updated']} ({_age(v['updated'], now)})"
                     f"{held if v['state'] in ('running', 'queued') else ''}")
    if v.get("error"):
        lines.append(f"stopped  {v['error']}")
    return "\n".join(lines)


def format_line(v: dict) -> str:
    """One line of the view (``--watch`` when the output is not a terminal: appended, one per change)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")
    f = _fraction(v)
    pct = f" ({100 * f:.1f}%)" if f is not None else ""
    text = (f"{stamp} {v['state']}: rows {_n(v.get('rows_done'))}/{_n(v.get('rows_total'))}{pct} "
            f"ok {_n(v.get('rows_ok'))} failed {_n(v.get('rows_failed'))} missing {_n(v.get('rows_missing'))}")
    if v["state"] == "running":
        text += f", {_rate(v.get('images_per_second_recent'))} img/s, ETA {duration(v.get('eta_seconds'))}"
    if v.get("queues") and v["state"] == "running":
        text += f" | queues {_queues_text(v['queues'])}"
    if v.get("replicas") and v["state"] == "running":
        text += f" | replicas {_replicas_text(v['replicas'])}"
    if v["state"] == "queued":
        text += f" | QUEUED: {queue_text(v['schedule'])}"
    elif v["state"] == "running" and v.get("schedule"):
        text += f" | {v['schedule']['state']}: {schedule_line(v['schedule'])}"
    if v["state"] == "ended":
        text += f" | {state_text(v)}"
    return text


def format_html(v: dict, now: float | None = None) -> str:
    """The view as HTML (notebooks: the live widget of ``kbatch.render``, ``JobHandle.progress()``)."""
    e = _html.escape
    f = _fraction(v)
    colour = {"running": "#2a7ae2", "ended": "#2e8b57" if v.get("exit_code") == 0 else "#c0392b",
              "lost": "#c0392b", "waiting": "#888", "queued": "#d68910"}[v["state"]]
    rows = [("rows", f"{_n(v.get('rows_done'))} / {_n(v.get('rows_total'))} done · ok {_n(v.get('rows_ok'))} · "
                     f"failed {_n(v.get('rows_failed'))} · missing {_n(v.get('rows_missing'))}")]
    if v.get("images_per_second") is not None:
        speed = f"{_rate(v.get('images_per_second_recent'))} img/s (last minute) · {_rate(v.get('images_per_second'))} img/s (run)"
        if v["state"] == "running":
            speed += f" · ETA {duration(v.get('eta_seconds'))}"
        rows.append(("speed", speed))
    if v.get("queues") and v["state"] == "running":
        rows.append(("queues", _queues_text(v["queues"])))
    if v.get("replicas") and v["state"] == "running":
        rows.append(("replicas", _replicas_text(v["replicas"])))
    if v["state"] == "queued":
        rows.append(("queue", queue_text(v["schedule"])))
    if v.get("schedule") and v["state"] in ("running", "queued"):
        rows.append(("cluster", schedule_line(v["schedule"])))
    if v.get("updated"):
        age = (f" ({_age(v['updated'], time.time() if now is None else now)})"
               if v["state"] in ("running", "queued") else "")
        rows.append(("updated", f"{v['updated']}{age}"))  # a static page: an age only while it is redrawn
    if v.get("error"):
        rows.append(("stopped", v["error"]))
    pct = 100 * f if f is not None else 0.0
    table = "".join(f"<tr><td style='padding:1px 8px 1px 0;color:#666'>{e(k)}</td><td>{e(str(t))}</td></tr>"
                    for k, t in rows)
    return (f"<div class='kbatch-progress' style='font-family:monospace;font-size:12px'>"
            f"<div><b>kbatch</b> {e(str(v['root']))}" + (f" · run {e(str(v['run_id']))}" if v.get("run_id") else "")
            + f" · <span style='color:{colour}'><b>{e(state_text(v))}</b></span></div>"
            f"<div style='background:#eee;width:420px;height:14px;border-radius:3px;margin:4px 0'>"
            f"<div style='background:{colour};width:{pct:.1f}%;height:14px;border-radius:3px'></div></div>"
            f"<div>{pct:.1f}%</div><table style='border-collapse:collapse'>{table}</table></div>")


class View(dict):
    """A progress view (``JobHandle.progress()``): a dict that prints as the terminal frame and shows as
    HTML in a notebook."""

    def __str__(self) -> str:
        return format_frame(self)

    def _repr_html_(self) -> str:
        return format_html(self)

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(format_frame(self))


# ============================================================================================== watch
CLEAR = "\x1b[H\x1b[2J"


def watch(root: str, storage_options: dict | None = None, interval: float = 5.0, out: TextIO | None = None,
          tty: bool | None = None, final_summary: bool = True, as_json: bool = False) -> int:
    """Redraw the view every ``interval`` seconds until the run ends (``ended`` or ``lost``), then print the
    ``kbatch status`` summary and return its exit code (0 complete, 3 otherwise). On a terminal each frame
    clears the screen; elsewhere (a log, a pipe) one line is appended whenever the view changes
    (``as_json``: the view as one JSON object per line, and the summary as JSON)."""
    out = out or sys.stdout
    tty = bool(getattr(out, "isatty", lambda: False)()) if tty is None and not as_json else bool(tty)
    last_line = None
    while True:
        v = read_view(root, storage_options)
        if tty:
            out.write(CLEAR + format_frame(v) + f"\n\n(every {interval:g} s; Ctrl-C stops watching, the run "
                                                "goes on)\n")
        else:
            sched = v.get("schedule") or {}
            key = (v["state"], v.get("updated"), v.get("rows_done"), sched.get("state"), sched.get("queue_position"))
            if key != last_line:
                out.write((json.dumps(v, default=str) if as_json else format_line(v)) + "\n")
                last_line = key
        out.flush()
        if v["state"] in ("ended", "lost"):
            break
        time.sleep(interval)
    if not final_summary:
        return 0 if v.get("exit_code") == 0 and v.get("success_marker") else 3
    from kbatch.run.status import format_summary, summarize

    summary = summarize(root, storage_options)
    out.write(json.dumps(summary, default=str) + "\n" if as_json else "\n" + format_summary(summary) + "\n")
    out.flush()
    return 0 if summary.get("complete") else 3
