"""Scale benchmarks of the driver with the simulated models (SPEC §7): no weights, no torch.

Two parts (``python bench/scale.py rows`` / ``python bench/scale.py cluster``; both by default):

* **rows**: the whole ``kbatch run`` command on a local Ray, simulated models with zero latency, 64x64
  text2img rows, ``output.format: parquet``, at several manifest sizes (default 20k, 200k, 1M rows). Per
  size: wall seconds from spawn to exit, rows/s, the driver's peak RSS and CPU seconds (the driver measures
  itself: ``_job.json`` ``driver``), CPU-seconds per 1,000 rows, and the bounded queues' high-water marks.
  Targets (issue "Ten million rows"): peak RSS at the larger sizes within 15% of the smallest's; at least
  1,000 rows/s end to end.
* **cluster**: ``ray.cluster_utils.Cluster`` with fake GPUs: a head with the prior's GPU and ``--nodes``
  worker nodes of ``--gpus-per-node`` GPUs for the decoders (``replicas: auto``), the prior at
  ``--prior-s`` s/img and the decoders at ``--decoder-s`` s/img (defaults: 1 prior GPU at 0.004, 16 decoder
  GPUs at 0.2). Achieved img/s after the first image against the simulated ideal
  (decoder GPUs / decoder-s, or 1 / prior-s when the prior is the bottleneck). Target >= 0.9.

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

from _common import ROOT, loadavg, machine, ray_env, versions, write_yaml


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


def run_rows(sizes: list[int], batch: int, rows_per_shard: int, work: str, files: int) -> list[dict]:
    out = []
    for n in sizes:
        m = os.path.join(work, f"manifest-{n}")
        if not os.path.isdir(m):
            manifest(m, n, files)
        dest = os.path.join(work, f"out-{n}")
        shutil.rmtree(dest, ignore_errors=True)
        cfg = write_yaml(os.path.join(work, f"scale-{n}.yaml"), config(m, dest, batch, rows_per_shard))
        tmp = tempfile.mkdtemp(prefix="kbs-", dir="/tmp")
        load = loadavg()
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "kbatch.cli", "run", cfg], env=ray_env(tmp), capture_output=True,
                           text=True)
        wall = time.perf_counter() - t0
        shutil.rmtree(tmp, ignore_errors=True)
        job = json.load(open(os.path.join(dest, "_job.json")))
        d = job.get("driver", {})
        r = {"rows": n, "exit": p.returncode, "wall_s": round(wall, 1), "rows_per_s": round(n / wall, 1),
             "loop_s": d.get("loop_seconds"), "scan_s": job["plan"]["scan_seconds"],
             "driver_peak_rss_mib": d.get("peak_rss_mib"), "driver_cpu_s": d.get("cpu_seconds"),
             "driver_cpu_s_per_1k": round(1000 * d.get("cpu_seconds", 0) / n, 3), "high_water": d.get("high_water"),
             "load_before": round(load, 2), "load_after": round(loadavg(), 2)}
        if p.returncode:
            r["stderr"] = p.stderr[-2000:]
        print(json.dumps(r), flush=True)
        out.append(r)
        shutil.rmtree(dest, ignore_errors=True)
    return out


CLUSTER = textwrap.dedent("""
    import json, os, sys, time
    import ray
    from ray.cluster_utils import Cluster
    sys.path.insert(0, %(root)r)
    from kbatch.config import load_config
    from kbatch.run.runner import run_job

    a = json.loads(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    for _ in range(a["nodes"]):
        cluster.add_node(num_cpus=2, num_gpus=a["gpus_per_node"])
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        res = run_job(load_config(a["config"]))
        job = json.load(open(os.path.join(res.output, "_job.json")))
        print("RESULT" + json.dumps({"exit": res.exit_code, "images": res.images, "driver": job["driver"],
                                     "layout": job.get("layout")}))
    finally:
        ray.shutdown(); cluster.shutdown()
""")


def run_cluster(a, work: str) -> dict:
    m = os.path.join(work, f"manifest-{a.cluster_rows}")
    if not os.path.isdir(m):
        manifest(m, a.cluster_rows)
    dest = os.path.join(work, "out-cluster")
    shutil.rmtree(dest, ignore_errors=True)
    decoders = a.nodes * a.gpus_per_node
    cfg = config(m, dest, a.cluster_batch, a.cluster_batch * 8, a.prior_s, a.decoder_s,
                 decoder={"replicas": "auto", "gpus": 1, "cpus": 0.1}, prior={"gpus": 1, "cpus": 0.1})
    cfg["resources"].update(device="cpu", io_cpus=0.1)
    path = write_yaml(os.path.join(work, "cluster.yaml"), cfg)
    tmp = tempfile.mkdtemp(prefix="kbc-", dir="/tmp")
    p = subprocess.run([sys.executable, "-c", CLUSTER % {"root": ROOT},
                        json.dumps({"config": path, "nodes": a.nodes, "gpus_per_node": a.gpus_per_node})],
                       env=ray_env(tmp), capture_output=True, text=True)
    shutil.rmtree(tmp, ignore_errors=True)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT")), None)
    if not line:
        print(p.stdout[-3000:], p.stderr[-5000:])
        raise SystemExit("cluster run failed")
    res = json.loads(line[len("RESULT"):])
    d = res["driver"]
    ideal = min(decoders / a.decoder_s, 1 / a.prior_s if a.prior_s else float("inf"))
    after = d["loop_seconds"] - d["first_image_seconds"]
    achieved = (res["images"] - a.cluster_batch) / after  # the first batch finished at first_image_seconds
    r = {"rows": a.cluster_rows, "decoders": decoders, "prior_s": a.prior_s, "decoder_s": a.decoder_s,
         "exit": res["exit"], "first_image_s": d["first_image_seconds"], "loop_s": d["loop_seconds"],
         "achieved_img_s": round(achieved, 2), "ideal_img_s": round(ideal, 2), "fraction": round(achieved / ideal, 3),
         "driver_cpu_s": d["cpu_seconds"], "high_water": d["high_water"]}
    print(json.dumps(r), flush=True)
    shutil.rmtree(dest, ignore_errors=True)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", nargs="*", choices=["rows", "cluster"], default=["rows", "cluster"])
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    ap.add_argument("--files", type=int, default=4, help="manifest files per size")
    ap.add_argument("--batch", type=int, default=64, help="prior and decoder batch_size (rows part)")
    ap.add_argument("--rows-per-shard", type=int, default=4096)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--gpus-per-node", type=int, default=4)
    ap.add_argument("--prior-s", type=float, default=0.004)
    ap.add_argument("--decoder-s", type=float, default=0.2)
    ap.add_argument("--cluster-rows", type=int, default=16_000)
    ap.add_argument("--cluster-batch", type=int, default=16)
    ap.add_argument("--work", default="/tmp/kbatch-scale")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}, {json.dumps(versions())}")
    if "rows" in a.part:
        res = run_rows(a.rows, a.batch, a.rows_per_shard, a.work, a.files)
        print("\n| rows | exit | wall s | rows/s | driver peak RSS MiB | driver CPU s | CPU s / 1k rows |")
        print("|---|---|---|---|---|---|---|")
        for r in res:
            print(f"| {r['rows']} | {r['exit']} | {r['wall_s']} | {r['rows_per_s']} | {r['driver_peak_rss_mib']} | "
                  f"{r['driver_cpu_s']} | {r['driver_cpu_s_per_1k']} |")
        base = res[0]["driver_peak_rss_mib"] or 1
        print("RSS vs the smallest: " + ", ".join(f"{r['rows']}: {r['driver_peak_rss_mib'] / base:.3f}" for r in res))
    if "cluster" in a.part:
        r = run_cluster(a, a.work)
        print(f"\ncluster: {r['decoders']} decoder GPUs at {r['decoder_s']} s/img, prior at {r['prior_s']} s/img: "
              f"{r['achieved_img_s']} img/s after the first image, ideal {r['ideal_img_s']}: "
              f"**{r['fraction']:.3f}** of ideal")


if __name__ == "__main__":
    main()
