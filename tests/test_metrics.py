"""Issue 20 "See it run": kbatch's metrics in Ray's Prometheus endpoint, and the Grafana dashboard that reads
them (docs/metrics.md).

The Ray test runs a simulated job in a subprocess whose Ray has a metrics export port (its own temp dir and
ports; stopped by its own ``ray.shutdown()``, never ``ray stop``) and scrapes the endpoint while the job
runs and after it ended; ``kbatch status --watch`` follows the same job from its output alone.
"""
from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

from kbatch.run.metrics import SPECS, exported_series

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "dashboards", "kbatch_grafana.json")


# ================================================================================= the dashboard (no Ray)
def _exprs(dash: dict) -> list[str]:
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append(t["expr"])
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            out.append(v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
    return out


def test_dashboard_queries_name_only_published_series():
    with open(DASHBOARD) as fh:
        dash = json.load(fh)
    published = exported_series()  # from the metric definitions in kbatch/run/metrics.py
    exprs = _exprs(dash)
    assert len(exprs) >= 10
    used = set()
    for e in exprs:
        assert e.count("(") == e.count(")") and e.count("{") == e.count("}") and e.count("[") == e.count("]"), e
        names = set(re.findall(r"\b(?:ray_)?kbatch_\w+", e))
        # any selector: a name followed by {...} or [range]
        names |= {n for n in re.findall(r"\b([A-Za-z_:][\w:]*)\s*[{\[]", e) if n not in ("by", "without")}
        assert names, f"no series in {e!r}"
        unknown = names - published
        assert not unknown, f"{e!r} names {sorted(unknown)}, not published by kbatch (published: {sorted(published)})"
        used |= names
    for spec in SPECS:  # and the dashboard shows every metric kbatch publishes
        assert used & set(spec.exported()), f"no panel shows {spec.name}"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert all(p.get("targets") for p in panels)
    for p in panels:
        for t in p["targets"]:
            assert 'run=~"$run"' in t["expr"], (p["title"], t["expr"])  # the run variable filters every query
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["query"]["query"] == "label_values(ray_kbatch_rows_total, run)"
    titles = " ".join(p["title"] for p in panels)
    for want in ("Rows ok", "Rows failed", "img/s", "ETA", "Queue depth per stage", "Replicas per stage",
                 "Batch seconds per stage"):
        assert want in titles


# ====================================================================================== the Ray job
JOB = r"""
import json, os, sys
import pandas as pd
import ray

port, out, tmp, rows = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False, _metrics_export_port=port,
         _system_config={"metrics_report_interval_ms": 1000},
         runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
import kbatch

df = pd.DataFrame({"id": [f"r{i}" for i in range(rows)], "prompt": [f"prompt {i}" for i in range(rows)]})
cfg = {"models": {"prior": "sim", "decoder": "sim",
                  "sim": {"decoder_seconds_per_image": 0.2, "prior_seconds_per_image": 0.0}},
       "output": {"path": out, "rows_per_shard": 8, "gallery": False, "image_format": "png"}, "seed": 0,
       "defaults": {"height": 64, "width": 64},
       "resources": {"prior": {"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": 4},
                     "decoder": {"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": 4, "concurrency": 1},
                     "device": "cpu", "io_cpus": 0.25, "colocate": False},
       "progress": "off"}
res = kbatch.render(df, out, cfg)
print("RESULT " + json.dumps({"run_id": res.run.run_id, "exit": res.run.exit_code, "ok": res.run.rows_ok}),
      flush=True)
sys.stdin.readline()  # the test scrapes the end, then lets this Ray go
ray.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> list[tuple[str, dict, float]]:
    """kbatch's series at the endpoint: (name, labels, value)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        m = re.match(r"^(ray_kbatch_\w+)\{(.*)\}\s+(\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2)))
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def _ok_rows(series, run) -> float:
    return sum(v for n, lab, v in series if n == "ray_kbatch_rows_total" and lab.get("status") == "ok"
               and lab.get("run") == run)


def _in_progress(series) -> list:
    """Gauges of work in progress that are not 0."""
    return [(n, lab.get("stage"), lab.get("state"), v) for n, lab, v in series
            if n in ("ray_kbatch_replicas", "ray_kbatch_queue", "ray_kbatch_images_per_second") and v]


def _run_id(out: str) -> str | None:
    try:
        with open(os.path.join(out, "_job.json")) as fh:
            return json.load(fh).get("run_id")
    except (OSError, ValueError):
        return None


def test_metrics_in_rays_prometheus_endpoint_while_the_job_runs(tmp_path):
    from kbatch.run.watch import watch

    rows = 48
    port = _free_port()
    out = str(tmp_path / "out")
    ray_tmp = tempfile.mkdtemp(prefix="kbm-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", JOB, str(port), out, ray_tmp, str(rows)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    watched: dict = {}

    def follow():  # kbatch status OUTPUT --watch on the same job, from its output location alone
        buf = io.StringIO()
        watched["code"] = watch(out, interval=0.5, out=buf, tty=False)
        watched["text"] = buf.getvalue()

    try:
        deadline = time.monotonic() + 240
        run = None
        while run is None and time.monotonic() < deadline and proc.poll() is None:
            run = _run_id(out)
            time.sleep(0.2)
        assert run, "".join(lines)[-3000:]
        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        during = []  # rows ok seen while the job ran
        while time.monotonic() < deadline and not any(ln.startswith("RESULT") for ln in lines):
            assert proc.poll() is None, "".join(lines)[-3000:]
            series = _scrape(port)
            if series and not any(ln.startswith("RESULT") for ln in lines):
                during.append((_ok_rows(series, run), series))
            time.sleep(0.5)
        result = json.loads(next(ln for ln in lines if ln.startswith("RESULT"))[len("RESULT "):])
        assert result["exit"] == 0 and result["ok"] == rows, result
        # at its end: the counter reaches the row count (Ray sends every metrics_report_interval_ms)
        final, end_by = [], min(deadline, time.monotonic() + 30)
        while time.monotonic() < end_by:
            final = _scrape(port)
            if _ok_rows(final, run) >= rows and not _in_progress(final):
                break
            time.sleep(0.5)
        watcher.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.stdin.write("\n")
            proc.stdin.flush()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)

    # rows ok rose during the run, and reached the row count at its end
    ok_seen = [ok for ok, _ in during]
    assert any(0 < ok < rows for ok in ok_seen), ok_seen
    assert ok_seen == sorted(ok_seen), ok_seen
    assert _ok_rows(final, run) == rows
    names = {n for n, _, _ in final}
    for want in ("ray_kbatch_rows_total", "ray_kbatch_images_total", "ray_kbatch_queue", "ray_kbatch_replicas",
                 "ray_kbatch_images_per_second", "ray_kbatch_rows_remaining", "ray_kbatch_batch_seconds_bucket",
                 "ray_kbatch_batch_seconds_count"):
        assert want in names, sorted(names)
    assert names <= exported_series(), names - exported_series()
    # every kbatch series carries the run; no row or id tags
    for n, lab, _ in final:
        assert lab.get("run") == run, (n, lab)
        assert set(lab) - {"run", "status", "stage", "state", "le", "Component", "NodeAddress", "SessionName",
                           "Version", "WorkerId", "JobId", "otel_scope_name", "otel_scope_schema_url",
                           "otel_scope_version"} == set(), (n, lab)
    images = [v for n, lab, v in final if n == "ray_kbatch_images_total"]
    assert sum(images) == rows
    # queue and replica gauges per stage, seen while the job ran
    running = [s for ok, s in during if 0 < ok < rows] or [s for _, s in during]
    queue_stages = {lab["stage"] for s in running for n, lab, _ in s if n == "ray_kbatch_queue"}
    assert {"prior", "decoder", "writes"} <= queue_stages, queue_stages
    replicas: dict = {}
    for s in running:
        for n, lab, v in s:
            if n == "ray_kbatch_replicas":
                replicas[(lab["stage"], lab["state"])] = max(v, replicas.get((lab["stage"], lab["state"]), 0))
    assert replicas.get(("decoder", "running")) == 1 and replicas.get(("writer", "running"), 0) >= 1, replicas
    assert {st for st, _ in replicas} >= {"prior", "decoder", "writer"}
    assert {state for _, state in replicas} == {"running", "pending", "draining"}
    # the actors' batch seconds, per stage
    counts = {lab["stage"]: v for n, lab, v in final if n == "ray_kbatch_batch_seconds_count"}
    assert counts.get("decoder", 0) >= rows / 4 and counts.get("prior", 0) >= rows / 4, counts
    assert counts.get("writer", 0) >= rows / 8, counts  # a shard per 8 rows at most
    dec_sum = [v for n, lab, v in final if n == "ray_kbatch_batch_seconds_sum" and lab["stage"] == "decoder"]
    assert dec_sum and dec_sum[0] >= 0.2 * rows * 0.9  # 0.2 s per image
    # a finished run: its work-in-progress gauges are back to 0 (no false "stalled" alert)
    assert not _in_progress(final), _in_progress(final)
    assert [v for n, _, v in final if n == "ray_kbatch_rows_remaining"] == [0]
    # and the watch followed the run to its end: several lines while it ran, then exit 0
    assert watched.get("code") == 0, watched
    running_lines = [ln for ln in watched["text"].splitlines() if " running: rows " in ln]
    assert len(running_lines) >= 2 and "status:   COMPLETE" in watched["text"], watched["text"]
