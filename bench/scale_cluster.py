"""``python bench/scale.py cluster``: does a config without ``resources:`` use every GPU of a cluster?

``ray.cluster_utils.Cluster`` on this machine: a head without GPUs and ``--nodes`` worker nodes of
``--gpus-per-node`` fake GPUs (default 4 x 4), the simulated models at a prior:decoder per-image cost ratio
(``--ratio``: 1:7 by default, the measured Kandinsky 2.1 ratio on an H200; 1:2, 1:3, 1:10), the default
config's ``resources`` (none written: the prior and decoder pools split the GPUs by their measured speeds,
kbatch/run/balance.py). ``--one-gpu``: a single node with one fake GPU instead (the stages share the card).

Ideal = GPUs / (prior_s + decoder_s), counting every GPU (one GPU: 1 / (prior_s + decoder_s)). The steady
rate is read from the shards' commit records (their time and images): images committed between the commits
that reach 30% and 90% of the job, over that time (the start: actors starting, the first split; the tail:
the last batches). Also checked: every row exactly once, all ok, and (several GPUs) the prior and the
decoder of each row on different GPUs (the records' ``prior_worker`` / ``decoder_worker``). The split over
time is ``_job.json`` ``driver.balance``.

The simulated stages sleep; ``--slow`` multiplies the issue's per-image costs (1:7 = 0.032 / 0.224 s/img)
so that a 2-core machine running 16 actor processes, 5 raylets and the driver is not the bottleneck.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from _common import ROOT, loadavg, ray_env, write_yaml

RATIOS = {"1:2": (0.08, 0.16), "1:3": (0.06, 0.18), "1:7": (0.032, 0.224), "1:10": (0.02, 0.2)}  # s/img

SCRIPT = textwrap.dedent("""
    import glob, json, os, sys, time
    import ray
    from ray.cluster_utils import Cluster
    sys.path.insert(0, %(root)r)
    from kbatch.config import load_config
    from kbatch.output.results import open_results
    from kbatch.run.runner import run_job

    a = json.loads(sys.argv[1])
    head_gpus = 1 if a["one_gpu"] else 0
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": head_gpus})
    for _ in range(0 if a["one_gpu"] else a["nodes"]):
        cluster.add_node(num_cpus=a["cpus_per_node"], num_gpus=a["gpus_per_node"])
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        gpus = ray.cluster_resources().get("GPU", 0)
        t0 = time.time()
        res = run_job(load_config(a["config"]))
        wall = time.time() - t0
        out = res.output
        job = json.load(open(os.path.join(out, "_job.json")))
        commits = sorted((c["time"], c["images"]) for c in
                         (json.load(open(f)) for f in glob.glob(os.path.join(out, "_commits", "*.json"))))
        df = open_results(out).df
        def where(w):  # "node:ab12cd34/gpu:1(sim)/pid:9" -> {("ab12cd34", "1")}
            node, dev = w.split("/", 1)
            ids = dev.split(":", 1)[1].split("(")[0] if dev.startswith("gpu:") else ""
            return {(node, g) for g in ids.split(",") if g}
        overlap = int(sum(bool(where(p) & where(d)) for p, d in zip(df.prior_worker, df.decoder_worker)))
        no_gpu = int(sum(not where(p) or not where(d) for p, d in zip(df.prior_worker, df.decoder_worker)))
        print("RESULT" + json.dumps({
            "exit": res.exit_code, "images": res.images, "wall": wall, "gpus": gpus, "commits": commits,
            "rows": len(df), "unique": bool(df.id.is_unique), "ok": int((df.status == "ok").sum()),
            "same_gpu_rows": overlap, "rows_without_gpu": no_gpu,
            "prior_gpus": len(set().union(*map(where, set(df.prior_worker)))),
            "decoder_gpus": len(set().union(*map(where, set(df.decoder_worker)))),
            "driver": job.get("driver", {}), "layout": job.get("layout")}))
    finally:
        ray.shutdown(); cluster.shutdown()
""")


def add_args(ap) -> None:
    g = ap.add_argument_group("cluster")
    g.add_argument("--nodes", type=int, default=4)
    g.add_argument("--gpus-per-node", type=int, default=4)
    g.add_argument("--cpus-per-node", type=int, default=4, help="logical CPUs of each GPU node")
    g.add_argument("--ratio", nargs="+", choices=list(RATIOS), default=["1:7"],
                   help="prior:decoder per-image cost (s/img at --slow 1: " +
                        ", ".join(f"{k} = {p}/{d}" for k, (p, d) in RATIOS.items()) + ")")
    g.add_argument("--slow", type=float, default=2.0, help="multiplies the per-image seconds of --ratio")
    g.add_argument("--prior-s", type=float, help="prior s/img (instead of --ratio)")
    g.add_argument("--decoder-s", type=float, help="decoder s/img (instead of --ratio)")
    g.add_argument("--cluster-rows", type=int, default=4000)
    g.add_argument("--one-gpu", action="store_true", help="one node with one fake GPU instead")


def cluster_config(manifest_path: str, out: str, prior_s: float, decoder_s: float) -> dict:
    """The default config: no ``resources:``. Parquet output (one file per shard, not one per image) in
    shards of 64 rows (the commit times are the rate's clock), no gallery."""
    return {"models": {"prior": "sim", "decoder": "sim",
                       "sim": {"prior_seconds_per_image": prior_s, "decoder_seconds_per_image": decoder_s}},
            "manifest": manifest_path, "progress": "off", "defaults": {"height": 64, "width": 64},
            "output": {"path": out, "format": "parquet", "rows_per_shard": 64, "gallery": False}}


def steady(commits: list, lo: float = 0.3, hi: float = 0.9) -> tuple[float, float, float]:
    """(img/s between the commits reaching ``lo`` and ``hi`` of the images, their times from the first)."""
    total = sum(n for _, n in commits)
    t_first = commits[0][0]
    done, t_lo, n_lo = 0, None, 0
    for t, n in commits:
        done += n
        if t_lo is None and done >= lo * total:
            t_lo, n_lo = t, done
        if done >= hi * total:
            return (done - n_lo) / (t - t_lo) if t > t_lo else float("nan"), t_lo - t_first, t - t_first
    return float("nan"), 0.0, 0.0


def run_one(a, work: str, manifest, ratio: str | None) -> dict:
    if ratio is not None:
        prior_s, decoder_s = (x * a.slow for x in RATIOS[ratio])
    else:
        prior_s, decoder_s = a.prior_s, a.decoder_s
    m = os.path.join(work, f"manifest-{a.cluster_rows}")
    if not os.path.isdir(m):
        manifest(m, a.cluster_rows)
    dest = os.path.join(work, "out-cluster")
    shutil.rmtree(dest, ignore_errors=True)
    path = write_yaml(os.path.join(work, "cluster.yaml"), cluster_config(m, dest, prior_s, decoder_s))
    tmp = tempfile.mkdtemp(prefix="kbc-", dir="/tmp")
    load = loadavg()
    args = {"config": path, "nodes": a.nodes, "gpus_per_node": a.gpus_per_node, "cpus_per_node": a.cpus_per_node,
            "one_gpu": a.one_gpu}
    p = subprocess.run([sys.executable, "-c", SCRIPT % {"root": ROOT}, json.dumps(args)], env=ray_env(tmp),
                       capture_output=True, text=True)
    shutil.rmtree(tmp, ignore_errors=True)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT")), None)
    if not line:
        print(p.stdout[-3000:], p.stderr[-5000:])
        raise SystemExit("cluster run failed")
    res = json.loads(line[len("RESULT"):])
    ideal = res["gpus"] / (prior_s + decoder_s)
    rate, t_lo, t_hi = steady(res["commits"])
    d = res["driver"]
    r = {"ratio": ratio or f"{prior_s}:{decoder_s}", "prior_s": round(prior_s, 4), "decoder_s": round(decoder_s, 4),
         "gpus": res["gpus"], "rows": a.cluster_rows, "exit": res["exit"], "wall_s": round(res["wall"], 1),
         "steady_img_s": round(rate, 2), "window_s": [round(t_lo, 1), round(t_hi, 1)],
         "ideal_img_s": round(ideal, 2), "fraction": round(rate / ideal, 3),
         "rows_ok": res["ok"], "rows_unique": res["unique"], "rows_on_same_gpu": res["same_gpu_rows"],
         "rows_without_gpu": res["rows_without_gpu"], "prior_gpus_used": res["prior_gpus"],
         "decoder_gpus_used": res["decoder_gpus"], "colocate": (res["layout"] or {}).get("colocate"),
         "split": d.get("balance"), "replicas": d.get("replicas"), "driver_cpu_s": d.get("cpu_seconds"),
         "load_before": round(load, 2), "load_after": round(loadavg(), 2)}
    print(json.dumps(r), flush=True)
    shutil.rmtree(dest, ignore_errors=True)
    return r


def run(a, work: str, manifest) -> list[dict]:
    """Every ``--ratio`` (or ``--prior-s`` / ``--decoder-s``) in turn; prints a table."""
    ratios = [None] if a.prior_s and a.decoder_s else a.ratio
    out = [run_one(a, work, manifest, r) for r in ratios]
    where = "1 node x 1 fake GPU" if a.one_gpu else f"{a.nodes} nodes x {a.gpus_per_node} fake GPUs, head without GPUs"
    print(f"\ncluster ({where}; config without resources:; {a.cluster_rows} rows):")
    print("| prior:decoder | s/img | steady img/s | ideal img/s | fraction | every row once, ok | same GPU | split over time (t s: prior+decoder) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out:
        split = ", ".join(f"{h['t']}: {h['prior']}+{h['decoder']}" for h in (r["split"] or []))
        once = r["rows_unique"] and r["rows_ok"] == r["rows"]
        print(f"| {r['ratio']} | {r['prior_s']} / {r['decoder_s']} | {r['steady_img_s']} | {r['ideal_img_s']} | "
              f"**{r['fraction']:.3f}** | {once} | {r['rows_on_same_gpu']} | {split or r['colocate'] and 'one process'} |")
    return out
