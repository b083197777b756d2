"""CPU benchmark: `kbatch run` as a whole command (A) vs a plain in-process diffusers loop (B).

Tiny random-weight models, N text2img rows at 64x64 (decoder 10 steps, prior 5, guidance 4, as the demo).

A = ``kbatch run CONFIG --output fresh_dir --progress off`` in a subprocess, timed wall-clock from spawn to
    exit: Python start, imports, Ray start, actor start + model load, render, PNG writes, Ray shutdown.
B = in this process: load ``KandinskyPriorPipeline`` + ``KandinskyPipeline`` from the same folders, loop over
    the same rows (same seeds) in batches of 8 (prior call, decoder call, PIL, PNG files), timed including
    the model load; torch's default threads (= CPUs).

Runs are interleaved A, B, A, B, ... so that load from other processes hits both sides alike; the load
average is printed next to each run. Prints images/s per run and mean(A img/s) / mean(B img/s).
Peak RSS: for B this process's own (getrusage); for A every process of the ``kbatch run`` tree, polled with
psutil every 0.2 s and grouped by Ray process title (ray::PriorWorker, ray::DecoderWorker, ray::write_shard,
raylet, gcs_server, driver...).

    python bench/cpu.py                    # 256 rows, 2 repeats (< 10 min on the 2-core box when idle)
    python bench/cpu.py --quick            # 32 rows, 1 repeat: smoke test
    python bench/cpu.py --variant best --variant dec2x1 --repeats 1   # compare kbatch configs
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

# kbatch resource presets for a 2-CPU machine. "best" is what the measurements in RESULTS.md chose.
# cpus are Ray scheduling shares (actors only need to fit in 2 CPUs together with the writer tasks);
# threads are torch intra-op threads of the worker.
VARIANTS: dict[str, dict] = {
    # one decoder with 2 threads (the decoder is ~98% of the work); prior 1 thread; 64-row shards
    "best": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.5, "batch_size": 8, "threads": 1},
                 decoder={"replicas": 1, "gpus": 0, "cpus": 1, "batch_size": 8, "threads": 2},
                 io_cpus=0.25, rows_per_shard=64),
    # the demo's resources (prior 0.5 cpu, decoder 1 cpu 2 threads, shards of 8 rows)
    "demo": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.5, "batch_size": 8},
                 decoder={"replicas": 1, "gpus": 0, "cpus": 1, "batch_size": 8, "threads": 2},
                 io_cpus=0.25, rows_per_shard=8),
    # one decoder with 1 thread
    "dec1x1": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.5, "batch_size": 8, "threads": 1},
                   decoder={"replicas": 1, "gpus": 0, "cpus": 1, "batch_size": 8, "threads": 1},
                   io_cpus=0.25, rows_per_shard=64),
    # two decoders with 1 thread each
    "dec2x1": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": 8, "threads": 1},
                   decoder={"replicas": 2, "gpus": 0, "cpus": 0.75, "batch_size": 8, "threads": 1},
                   io_cpus=0.25, rows_per_shard=64),
    # bigger decoder batches (16 images per forward pass)
    "dec16": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.5, "batch_size": 16, "threads": 1},
                  decoder={"replicas": 1, "gpus": 0, "cpus": 1, "batch_size": 16, "threads": 2},
                  io_cpus=0.25, rows_per_shard=64),
    # one shard for the whole job (writes at the end, no overlap)
    "shard256": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.5, "batch_size": 8, "threads": 1},
                     decoder={"replicas": 1, "gpus": 0, "cpus": 1, "batch_size": 8, "threads": 2},
                     io_cpus=0.25, rows_per_shard=256),
}

SUMMARY_RE = re.compile(r"([\d.]+) img/s \| ([\d.]+)s \| stages: (.*)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="/tmp/kbatch-bench-models", help="tiny model cache (written if missing)")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="A/B pairs (each variant once per repeat)")
    p.add_argument("--quick", action="store_true", help="smoke run: 32 rows, 1 repeat")
    p.add_argument("--batch", type=int, default=8, help="baseline rows per prior/decoder call")
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS), default=None,
                   help="kbatch resource preset (repeatable; default: best)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `kbatch run --set` for every A run")
    p.add_argument("--workdir", default=None, help="where manifests, configs, outputs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--no-rss", action="store_true", help="don't poll the RSS of the kbatch process tree")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.repeats = 32, 1
    args.variant = args.variant or ["best"]
    return args


def count_images(out: str) -> int:
    return len(glob.glob(os.path.join(out, "images", "*", "*.png")))


def run_a(args, variant: str, cfg_path: str, work: str, k: int) -> C.Timed:
    out = os.path.join(work, f"out-{variant}-{k}")
    ray_tmp = tempfile.mkdtemp(prefix="kbr-", dir="/tmp")  # short: Ray's socket paths have a length limit
    lb = C.loadavg()
    seconds, rc, poller, log = C.run_kbatch(cfg_path, out, ray_tmp, sets=args.sets, poll=not args.no_rss,
                                            log_path=os.path.join(work, f"kbatch-{variant}-{k}.log"))
    t = C.Timed(f"A kbatch[{variant}]", seconds, count_images(out), lb, C.loadavg())
    m = SUMMARY_RE.search(log)
    t.extra = {"rc": rc, "inner_ips": float(m.group(1)) if m else None, "inner_s": float(m.group(2)) if m else None,
               "stages": m.group(3).strip() if m else "", "rss": poller.by_group() if poller else {}}
    if rc != 0 or t.images != args.rows:
        print(f"!! kbatch exit {rc}, {t.images}/{args.rows} images; log tail:\n" + "\n".join(log.splitlines()[-15:]))
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return t


def run_b(args, models, wl, texts, seeds, work: str, k: int) -> C.Timed:
    out = os.path.join(work, f"out-diffusers-{k}")
    os.makedirs(out, exist_ok=True)
    lb = C.loadavg()
    t0 = time.perf_counter()
    prior, decoder = C.load_pipelines(models)
    t_load = time.perf_counter() - t0
    n = C.diffusers_batches(prior, decoder, texts, seeds, wl, args.batch, out)
    seconds = time.perf_counter() - t0
    t = C.Timed(f"B diffusers x{args.batch}", seconds, n, lb, C.loadavg())
    t.extra = {"load_s": t_load, "files": len(glob.glob(os.path.join(out, "*.png")))}
    del prior, decoder
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return t


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    C.quiet_libs()
    import torch

    import kbatch.tiny_models as tm

    models = tm.write_tiny_models(args.models)
    work = args.workdir or tempfile.mkdtemp(prefix="kbatch-bench-")
    os.makedirs(work, exist_ok=True)
    wl = C.Workload(rows=args.rows)
    manifest = os.path.join(work, "manifest.parquet")
    recs = C.write_manifest(manifest, args.rows)
    texts, seeds = [r["prompt"] for r in recs], C.row_seeds(recs, wl.seed)
    cfgs = {}
    for v in args.variant:
        preset = dict(VARIANTS[v])
        cfgs[v] = C.write_yaml(os.path.join(work, f"config-{v}.yaml"),
                               C.kbatch_config(models, manifest, os.path.join(work, "out"), wl, **preset))
    print(f"kbatch CPU benchmark: {args.rows} rows text2img {wl.height}x{wl.width}, decoder {wl.steps} steps, "
          f"prior {wl.prior_steps}, guidance {wl.guidance}; B batch {args.batch}, torch threads "
          f"{torch.get_num_threads()}; {C.machine()}")
    print(f"versions: {C.versions()}; work dir {work}")
    for v, path in cfgs.items():
        print(f"config[{v}]: {path}  {VARIANTS[v]}")
    sys.stdout.flush()

    # warm the file cache and imports for B outside the timings (A pays its own imports: a fresh process)
    import diffusers  # noqa: F401

    runs: list[C.Timed] = []
    schedule = [(side, v, k) for k in range(args.repeats) for v in args.variant for side in ("A", "B")]
    for side, v, k in schedule:
        if side == "A":
            t = run_a(args, v, cfgs[v], work, k)
            x = t.extra
            extra = (f"inner {x['inner_s']:.1f}s {x['inner_ips']:.2f} img/s; {x['stages']}"
                     if x.get("inner_s") else "")
        else:
            t = run_b(args, models, wl, texts, seeds, work, k)
            extra = f"model load {t.extra['load_s']:.1f}s"
        runs.append(t)
        print(f"  {t.name:<22} {t.seconds:7.1f}s {t.images:4d} img {t.ips:6.2f} img/s  "
              f"load {t.load_before:.1f}->{t.load_after:.1f}  {extra}")
        sys.stdout.flush()
    b_peak = C.self_peak_rss()

    # ------------------------------------------------------------------------------------------ report
    print()
    print(f"| run | seconds | images | images/s | load avg (1 min) before->after |")
    print(f"|---|---|---|---|---|")
    for t in runs:
        print(f"| {t.name} | {t.seconds:.1f} | {t.images} | {t.ips:.2f} | {t.load_before:.1f}->{t.load_after:.1f} |")
    b = [t.ips for t in runs if t.name.startswith("B")]
    mb = sum(b) / len(b)
    print()
    for v in args.variant:
        a = [t.ips for t in runs if t.name == f"A kbatch[{v}]"]
        ma = sum(a) / len(a)
        inner = [t.extra["inner_ips"] for t in runs if t.name == f"A kbatch[{v}]" and t.extra.get("inner_ips")]
        print(f"ratio[{v}] = mean(A img/s) / mean(B img/s) = {ma:.2f} / {mb:.2f} = {ma / mb:.2f}"
              f"   (target >= 0.8; kbatch's own img/s after Ray start: "
              f"{sum(inner) / max(1, len(inner)):.2f})")
    print()
    print(f"peak RSS, B (this process, diffusers in-process): {C.mib(b_peak)}")
    for v in args.variant:
        merged: dict[str, tuple[int, int]] = {}
        for t in runs:
            if t.name == f"A kbatch[{v}]":
                for g, (n, m) in t.extra.get("rss", {}).items():
                    n0, m0 = merged.get(g, (0, 0))
                    merged[g] = (max(n0, n), max(m0, m))
        if merged:
            print(f"peak RSS per process, A kbatch[{v}] (max over runs; processes per run):")
            for g, (n, m) in sorted(merged.items(), key=lambda kv: -kv[1][1]):
                print(f"  {g:<34} {C.mib(m):>9}  x{n}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s; work dir {work}" + ("" if args.keep else " (removed)"))
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
