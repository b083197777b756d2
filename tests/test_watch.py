"""Issue 20 "See it run": ``kbatch status OUTPUT --watch``, ``JobHandle.progress()``, the notebook view and
the driver's metrics objects, without Ray (a fake run writes ``_job.json`` and ``_lease.json`` as the driver
does). The run on Ray with a metrics endpoint is tests/test_metrics.py."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import time
import types

import numpy as np
import pytest

from kbatch import storage
from kbatch.output.lease import Lease
from kbatch.output.writer import OutputSpec, write_shard
from kbatch.run import watch as W

RUN = "20261202T100000-abc123"
pytestmark = pytest.mark.timeout(120)  # a watch that never sees the end fails instead of hanging


def _progress(done, total, failed=0, images=None):
    return {"updated": "2026-12-02T10:00:00+00:00", "rows_total": total, "rows_done": done,
            "rows_ok": done - failed, "rows_failed": failed, "rows_missing": total - done, "rows_this_run": done,
            "images": done if images is None else images, "seconds": 10.0, "images_per_second": 1.5,
            "images_per_second_recent": 2.5, "rows_per_second": 1.0, "eta_seconds": float(total - done),
            "queues": {"planned": total - done, "prior": 2, "decoder": 4, "writes": 1,
                       "replicas": {"prior": {"running": 1, "pending": 0},
                                    "decoder": {"running": 2, "pending": 1, "draining": 1}}}}


def _job(status="running", progress=None, total=6, **extra):
    return {"run_id": RUN, "status": status, "started": "2026-12-02T10:00:00+00:00", "total_rows": total,
            "manifest": "<in-memory>", "progress": progress, **extra}


def _shard(root, name, ids, failed=()):
    recs, imgs = [], []
    for rid in ids:
        recs.append({"id": rid, "image_index": 0, "status": "ok", "prompt": rid, "seed": 1, "mode": "text2img",
                     "height": 8, "width": 8, "num_inference_steps": 1, "guidance_scale": 4.0, "key": f"{rid}-0"})
        imgs.append(np.zeros((8, 8, 3), dtype=np.uint8))
    for rid in failed:
        recs.append({"id": rid, "image_index": -1, "status": "error", "error": "prompt: bad", "prompt": rid})
        imgs.append(None)
    write_shard(OutputSpec(root, "files", "png"), name, recs, imgs)


def _fake_run(root, end="complete", steps=3, pause=0.4, total=6):
    """A run as the driver writes it: the lease, _job.json progress every ``pause`` s, a shard per step,
    then its end (complete: _job.json's end and _SUCCESS; incomplete: the end without _SUCCESS; killed: no
    end, the lease released as if it had expired)."""
    lease = Lease.acquire(root, RUN)
    storage.write_json_atomic(root, "_job.json", _job(progress=_progress(0, total), total=total))
    ids = [f"r{i}" for i in range(total)]
    per = total // steps

    def go():
        for k in range(steps):
            time.sleep(pause)
            _shard(root, f"{RUN}-{k:05d}", ids[k * per:(k + 1) * per])
            storage.write_json_atomic(root, "_job.json", _job(progress=_progress((k + 1) * per, total), total=total))
        time.sleep(pause)
        if end == "killed":
            lease.release()
            return
        ok = end == "complete"
        done = total if ok else total - per
        result = {"rows_total": total, "rows_missing": total - done, "rows_failed": 0, "rows_failed_before": 0}
        storage.write_json_atomic(root, "_job.json", _job(status=end, progress=_progress(done, total), total=total,
                                                          exit_code=0 if ok else 3, result=result,
                                                          finished="2026-12-02T10:01:00+00:00"))
        if ok:
            storage.write_json_atomic(root, "_SUCCESS", {"run_id": RUN})
        lease.release()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_watch_redraws_a_running_job_until_it_ends_and_exits_0(tmp_path):
    root = str(tmp_path / "out")
    t = _fake_run(root, "complete")
    out = io.StringIO()
    code = W.watch(root, interval=0.1, out=out, tty=True)
    t.join()
    text = out.getvalue()
    frames = text.split(W.CLEAR)[1:]
    assert code == 0, text
    assert len(frames) >= 2, text
    running = [f for f in frames if "RUNNING" in f]
    assert running and re.search(r"rows\s+\[#*-*\]\s+\d+\.\d%\s+[2-6]/6", "\n".join(running)), running
    assert "ok 4   failed 0   missing 2" in text  # a frame in the middle of the run
    assert "queues   planned 4 · prior 2 · decoder 4 · writes 1" in text
    assert "replicas prior 1 running · decoder 2 running, 1 pending, 1 draining" in text
    assert "ETA" in text and "img/s (last minute)" in text
    assert "ENDED COMPLETE (exit code 0)" in frames[-1]
    assert "status:   COMPLETE" in frames[-1]  # kbatch status's summary, once at the end


def test_watch_plain_lines_incomplete_run_exits_3(tmp_path):
    root = str(tmp_path / "out")
    t = _fake_run(root, "incomplete")
    out = io.StringIO()
    code = W.watch(root, interval=0.1, out=out, tty=False)
    t.join()
    text = out.getvalue()
    assert code == 3, text
    assert W.CLEAR not in text
    lines = [ln for ln in text.splitlines() if re.match(r"\d\d:\d\d:\d\d (running|ended)", ln)]
    assert len(lines) >= 3 and len(set(lines)) == len(lines), text  # one line per change, none repeated
    assert "running: rows 2/6 (33.3%) ok 2 failed 0 missing 4" in text
    assert lines[-1].startswith(lines[-1][:8] + " ended") and "ENDED INCOMPLETE (exit code 3)" in lines[-1]
    assert "status:   INCOMPLETE" in text


def test_watch_ends_when_the_driver_is_gone(tmp_path):
    """_job.json still says running but its lease is gone (the driver was killed): the watch ends, exit 3."""
    root = str(tmp_path / "out")
    t = _fake_run(root, "killed", steps=2)
    out = io.StringIO()
    code = W.watch(root, interval=0.1, out=out, tty=True)
    t.join()
    assert code == 3
    assert "LOST (the run's driver is gone" in out.getvalue()


def test_cli_status_watch(tmp_path, capsys):
    from kbatch.cli import main

    root = str(tmp_path / "out")
    t = _fake_run(root, "complete", pause=0.3)
    code = main(["status", root, "--watch", "--interval", "0.1"])
    t.join()
    text = capsys.readouterr().out
    assert code == 0, text
    assert "running: rows" in text and "ENDED COMPLETE" in text and "status:   COMPLETE" in text
    # --json: one JSON view per change, then the summary as JSON
    code = main(["status", root, "--watch", "--json", "--interval", "0.1"])
    views = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert code == 0 and views[0]["state"] == "ended" and views[-1]["complete"] is True
    assert main(["status", root, "--watch", "--interval", "0"]) == 2


def test_watch_waits_for_the_job_file(tmp_path):
    """A job submitted but not started yet: no _job.json; the watch waits for it instead of ending."""
    root = str(tmp_path / "out")
    os.makedirs(root)
    assert W.read_view(root)["state"] == "waiting"
    done = {}

    def later():
        time.sleep(0.4)
        _fake_run(root, "complete", steps=1, pause=0.2).join()
        done["at"] = time.monotonic()

    t = threading.Thread(target=later)
    t.start()
    out = io.StringIO()
    assert W.watch(root, interval=0.1, out=out, tty=False) == 0
    t.join()
    assert "waiting: rows ?/?" in out.getvalue() and "ENDED COMPLETE" in out.getvalue()


class _Client:
    """What JobHandle asks of Ray's JobSubmissionClient: the job's start (ms), here 5 s ago."""

    def __init__(self, started_ms):
        self.started_ms = started_ms

    def get_job_info(self, job_id):
        return types.SimpleNamespace(start_time=self.started_ms, status="RUNNING")


def test_handle_progress(tmp_path):
    from kbatch.api import JobHandle

    root = str(tmp_path / "out")
    handle = JobHandle(_Client(time.time() * 1000 - 5000), "raysubmit_1", root)
    assert handle.progress()["state"] == "waiting"
    lease = Lease.acquire(root, RUN)
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    job = _job(progress=_progress(2, 6, failed=1, images=3))
    job["started"] = now
    storage.write_json_atomic(root, "_job.json", job)
    p = handle.progress()
    assert p["state"] == "running" and p["run_id"] == RUN
    assert (p["rows_done"], p["rows_ok"], p["rows_failed"], p["rows_missing"], p["images"]) == (2, 1, 1, 4, 3)
    assert p["queues"]["decoder"] == 4 and p["replicas"]["decoder"]["pending"] == 1
    assert p["images_per_second_recent"] == 2.5 and p["eta_seconds"] == 4.0
    assert "ok 1   failed 1   missing 4" in str(p)
    html = p._repr_html_()
    assert "kbatch-progress" in html and "33.3%" in html and "RUNNING" in html
    # a _job.json older than the job (a previous run on the same output) is not this job's progress
    old = JobHandle(_Client(time.time() * 1000 + 60_000), "raysubmit_2", root)
    assert old.progress()["state"] == "waiting"
    lease.release()


def test_progress_snapshot_counts_and_rates(monkeypatch):
    from kbatch.run import progress as P

    clock = [1000.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    p = P.Progress(100, initial=10, mode="off", failed_before=2)
    for k in range(1, 121):  # 2 minutes: 0.25 rows/s for the first minute, then 0.5 rows/s
        clock[0] += 1.0
        rows = k // 4 if k <= 60 else 15 + (k - 60) // 2
        p.set(rows, 2 * rows, failed_this_run=1)
    s = p.snapshot({"prior": 3})
    assert (s["rows_done"], s["rows_failed"], s["rows_ok"], s["rows_missing"]) == (55, 3, 52, 45)
    assert s["images_per_second_recent"] == pytest.approx(1.0, abs=0.05)  # the last minute: 0.5 rows/s x 2
    assert s["images_per_second"] == pytest.approx(90 / 120, abs=0.01)  # the whole run
    assert s["eta_seconds"] == pytest.approx(45 / (45 / 120), rel=0.05)  # rows left / rate of the run so far
    assert s["queues"] == {"prior": 3}


def test_run_metrics_guarded(monkeypatch, caplog):
    """A metrics system that fails (no Ray, a broken agent) costs one warning and nothing else."""
    import ray.util.metrics as rm

    from kbatch.models import ray_metrics
    from kbatch.run.metrics import RunMetrics
    from kbatch.run.progress import Progress

    def broken(*a, **k):
        raise RuntimeError("no metrics agent")

    monkeypatch.setattr(rm, "Counter", broken)
    monkeypatch.setitem(ray_metrics._state, "off", False)
    monkeypatch.setitem(ray_metrics._state, "warned", False)
    p = Progress(10, mode="off")
    m = RunMetrics("r1", every=0)
    with caplog.at_level(logging.WARNING, logger="kbatch"):
        for k in range(3):
            p.set(k + 1, k + 1)
            m.tick(p, {"prior": 1, "replicas": {"prior": {"running": 1, "pending": 0}}})
        ray_metrics.observe_batch("r1/decoder/0", "decoder", 0.5)
        m.end(p)
    warnings = [r for r in caplog.records if "metrics are off" in r.getMessage()]
    assert len(warnings) == 1 and "no metrics agent" in warnings[0].getMessage()
    assert ray_metrics.disabled()


def test_run_metrics_records_deltas_and_zeroes_the_end(monkeypatch):
    """Counters get what is new since the last refresh; gauges the current values; at the end the gauges of
    work in progress are 0 (a finished run is not a stalled one), with every series tagged with the run."""
    from kbatch.models import ray_metrics
    from kbatch.run.metrics import RunMetrics
    from kbatch.run.progress import Progress

    calls = []
    monkeypatch.setitem(ray_metrics._state, "off", False)
    monkeypatch.setattr(ray_metrics.Metric, "record", lambda self, v, tags: calls.append((self.spec.name, v, tags)))
    p = Progress(10, initial=2, mode="off", failed_before=1)
    m = RunMetrics("r1", every=0)
    queues = {"prior": 2, "decoder": 5, "replicas": {"decoder": {"running": 2, "pending": 1, "draining": 0}}}
    p.set(3, 6, failed_this_run=1)
    m.tick(p, queues)
    p.set(5, 9, failed_this_run=1)
    m.tick(p, lambda: queues)
    m.end(p, queues)
    assert all(tags["run"] == "r1" for _, _, tags in calls)
    rows = [(v, t["status"]) for n, v, t in calls if n == "kbatch_rows"]
    assert rows == [(2, "ok"), (1, "failed"), (2, "ok"), (0, "failed"), (0, "ok"), (0, "failed")]
    assert [v for n, v, _ in calls if n == "kbatch_images"] == [6, 3, 0]
    assert [v for n, v, _ in calls if n == "kbatch_rows_remaining"] == [5, 3, 3]
    dec = [v for n, v, t in calls if n == "kbatch_replicas" and t["stage"] == "decoder" and t["state"] == "running"]
    assert dec == [2, 2, 0]
    q = [v for n, v, t in calls if n == "kbatch_queue" and t["stage"] == "decoder"]
    assert q == [5, 5, 0]


def test_notebook_view_in_a_kernel(tmp_path):
    """In a Jupyter kernel the progress (mode auto) is an HTML view updated in place, which ends showing
    the run's end."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    src = (
        "from kbatch.run.progress import Progress\n"
        "p = Progress(8, mode='auto', root='s3://b/out', run_id='r1')\n"
        "print(p.mode)\n"
        "import time\n"
        "for k in range(1, 9):\n"
        "    p._drawn = 0\n"
        "    p.set(k, 2 * k, 1, queues=lambda: {'decoder': 3, 'replicas': {'decoder': {'running': 2}}})\n"
        "p.end({'run_id': 'r1', 'status': 'complete', 'exit_code': 0, 'progress': p.snapshot()})\n"
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src)])
    nbclient.NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    outs = nb.cells[0].outputs
    assert any(o.get("text", "").strip() == "notebook" for o in outs if o.output_type == "stream"), outs
    shown = [o for o in outs if o.output_type == "display_data"]
    assert len(shown) == 1, outs  # one view, updated in place (nbclient applies the updates to it)
    html = shown[0].data["text/html"]
    assert "kbatch-progress" in html and "ENDED COMPLETE" in html and "8 / 8 done" in html, html


def test_watch_on_s3(tmp_path):
    """The watch reads the output location alone: here an S3 bucket (moto on loopback)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    import sys as _sys
    import uuid

    _sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from moto_s3 import aws_env, moto_server

    with moto_server(aws_env("AKIAKBATCHWATCHTEST1", "kbatch-watch-secret")):
        import s3fs

        s3fs.S3FileSystem().mkdir("kbatch-watch")
        root = f"s3://kbatch-watch/out/{uuid.uuid4().hex}"
        t = _fake_run(root, "complete", pause=0.5)
        out = io.StringIO()
        code = W.watch(root, interval=0.2, out=out, tty=False)
        t.join()
    text = out.getvalue()
    assert code == 0, text
    assert "running: rows 2/6" in text and "ENDED COMPLETE" in text and "status:   COMPLETE" in text


def test_driver_reports_draining_replicas():
    """The driver's queues (what _job.json's progress and the metrics carry) count draining replicas."""
    from kbatch.run.driver import Driver

    def rep(state):
        return types.SimpleNamespace(state=state)

    pool = types.SimpleNamespace(name="decoder", n_running=lambda: 2, pending=lambda: [rep("pending")],
                                 all={0: rep("running"), 1: rep("running"), 2: rep("pending"), 3: rep("draining")})
    fake = types.SimpleNamespace(dispatch=types.SimpleNamespace(queues=lambda: {"decoder": 4}), pools=lambda: [pool])
    q = Driver.queues(fake)
    assert q == {"decoder": 4, "replicas": {"decoder": {"running": 2, "pending": 1, "draining": 1}}}
