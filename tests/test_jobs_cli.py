"""The surfaces of a shared cluster (docs/clusters.md, "Many jobs on one cluster"): ``kbatch jobs`` and
``kbatch cancel`` against a real coordinator actor with two registered runs; ``QUEUED`` with its position
and the runs ahead in ``kbatch status``, ``--watch``, ``JobHandle.progress()``'s view and the notebook view,
read from ``_job.json``'s ``schedule``; the metrics of the queue."""
import json
import os
import subprocess
import sys
import time

from kbatch import storage
from kbatch.cli import main
from kbatch.output.lease import Lease
from kbatch.run import watch as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ============================================================================ kbatch jobs / kbatch cancel
def _no_coordinator(ray):
    from kbatch.cluster.coordinator import find

    actor = find(ray)
    if actor is not None:  # one a test before this left (detached): a new one is made from heartbeats
        ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + 30
        while find(ray) is not None and time.monotonic() < deadline:
            time.sleep(0.2)


def _demand(run_id, output, priority, **kw):
    from kbatch.cluster.state import JobDemand

    return JobDemand(run_id=run_id, output=output, priority=priority, resource="GPU", unit=1.0, cluster=4.0,
                     started_at=time.time(), ttl_s=120.0, **kw)


def test_jobs_and_cancel_against_a_coordinator(ray_session, capsys):
    """Two runs registered with the cluster's coordinator (4 GPUs as the runs see the cluster): the urgent
    one (priority 1) is allotted all 4 and runs, the backfill waits QUEUED #1 behind it. ``kbatch jobs``
    lists both (table and --json, in-process and from another process by address); ``kbatch cancel`` takes
    a prefix, marks the run CANCELLING and its next heartbeat says cancel."""
    from kbatch.cluster import jobs
    from kbatch.cluster.coordinator import coordinator

    ray = ray_session
    _no_coordinator(ray)
    assert jobs.survey() == (False, [])
    assert main(["jobs"]) == 0
    assert "no kbatch coordinator runs on it" in capsys.readouterr().err

    actor = coordinator(ray)
    try:
        deadline = time.monotonic() + 30  # a new coordinator may wait a few seconds for runs it expects
        while ray.get(actor.info.remote())["warming"] and time.monotonic() < deadline:
            time.sleep(0.5)
        urgent = _demand("20261206T070000-aaaaaa", "/data/urgent", 1, held=4.0, can_use=4.0, rows_total=300,
                         rows_done=120, img_s=3.5, eta_s=51.0)
        backfill = _demand("20261206T060000-bbbbbb", "s3://bucket/backfill", 0, rows_total=10_000_000,
                           rows_done=0)
        ray.get(actor.heartbeat.remote(backfill))
        a_urgent = ray.get(actor.heartbeat.remote(urgent))
        a_back = ray.get(actor.heartbeat.remote(backfill))
        assert (a_urgent.state, a_urgent.amount) == ("RUNNING", 4.0)
        assert (a_back.state, a_back.amount, a_back.queue_position) == ("QUEUED", 0.0, 1)

        coordinated, rows = jobs.survey()
        assert coordinated and [r.run_id for r in rows] == [urgent.run_id, backfill.run_id]
        assert main(["jobs", "--json"]) == 0
        got = {r["run_id"]: r for r in json.loads(capsys.readouterr().out)}
        u, b = got[urgent.run_id], got[backfill.run_id]
        assert (u["state"], u["priority"], u["held"], u["allotted"], u["rows_done"], u["rows_total"]) == \
            ("RUNNING", 1, 4.0, 4.0, 120, 300)
        assert (u["img_s"], u["eta_s"], u["queue_position"]) == (3.5, 51.0, None)
        assert (b["state"], b["allotted"], b["queue_position"], b["ahead"]) == ("QUEUED", 0.0, 1, [urgent.run_id])
        assert b["output"] == "s3://bucket/backfill" and b["resource"] == "GPU"

        assert main(["jobs"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == ["RUN", "OUTPUT", "PRIO", "WEIGHT", "STATE", "HELD/ALLOTTED", "ROWS", "IMG/S",
                                    "ETA", "QUEUE"]
        assert table[1].split() == [urgent.run_id, "/data/urgent", "1", "1", "RUNNING", "4/4", "GPU", "120/300",
                                    "3.50", "51s", "-"]
        assert table[2].split() == [backfill.run_id, "s3://bucket/backfill", "0", "1", "QUEUED", "0/0", "GPU",
                                    "0/10,000,000", "-", "-", "#1", "behind", urgent.run_id]

        # another process, by the cluster's address (connects, asks, disconnects; starts no Ray)
        address = ray.get_runtime_context().gcs_address
        env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                   PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        env.pop("RAY_ADDRESS", None)
        p = subprocess.run([sys.executable, "-m", "kbatch.cli", "jobs", "--json", "--address", address],
                           capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        assert [r["run_id"] for r in json.loads(p.stdout)] == [urgent.run_id, backfill.run_id]

        # cancel: a prefix of exactly one run; an unknown one is a usage error (2), naming it
        assert main(["cancel", "20261206T06"]) == 0
        assert f"cancel requested: run {backfill.run_id}" in capsys.readouterr().err
        assert {r.run_id: r.state for r in jobs.list_jobs()}[backfill.run_id] == "CANCELLING"
        assert ray.get(actor.heartbeat.remote(backfill)).cancel is True
        assert ray.get(actor.heartbeat.remote(urgent)).cancel is False
        assert main(["cancel", "no-such-run"]) == 2
        assert "no kbatch job 'no-such-run'" in capsys.readouterr().err
        assert main(["cancel", "20261206T0"]) == 2  # a prefix of two runs names neither
        capsys.readouterr()
    finally:
        for run_id in ("20261206T070000-aaaaaa", "20261206T060000-bbbbbb"):
            ray.get(actor.deregister.remote(run_id))
        ray.kill(actor, no_restart=True)


def test_jobs_without_a_cluster_is_a_usage_error(capsys):
    """No Ray at the address: exit 2 naming it (``kbatch jobs`` never starts a Ray of its own)."""
    p = subprocess.run([sys.executable, "-m", "kbatch.cli", "jobs", "--address", "127.0.0.1:9"],
                       capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"))
    assert p.returncode == 2, p.stderr[-2000:]
    assert "no Ray cluster at '127.0.0.1:9'" in p.stderr


# ==================================================================== QUEUED in status, watch, notebook
RUN = "20261206T063301-77aa10"
QUEUED = {"state": "QUEUED", "queue_position": 2, "ahead": ["20261206T063015-9f0e21", "20261206T061203-ab12cd"],
          "allotted": 0, "held": 0, "priority": 0, "weight": 1, "since": "2026-12-06T06:33:05+00:00",
          "resource": "GPU", "capacity": 16}


def _running_job(root, schedule):
    job = {"run_id": RUN, "status": "running", "output": root, "total_rows": 500, "manifest": "<in-memory>",
           "started": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
           "progress": {"rows_total": 500, "rows_done": 0, "rows_failed": 0, "images": 0, "images_per_second": 0.0,
                        "images_per_second_recent": 0.0, "eta_seconds": None, "queues": {}, "updated": "now"},
           "schedule": schedule}
    storage.write_json_atomic(root, "_job.json", job)
    return job


def test_status_watch_and_views_show_queued(tmp_path, capsys):
    root = str(tmp_path / "out")
    lease = Lease.acquire(root, RUN)  # the run's driver is alive: its lease is held
    try:
        _running_job(root, QUEUED)
        v = W.read_view(root)
        assert v["state"] == "queued" and v["eta_seconds"] is None
        assert v["schedule"]["queue_position"] == 2 and v["schedule"]["ahead"][0] == "20261206T063015-9f0e21"
        frame = W.format_frame(v)
        assert ("state    QUEUED (position 2 in the cluster's queue, behind 20261206T063015-9f0e21, "
                "20261206T061203-ab12cd; it starts when it gets GPUs)") in frame
        assert "cluster  priority 0 · weight 1 · GPU 0 held / 0 allotted of 16" in frame
        assert "| QUEUED: position 2 in the cluster's queue, behind 20261206T063015-9f0e21" in W.format_line(v)
        html = W.format_html(v)
        assert "QUEUED (position 2" in html and "#d68910" in html

        assert main(["status", root]) == 3  # not complete
        text = capsys.readouterr().out
        assert "status:   QUEUED (waiting for GPUs behind other kbatch jobs" in text
        assert "cluster:  QUEUED, position 2 in the cluster's queue, behind 20261206T063015-9f0e21" in text
        assert main(["status", root, "--json"]) == 3
        summary = json.loads(capsys.readouterr().out)
        assert summary["queued"] is True and summary["schedule"]["queue_position"] == 2

        # running, giving GPUs back to a job of higher priority
        _running_job(root, {**QUEUED, "state": "DRAINING", "queue_position": None, "ahead": [], "allotted": 4,
                            "held": 7})
        v = W.read_view(root)
        assert v["state"] == "running" and "RUNNING, DRAINING" in W.format_frame(v)
        assert "GPU 7 held / 4 allotted of 16" in W.format_frame(v)
        assert main(["status", root]) == 3
        text = capsys.readouterr().out
        assert "status:   RUNNING" in text and "cluster:  DRAINING; priority 0" in text
    finally:
        lease.release()
    # the driver gone: a queued run whose lease is released is no longer shown queued
    assert W.read_view(root)["state"] == "lost"


def test_run_alone_has_no_schedule(tmp_path):
    """A run alone on its Ray (no coordinator answered): no schedule, the views as before."""
    v = W.make_view("out", {"run_id": RUN, "status": "running"}, progress={"rows_total": 4, "rows_done": 1})
    assert v["state"] == "running" and v["schedule"] is None and "cluster" not in W.format_frame(v)


def test_progress_shows_schedule_changes(monkeypatch, capsys):
    """The driver's live view: the notebook redraws at a change of queue state (kbatch.render(..., priority=)),
    a log prints one line per change."""
    import IPython.display

    from kbatch.run.progress import Progress

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, display_id=None: shown.append(obj.data) or
                        type("H", (), {"update": lambda self, o: shown.append(o.data)})())
    p = Progress(500, mode="notebook", root="s3://b/nb3", run_id=RUN)
    p.set_schedule(QUEUED)
    assert p.mode == "notebook" and "QUEUED (position 2 in the cluster" in shown[-1]
    n = len(shown)
    p.set_schedule(dict(QUEUED))  # no change: no redraw
    assert len(shown) == n
    p.set_schedule({**QUEUED, "state": "RUNNING", "queue_position": None, "ahead": [], "allotted": 8, "held": 2})
    assert "RUNNING" in shown[-1] and "GPU 2 held / 8 allotted of 16" in shown[-1]

    log = Progress(500, mode="log", run_id=RUN)
    log.set_schedule(QUEUED)
    log.set_schedule({**QUEUED, "queue_position": 1, "ahead": ["20261206T063015-9f0e21"]})
    log.set_schedule({**QUEUED, "queue_position": 1, "ahead": ["20261206T063015-9f0e21"]})
    err = capsys.readouterr().err.splitlines()
    assert err == ["kbatch: QUEUED, position 2 in the cluster's queue, behind 20261206T063015-9f0e21, "
                   "20261206T061203-ab12cd; it starts when it gets GPUs",
                   "kbatch: QUEUED, position 1 in the cluster's queue, behind 20261206T063015-9f0e21; it starts "
                   "when it gets GPUs"]


# ================================================================================================ metrics
def test_queue_metrics(monkeypatch):
    """``kbatch_gpus{run,state}`` and ``kbatch_queue_position{run}`` from the driver's schedule; 0 at the end;
    nothing for a run alone on its Ray."""
    from kbatch.models import ray_metrics
    from kbatch.run.metrics import RunMetrics, exported_series
    from kbatch.run.progress import Progress

    assert {"ray_kbatch_gpus", "ray_kbatch_queue_position"} <= exported_series()
    calls = []
    monkeypatch.setitem(ray_metrics._state, "off", False)
    monkeypatch.setattr(ray_metrics.Metric, "record", lambda self, v, tags: calls.append((self.spec.name, v, tags)))
    alone = RunMetrics("r0", every=0)
    alone.tick(Progress(10, mode="off"), {})
    assert not [c for c in calls if c[0] in ("kbatch_gpus", "kbatch_queue_position")]

    p = Progress(10, mode="off")
    m = RunMetrics("r1", every=0)
    p.set_schedule(QUEUED)
    m.tick(p, {})
    p.set_schedule({**QUEUED, "state": "RUNNING", "queue_position": None, "allotted": 8, "held": 6})
    m.tick(p, {})
    m.end(p, {})
    gpus = [(t["state"], v) for n, v, t in calls if n == "kbatch_gpus"]
    assert gpus == [("allotted", 0.0), ("held", 0.0), ("allotted", 8.0), ("held", 6.0), ("allotted", 0.0),
                    ("held", 0.0)]
    assert [v for n, v, t in calls if n == "kbatch_queue_position"] == [2, 0, 0]
    assert all(t["run"] == "r1" for n, v, t in calls if n in ("kbatch_gpus", "kbatch_queue_position"))
