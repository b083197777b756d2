"""Scale benchmarks of the driver with the simulated models (docs/clusters.md, simulated models): no weights, no torch.

Two parts (``python bench/scale.py rows`` / ``python bench/scale.py cluster``; both by default):

* **rows**: the whole ``kbatch run`` command (the console script, as a user runs it) on a local Ray, with
  the config a new user writes: simulated models with zero latency, 64x64 text2img rows, and nothing else
  (no ``resources:``, default batch sizes, ``output.format: files``, 256 rows per shard, the gallery on), at
  several manifest sizes (default 20k, 200k, 1M rows). The process is polled from outside every second
  (psutil): its RSS through the loop and through the finish (counts, gallery, ``_SUCCESS``, Ray shutdown)
  apart, the kernel's peak (VmHWM, which also sees spikes between polls) and the RSS summed over its child
  processes (the local Ray). Per size: wall seconds from spawn to exit, rows/s, those peaks, and the
  driver's own in-loop numbers (``_job.json`` ``driver``: ru_maxrss, CPU seconds, the bounded queues'
  high-water marks). Targets (issues "Ten million rows", 17): the whole command's peak RSS at the larger
  sizes within 15% of the smallest's; at least 1,000 rows/s end to end. ``--batch`` / ``--rows-per-shard``
  override the defaults; ``--kbatch-path`` runs another copy of the package (a before/after).
* **cluster** (bench/scale_cluster.py): ``ray.cluster_utils.Cluster`` with fake GPUs (a head without GPUs,
  ``--nodes`` x ``--gpus-per-node``, default 4 x 4; or ``--one-gpu``), the simulated models at a
  prior:decoder cost ``--ratio`` (1:7 by default; 1:2, 1:3, 1:10), a config without ``resources:``. Steady
  img/s (between the commits reaching 30% and 90% of the images) against GPUs / (prior_s + decoder_s),
  every GPU counted; every row once; prior and decoder of a row on different GPUs; the prior:decoder split
  over time. Target >= 0.9 at every ratio.

Results go to stdout as a markdown table (copy them into RESULTS.md with the date and machine printed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import scale_cluster
from _common import ROOT, Poller, loadavg, machine, ray_env, versions, write_yaml


def manifest(path: str, n: int, files: int = 1) -> None:
    """``n`` text2img rows (id, prompt) in ``files`` Parquet files of 64k-row groups, written in pieces."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(path, exist_ok=True)
    per = -(-n // files)
    for f in range(files):
        lo, hi = f * per, min(n, (f + 1) * per)
        with pq.ParquetWriter(os.path.join(path, f"part-{f:03d}.parquet"),
                              pa.schema([("id", pa.string()), ("prompt", pa.string())])) as w:
            for start in range(lo, hi, 65536):
                stop = min(hi, start + 65536)
                w.write_table(pa.table({"id": [f"row-{i:08d}" for i in range(start, stop)],
                                        "prompt": [f"a picture of thing number {i}" for i in range(start, stop)]}))


def config(manifest_path: str, out: str, batch: int, rows_per_shard: int, prior_s=0.0, decoder_s=0.0,
           decoder: dict | None = None, prior: dict | None = None) -> dict:
    return {"models": {"prior": "sim", "decoder": "sim",
                       "sim": {"prior_seconds_per_image": prior_s, "decoder_seconds_per_image": decoder_s}},
            "manifest": manifest_path,
            "output": {"path": out, "format": "parquet", "rows_per_shard": rows_per_shard, "gallery": False},
            "defaults": {"height": 64, "width": 64}, "progress": "off",
            "resources": {"prior": {"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": batch, **(prior or {})},
                          "decoder": {"gpus": 0, "batch_size": batch, **(decoder or {})}}}


def default_config(manifest_path: str, out: str, batch: int | None = None,
                   rows_per_shard: int | None = None) -> dict:
    """The config a new user writes: simulated zero-latency models, the manifest, the output path, 64x64
    rows; no ``resources:``, no ``output.format`` / ``rows_per_shard`` / ``gallery`` (all defaults: files,
    256 rows per shard, the gallery on). ``batch`` / ``rows_per_shard``: override the defaults."""
    cfg = {"models": {"prior": "sim", "decoder": "sim"}, "manifest": manifest_path, "output": {"path": out},
           "defaults": {"height": 64, "width": 64}, "progress": "off"}
    if rows_per_shard:
        cfg["output"]["rows_per_shard"] = rows_per_shard
    if batch:
        cfg["resources"] = {"prior": {"batch_size": batch}, "decoder": {"batch_size": batch}}
    return cfg


class _Outside(Poller):
    """Polls a ``kbatch run`` process from outside every ``interval`` s (psutil): the driver's RSS (the
    process itself), the RSS summed over it and its child processes (the local Ray it started: raylet, GCS,
    workers; shared pages counted in each, so an overstatement of the machine's use), and the phase, from
    ``_job.json`` ``status``: ``running`` while the loop runs, anything else once the finish began (the
    finish writes its final ``_job.json`` before the gallery and ``_SUCCESS``)."""

    def __init__(self, pid: int, job_path: str, interval: float = 1.0):
        import psutil

        super().__init__(interval)
        self.ps, self.pid, self.job_path = psutil, pid, job_path
        self.samples: list[tuple[float, str, int, int]] = []  # (t, phase, driver rss, tree rss)
        self.hwm: dict[str, int] = {}  # phase -> the driver's VmHWM (kernel's peak RSS so far) at its last sample
        self.t0 = time.perf_counter()

    def _phase(self) -> str:
        try:
            with open(self.job_path) as fh:
                status = json.load(fh).get("status")
        except (OSError, ValueError):
            return "start"  # no _job.json yet (imports, plan) or caught mid-rename
        return "loop" if status == "running" else "finish"

    def _sample(self):
        try:
            root = self.ps.Process(self.pid)
            rss = root.memory_info().rss
            tree = rss
            for c in root.children(recursive=True):
                try:
                    tree += c.memory_info().rss
                except self.ps.Error:
                    pass
        except self.ps.Error:
            return
        phase = self._phase()
        if phase == "start" and self.samples and self.samples[-1][1] != "start":
            phase = self.samples[-1][1]  # a read that raced the atomic rename
        self.samples.append((time.perf_counter() - self.t0, phase, rss, tree))
        try:  # Linux: the peak between samples too (what a 1 s poll misses)
            with open(f"/proc/{self.pid}/status") as fh:
                hwm = next((int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:")), None)
            if hwm is not None:
                self.hwm[phase] = hwm
        except (OSError, ValueError):
            pass

    def peak(self, phase: str | None = None, tree: bool = False) -> float | None:
        vals = [s[3 if tree else 2] for s in self.samples if phase is None or s[1] == phase]
        return round(max(vals) / 2**20, 1) if vals else None

    def hwm_mib(self, phase: str | None = None) -> float | None:
        """The driver's VmHWM at the last sample of ``phase`` (None: of the whole command, up to the last
        sample, at most ``interval`` s before it exited)."""
        v = max(self.hwm.values(), default=None) if phase is None else self.hwm.get(phase)
        return round(v / 2**20, 1) if v else None

    def first(self, phase: str) -> float | None:
        return next((round(s[0], 1) for s in self.samples if s[1] == phase), None)


def run_rows(sizes: list[int], batch: int | None, rows_per_shard: int | None, work: str, files: int,
             interval: float = 1.0, kbatch_path: str | None = None) -> list[dict]:
    """Per size: ``kbatch run`` (the console script, as a user runs it) on the default config, spawned and
    polled from outside every ``interval`` s; the headline is its wall time (spawn to exit), rows/s and the
    driver process's peak RSS over the whole command, loop and finish apart."""
    out = []
    exe = shutil.which("kbatch")
    for n in sizes:
        m = os.path.join(work, f"manifest-{n}")
        if not os.path.isdir(m):
            manifest(m, n, files)
        dest = os.path.join(work, f"out-{n}")
        shutil.rmtree(dest, ignore_errors=True)
        cfg = write_yaml(os.path.join(work, f"scale-{n}.yaml"), default_config(m, dest, batch, rows_per_shard))
        tmp = tempfile.mkdtemp(prefix="kbs-", dir="/tmp")
        load = loadavg()
        log_path = os.path.join(work, f"log-{n}.txt")
        cmd = ([exe] if exe else [sys.executable, "-m", "kbatch.cli"]) + ["run", cfg]
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            p = subprocess.Popen(cmd, env=ray_env(tmp, kbatch_path), stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
            with _Outside(p.pid, os.path.join(dest, "_job.json"), interval) as poll:
                rc = p.wait()
        wall = time.perf_counter() - t0
        shutil.rmtree(tmp, ignore_errors=True)
        job = json.load(open(os.path.join(dest, "_job.json")))
        d = job.get("driver", {})
        finish_at = poll.first("finish")
        r = {"rows": n, "exit": rc, "wall_s": round(wall, 1), "rows_per_s": round(n / wall, 1),
             "peak_rss_mib": poll.peak(), "loop_peak_rss_mib": poll.peak("loop"),
             "finish_peak_rss_mib": poll.peak("finish"), "tree_peak_rss_mib": poll.peak(tree=True),
             "hwm_mib": poll.hwm_mib(), "loop_hwm_mib": poll.hwm_mib("loop"),
             "finish_s": round(wall - finish_at, 1) if finish_at is not None else None,
             "samples": len(poll.samples), "loop_s": d.get("loop_seconds"), "scan_s": job["plan"]["scan_seconds"],
             "in_loop_peak_rss_mib": d.get("peak_rss_mib"), "driver_cpu_s": d.get("cpu_seconds"),
             "driver_cpu_s_per_1k": round(1000 * (d.get("cpu_seconds") or 0) / n, 3),
             "high_water": d.get("high_water"), "shards": len(os.listdir(os.path.join(dest, "_commits"))),
             "gallery": os.path.exists(os.path.join(dest, "gallery.html")),
             "load_before": round(load, 2), "load_after": round(loadavg(), 2)}
        if rc:
            r["log_tail"] = open(log_path).read()[-2000:]
        with open(os.path.join(work, f"rss-{n}.json"), "w") as fh:  # the time series: (s, phase, driver, tree)
            json.dump(poll.samples, fh)
        print(json.dumps(r), flush=True)
        out.append(r)
        shutil.rmtree(dest, ignore_errors=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", nargs="*", choices=["rows", "cluster"], default=["rows", "cluster"])
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    ap.add_argument("--files", type=int, default=4, help="manifest files per size")
    ap.add_argument("--batch", type=int, default=None,
                    help="rows part: prior and decoder batch_size (default: the config's default)")
    ap.add_argument("--rows-per-shard", type=int, default=None,
                    help="rows part: output.rows_per_shard (default: the config's default)")
    ap.add_argument("--interval", type=float, default=1.0, help="rows part: seconds between RSS samples")
    ap.add_argument("--kbatch-path", default=None,
                    help="rows part: a folder holding another kbatch package to run (e.g. `git archive` of an "
                         "older commit, for a before/after)")
    scale_cluster.add_args(ap)
    ap.add_argument("--work", default="/tmp/kbatch-scale")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}, {json.dumps(versions())}")
    if "rows" in a.part:
        res = run_rows(a.rows, a.batch, a.rows_per_shard, a.work, a.files, a.interval, a.kbatch_path)
        print("\nThe whole `kbatch run` (spawn to exit), default config; RSS of the driver process polled from "
              f"outside every {a.interval:g} s (loop: while _job.json says running; finish: after).\n")
        print("| rows | exit | wall s | rows/s | **peak RSS MiB** | loop peak | finish peak | finish s | "
              "VmHWM MiB (loop; whole) | process tree peak MiB | in-loop ru_maxrss MiB | driver CPU s / 1k rows |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in res:
            print(f"| {r['rows']} | {r['exit']} | {r['wall_s']} | {r['rows_per_s']} | **{r['peak_rss_mib']}** | "
                  f"{r['loop_peak_rss_mib']} | {r['finish_peak_rss_mib']} | {r['finish_s']} | "
                  f"{r['loop_hwm_mib']}; {r['hwm_mib']} | {r['tree_peak_rss_mib']} | "
                  f"{r['in_loop_peak_rss_mib']} | {r['driver_cpu_s_per_1k']} |")
        base = res[0]["peak_rss_mib"] or 1
        print("Whole-command peak RSS vs the smallest: "
              + ", ".join(f"{r['rows']}: {(r['peak_rss_mib'] or 0) / base:.3f}" for r in res) + " (target <= 1.15); "
              "VmHWM: " + ", ".join(f"{r['rows']}: {(r['hwm_mib'] or 0) / (res[0]['hwm_mib'] or 1):.3f}" for r in res))
    if "cluster" in a.part:
        scale_cluster.run(a, a.work, manifest)


if __name__ == "__main__":
    main()
