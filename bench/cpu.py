"""CPU benchmark: `kbatch run` as a whole command (A) vs a plain in-process diffusers loop (B).

Tiny random-weight models, N text2img rows at 64x64 (decoder 10 steps, prior 5, guidance 4, as the demo).

A = ``kbatch run CONFIG --output fresh_dir --progress off`` in a subprocess, timed wall-clock from spawn to
    exit: Python start, imports, Ray start, actor start + model load, render, PNG writes, Ray shutdown.
B = in this process: load ``KandinskyPriorPipeline`` + ``KandinskyPipeline`` from the same folders, loop over
    the same rows (same seeds) in batches of 8 (prior call, decoder call, PIL, PNG files), timed including
    the model load; torch's default threads (= CPUs).

Runs are interleaved A, B, A, B, ... so that load from other processes hits both sides alike; the 1-minute
load average is printed next to each run. Prints images/s per run and mean(A img/s) / mean(B img/s).
Memory: B's peak RSS is this process's own (getrusage); for A every process of the ``kbatch run`` tree is
polled with psutil every 0.2 s (peak RSS, CPU seconds), grouped by Ray process title (ray::StagesWorker,
ray::PriorWorker, ray::DecoderWorker, ray::WriterWorker, raylet, gcs_server, the driver, ...).

    python bench/cpu.py                    # 256 rows, 2 repeats (A,B,A,B)
    python bench/cpu.py --quick            # 32 rows, 1 repeat: smoke test
    python bench/cpu.py --variant cpu1x2c --variant cpu2c --repeats 1  # compare kbatch configs
    python bench/cpu.py --kbatch-path /tmp/kbfix --variant cpu2        # also run a patched kbatch copy
    python bench/cpu.py --env OMP_WAIT_POLICY=PASSIVE                  # same env for A and B
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

# kbatch resource presets for the 2-CPU machine ("cpus": Ray scheduling shares; "threads": torch intra-op
# threads of the worker). DEFAULT_VARIANT is the default; RESULTS.md has the measurements behind the choice.
VARIANTS: dict[str, dict] = {
    # no resources section at all: what `auto` resolves to on this machine (kbatch/run/layout.py: on a CPU
    # cluster, one colocated process with a lane per core, one torch thread each = cpu1x2c's layout)
    "auto": dict(prior={}, decoder={}, io_cpus=0.25, rows_per_shard=64),
    # two decoder replicas x 1 thread (one per core) + a 1-thread prior between them; 64-row shards
    "cpu2": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": 8, "threads": 1},
                 decoder={"replicas": 2, "gpus": 0, "cpus": 0.75, "batch_size": 8, "threads": 1},
                 io_cpus=0.25, rows_per_shard=64),
    # cpu2 with the prior inside the two decoder processes (resources.colocate): two model-loading processes
    "cpu2c": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": 8, "threads": 1},
                  decoder={"replicas": 2, "gpus": 0, "cpus": 0.75, "batch_size": 8, "threads": 1},
                  io_cpus=0.25, rows_per_shard=64, extra={"resources": {"colocate": True}}),
    # cpu2c as one process: one replica running 2 batches at once (resources.decoder.concurrency: lanes
    # sharing one copy of the weights), 1 torch thread per lane
    "cpu1x2c": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": 8, "threads": 1},
                    decoder={"replicas": 1, "gpus": 0, "cpus": 1.5, "batch_size": 8, "threads": 1,
                             "concurrency": 2},
                    io_cpus=0.25, rows_per_shard=64, extra={"resources": {"colocate": True}}),
    # cpu1x2c with the prior in its own process (both processes import torch + diffusers at once)
    "cpu1x2": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": 8, "threads": 1},
                   decoder={"replicas": 1, "gpus": 0, "cpus": 1.25, "batch_size": 8, "threads": 1,
                            "concurrency": 2},
                   io_cpus=0.25, rows_per_shard=64),
    # one decoder with 2 threads (the demo's decoder), prior 1 thread
    "dec2t": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.5, "batch_size": 8, "threads": 1},
                  decoder={"replicas": 1, "gpus": 0, "cpus": 1, "batch_size": 8, "threads": 2},
                  io_cpus=0.25, rows_per_shard=64),
    # one decoder with 1 thread
    "dec1t": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.5, "batch_size": 8, "threads": 1},
                  decoder={"replicas": 1, "gpus": 0, "cpus": 1, "batch_size": 8, "threads": 1},
                  io_cpus=0.25, rows_per_shard=64),
    # cpu2 with 16 images per decoder call
    "cpu2-b16": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": 16, "threads": 1},
                     decoder={"replicas": 2, "gpus": 0, "cpus": 0.75, "batch_size": 16, "threads": 1},
                     io_cpus=0.25, rows_per_shard=64),
    # cpu2 with 4 images per decoder call (more, smaller tasks)
    "cpu2-b4": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": 8, "threads": 1},
                    decoder={"replicas": 2, "gpus": 0, "cpus": 0.75, "batch_size": 4, "threads": 1},
                    io_cpus=0.25, rows_per_shard=64),
    # cpu2 writing one shard at the end (no write overlap, one writer process)
    "cpu2-1shard": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": 8, "threads": 1},
                        decoder={"replicas": 2, "gpus": 0, "cpus": 0.75, "batch_size": 8, "threads": 1},
                        io_cpus=0.25, rows_per_shard=100000),
    # cpu2 with 16-row shards (more writer tasks)
    "cpu2-s16": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": 8, "threads": 1},
                     decoder={"replicas": 2, "gpus": 0, "cpus": 0.75, "batch_size": 8, "threads": 1},
                     io_cpus=0.25, rows_per_shard=16),
    # the demo's resources as shipped (decoder 2 threads, prior threads from cpus 0.5, 8-row shards)
    "demo": dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.5, "batch_size": 8},
                 decoder={"replicas": 1, "gpus": 0, "cpus": 1, "batch_size": 8, "threads": 2},
                 io_cpus=0.25, rows_per_shard=8),
}
DEFAULT_VARIANT = "cpu1x2c"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="/tmp/kbatch-bench-models", help="tiny model cache (written if missing)")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="A/B pairs per variant")
    p.add_argument("--quick", action="store_true", help="smoke run: 32 rows, 1 repeat")
    p.add_argument("--batch", type=int, default=8, help="baseline rows per prior/decoder call")
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS), default=None,
                   help=f"kbatch resource preset (repeatable; default {DEFAULT_VARIANT})")
    p.add_argument("--kbatch-path", default=None,
                   help="folder with a patched `kbatch` package: every A variant also runs with it (name+patch)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `kbatch run --set` for every A run")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment for both sides (A's process tree and this process, set before torch loads)")
    p.add_argument("--no-baseline", action="store_true", help="A runs only (compare kbatch variants)")
    p.add_argument("--running-ray", action="store_true",
                   help="also run every A variant against a Ray started once beforehand (RAY_ADDRESS), as "
                        "on a cluster: Ray's own start and stop are then outside the timing")
    p.add_argument("--workdir", default=None, help="where manifests, configs, outputs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep outputs and the work dir")
    p.add_argument("--no-rss", action="store_true", help="don't poll the kbatch process tree")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.repeats = 32, 1
    args.variant = args.variant or [DEFAULT_VARIANT]
    args.env = dict(e.split("=", 1) for e in args.env)
    return args


def count_images(out: str) -> int:
    return len(glob.glob(os.path.join(out, "images", "*", "*.png")))


def run_a(args, name: str, cfg_path: str, kbatch_path: str | None, work: str, k: int,
          address: str | None = None) -> C.Timed:
    out = os.path.join(work, f"out-{name}-{k}".replace(" ", "_"))
    ray_tmp = tempfile.mkdtemp(prefix="kbr-", dir="/tmp")  # short: Ray's socket paths have a length limit
    lb = C.loadavg()
    log_path = os.path.join(work, f"kbatch-{name}-{k}.log".replace(" ", "_"))
    env = {**args.env, **({"RAY_ADDRESS": address} if address else {})}
    seconds, rc, poller, log = C.run_kbatch(cfg_path, out, ray_tmp, sets=args.sets, poll=not args.no_rss,
                                            log_path=log_path, kbatch_path=kbatch_path, env_extra=env)
    t = C.Timed(f"A kbatch[{name}]", seconds, count_images(out), lb, C.loadavg())
    t.extra = {"rc": rc, "result": C.job_result(out), "procs": poller.by_group() if poller else {}}
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
    t.extra = {"load_s": t_load}
    del prior, decoder
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return t


def describe(t: C.Timed) -> str:
    if t.name.startswith("B"):
        return f"model load {t.extra['load_s']:.1f}s"
    r = t.extra.get("result") or {}
    if not r:
        return ""
    stages = ", ".join(f"{k.replace('_seconds', '')} {v:.1f}s" for k, v in (r.get("stage_seconds") or {}).items())
    return f"kbatch inside Ray: {r.get('seconds', 0):.1f}s {r.get('images_per_second', 0):.2f} img/s; busy: {stages}"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.update(args.env)  # before torch is imported (OMP_* are read when the runtime starts)
    t_start = time.perf_counter()
    C.quiet_libs()
    import torch

    import kbatch.models.tiny as tm

    models = tm.write_tiny_models(args.models)
    work = args.workdir or tempfile.mkdtemp(prefix="kbatch-bench-")
    os.makedirs(work, exist_ok=True)
    wl = C.Workload(rows=args.rows)
    manifest = os.path.join(work, "manifest.parquet")
    recs = C.write_manifest(manifest, args.rows)
    texts, seeds = [r["prompt"] for r in recs], C.row_seeds(recs, wl.seed)
    a_runs = []  # (name, config path, kbatch path, on the running Ray)
    for v in args.variant:
        path = C.write_yaml(os.path.join(work, f"config-{v}.yaml"),
                            C.kbatch_config(models, manifest, os.path.join(work, "out"), wl, **VARIANTS[v]))
        a_runs.append((v, path, None, False))
        if args.kbatch_path:
            a_runs.append((v + "+patch", path, os.path.abspath(args.kbatch_path), False))
    if args.running_ray:
        a_runs += [(name + " on running Ray", path, kp, True) for name, path, kp, _ in list(a_runs)]
    print(f"kbatch CPU benchmark: {args.rows} rows text2img {wl.height}x{wl.width}, decoder {wl.steps} steps, "
          f"prior {wl.prior_steps}, guidance {wl.guidance}; B: batches of {args.batch}, torch threads "
          f"{torch.get_num_threads()}; {C.machine()}")
    print(f"versions: {C.versions()}; env for both sides: {args.env or 'unchanged'}; work dir {work}")
    for v in args.variant:
        print(f"config[{v}]: {VARIANTS[v]}")
    if args.kbatch_path:
        print(f"'+patch' runs use the kbatch package under {args.kbatch_path}")
    sys.stdout.flush()

    runs: list[C.Timed] = []
    schedule = []
    for k in range(args.repeats):
        for a in a_runs:
            schedule.append(("A", a, k))
            if not args.no_baseline:
                schedule.append(("B", None, k))
    for side, a, k in schedule:
        if side == "A" and a[3]:  # a fresh head per run, stopped after it: no idle cluster during other runs
            head = C.RayHead(os.cpu_count(), env=args.env)
            try:
                time.sleep(3)  # let its prestarted workers settle (not timed: on a cluster Ray is up already)
                t = run_a(args, a[0], a[1], a[2], work, k, address=head.address)
            finally:
                head.stop()
        elif side == "A":
            t = run_a(args, a[0], a[1], a[2], work, k)
        else:
            t = run_b(args, models, wl, texts, seeds, work, k)
        runs.append(t)
        print(f"  {t.name:<24} {t.seconds:7.1f}s {t.images:4d} img {t.ips:6.2f} img/s  "
              f"load {t.load_before:.1f}->{t.load_after:.1f}  {describe(t)}", flush=True)
    b_peak = C.self_peak_rss()

    # ------------------------------------------------------------------------------------------ report
    print()
    print("| run | seconds | images | images/s | load avg (1 min) before->after |")
    print("|---|---|---|---|---|")
    for t in runs:
        print(f"| {t.name} | {t.seconds:.1f} | {t.images} | {t.ips:.2f} | {t.load_before:.1f}->{t.load_after:.1f} |")
    print()
    b = [t.ips for t in runs if t.name.startswith("B")]
    mb = sum(b) / len(b) if b else 0.0
    names = list(dict.fromkeys(t.name for t in runs if t.name.startswith("A")))
    for name in names:
        a = [t.ips for t in runs if t.name == name]
        ma = sum(a) / len(a)
        inner = [t.extra["result"].get("images_per_second", 0) for t in runs if t.name == name and t.extra["result"]]
        line = f"{name}: mean {ma:.2f} img/s over {len(a)} run(s)"
        if mb:
            line += f"; ratio mean(A img/s) / mean(B img/s) = {ma:.2f} / {mb:.2f} = {ma / mb:.2f} (target >= 0.8)"
        if inner:
            line += f"; inside Ray (kbatch's own summary) {sum(inner) / len(inner):.2f} img/s"
        print(line)
    print()
    if b:
        print(f"peak RSS, B (this process: diffusers in-process, both pipelines): {C.mib(b_peak)}")
    for name in names:
        merged: dict[str, list] = {}
        n_runs = 0
        mem: dict[str, float] = {}
        for t in runs:
            if t.name != name:
                continue
            for key, v in ((t.extra.get("result") or {}).get("memory") or {}).items():
                mem[key] = max(mem.get(key, 0.0), v)
            if t.extra.get("procs"):
                n_runs += 1
                for g, (n, m, c) in t.extra["procs"].items():
                    e = merged.setdefault(g, [0, 0, 0.0])
                    e[0], e[1], e[2] = max(e[0], n), max(e[1], m), e[2] + c
        if merged:
            print(f"{name} process tree (peak RSS: max over processes and runs; CPU s: mean per run, summed "
                  f"over the group's processes):")
            for g, (n, m, c) in sorted(merged.items(), key=lambda kv: -kv[1][1]):
                print(f"  {g:<26} x{n:<2} peak RSS {C.mib(m):>8}   CPU {c / n_runs:6.1f}s")
        if mem:
            print("  as kbatch reports it (_job.json result.memory, GiB): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in sorted(mem.items())))
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s; work dir {work}" + ("" if args.keep else " (removed)"))
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
