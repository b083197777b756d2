"""``kbatch export`` at scale (docs/export.md): rows/s and peak RSS of the whole command at 20k and 200k images.

For each size: a source output made once by ``kbatch run`` with the simulated models (64x64 text2img, one
image per row, ``quality.clip_score`` on: a stand-in score uniform in [10, 40); ``output.format`` webdataset,
256 rows per shard; ``--embeddings`` adds ``quality.image_embeddings``), then ``kbatch export OUT DEST --where
EXPR --format F --progress off`` timed as a subprocess (Python start to exit), in this process (no Ray). The
export's own ``VmHWM`` (the kernel's peak RSS of the process, spikes included) is printed by a wrapper
around ``kbatch.cli.main``. Per size: wall seconds, images exported, images/s, ok records scanned/s, peak RSS.
The target: peak RSS at 200k within ~15% of 20k's (memory bounded by a source shard and an export shard).

    python bench/export.py                        # 20k and 200k, --where 'clip_score > 25' (about half)
    python bench/export.py --sizes 20000 --format hf --where ''
    python bench/export.py --embeddings --dedup 0.99
    python bench/export.py --dedup-scale 200000    # run/dedup.py alone: seconds and planted copies found
    python bench/export.py --sizes 20000 --ray 2   # the shards as Ray tasks on a local head of 2 CPUs

``--dedup-scale N``: ``NearDuplicates(0.95)`` over N random float16 768-d embeddings in chunks of 256, 1% of
them planted near-copies (cosine ~0.99) of an earlier one: seconds per 10k, whether the index went IVF, the
planted copies dropped (all should be) and the others kept (random 768-d vectors have cosine ~0 +- 0.04).

Source outputs are kept under ``--work`` (default /tmp/kbatch-bench-export) and reused by later runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from _common import ROOT, loadavg, machine, ray_env, versions, write_yaml
from scale import manifest

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent (this script, with Ray loaded)
WRAP = ("import sys, time; from kbatch.cli import main; t = time.perf_counter(); rc = main(sys.argv[1:]); "
        "hwm = [int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')][0]; "
        "print('bench-export', hwm * 1024, time.perf_counter() - t, flush=True); sys.exit(rc)")


def source(work: str, n: int, embeddings: bool) -> str:
    """The output ``kbatch run`` makes for ``n`` rows (made once, reused while its _SUCCESS is there)."""
    out = os.path.join(work, f"src-{n}" + ("-emb" if embeddings else ""))
    if os.path.exists(os.path.join(out, "_SUCCESS")):
        return out
    shutil.rmtree(out, ignore_errors=True)
    man = os.path.join(work, f"manifest-{n}")
    if not os.path.exists(man):
        manifest(man, n)
    quality = {"clip_score": True, **({"image_embeddings": True} if embeddings else {})}
    cfg = {"models": {"prior": "sim", "decoder": "sim"}, "manifest": man, "quality": quality,
           "output": {"path": out, "format": "webdataset", "rows_per_shard": 256, "gallery": False},
           "defaults": {"height": 64, "width": 64}, "progress": "off"}
    path = write_yaml(os.path.join(work, f"src-{n}.yaml"), cfg)
    exe = shutil.which("kbatch")
    cmd = ([exe] if exe else [sys.executable, "-m", "kbatch.cli"]) + ["run", path]
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=ray_env(work), cwd=work, stdout=subprocess.DEVNULL).returncode
    if rc != 0:
        raise SystemExit(f"kbatch run for {n} rows exited {rc}")
    print(f"# source of {n} rows made in {time.perf_counter() - t0:.0f}s: {out}", file=sys.stderr, flush=True)
    return out


def run_export(src: str, dest: str, args, address: str | None = None) -> dict:
    shutil.rmtree(dest, ignore_errors=True)
    cmd = [sys.executable, "-c", WRAP, "export", src, dest, "--format", args.format, "--progress", "off",
           "--shard-size", str(args.shard_size)] + (["--address", address] if address else [])
    if args.where:
        cmd += ["--where", args.where]
    if args.dedup is not None:
        cmd += ["--dedup", str(args.dedup)]
    env = ray_env(os.path.dirname(dest))
    env.pop("RAY_ADDRESS", None)
    load0 = loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"kbatch export exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("bench-export"))
    _, rss, inner = line.split()
    counts = json.load(open(os.path.join(dest, "_export.json")))["counts"]
    return {"images": counts["images"], "scanned": counts["scanned"], "duplicates": counts["duplicates"],
            "wall_s": round(wall, 1), "export_s": round(float(inner), 1),
            "img_per_s": round(counts["images"] / wall, 0), "scanned_per_s": round(counts["scanned"] / wall, 0),
            "peak_rss_mib": round(int(rss) / 2**20, 0),
            "dest_mib": round(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dest) for f in fs)
                              / 2**20, 0),
            "load": f"{load0:.1f}->{loadavg():.1f}"}


def dedup_scale(n: int, chunk: int = 256, seed: int = 0) -> dict:
    import numpy as np

    from kbatch.run.dedup import NearDuplicates

    rng = np.random.default_rng(seed)
    near = NearDuplicates(0.95)
    planted = set(rng.choice(np.arange(1000, n), size=n // 100, replace=False).tolist())
    kept_wrong = dropped_right = 0
    t0 = time.perf_counter()
    marks = []
    for a in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - a), 768)).astype(np.float32)
        for j in range(len(x)):
            if a + j in planted:  # a near-copy of a random earlier kept row (one of the first 1000)
                src = np.random.default_rng(seed + 1 + a + j).integers(0, 1000)
                x[j] = _row(seed, src) + 0.1 * rng.standard_normal(768)
            elif a + j < 1000:
                x[j] = _row(seed, a + j)
        keep = near.keep(x.astype(np.float16))
        for j, k in enumerate(keep):
            if a + j in planted:
                dropped_right += int(not k)
            else:
                kept_wrong += int(not k)
        if (a + chunk) % 10000 < chunk:
            marks.append((a + chunk, round(time.perf_counter() - t0, 1), near.exact))
    return {"n": n, "seconds": round(time.perf_counter() - t0, 1), "planted": len(planted),
            "planted_dropped": dropped_right, "others_dropped": kept_wrong, "exact_at_end": near.exact,
            "progress": marks[::max(1, len(marks) // 10)]}


def _row(seed: int, i: int):
    import numpy as np

    return np.random.default_rng([seed, i]).standard_normal(768).astype(np.float32)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    p.add_argument("--work", default="/tmp/kbatch-bench-export")
    p.add_argument("--format", default="webdataset", choices=["webdataset", "parquet", "hf"])
    p.add_argument("--where", default="clip_score > 25")
    p.add_argument("--dedup", type=float, default=None)
    p.add_argument("--embeddings", action="store_true", help="sources with quality.image_embeddings")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--dedup-scale", type=int, default=None, metavar="N")
    p.add_argument("--ray", type=int, default=None, metavar="CPUS",
                   help="export shards as Ray tasks on a `ray start --head` of CPUS CPUs (--address)")
    args = p.parse_args()
    if args.dedup_scale:
        print(f"# {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {loadavg():.1f}")
        print(json.dumps(dedup_scale(args.dedup_scale)), flush=True)
        return
    os.makedirs(args.work, exist_ok=True)
    print(f"# {machine()}, {versions()}, kbatch at {ROOT}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# kbatch export --format {args.format} --where {args.where!r} --shard-size {args.shard_size}"
          + (f" --dedup {args.dedup}" if args.dedup is not None else ""))
    rows = []
    head = None
    try:
        for n in args.sizes:
            src = source(args.work, n, args.embeddings or args.dedup is not None)
            if args.ray and head is None:
                from _common import RayHead

                head = RayHead(args.ray)
            r = {"source_images": n, **run_export(src, os.path.join(args.work, f"dest-{n}"), args,
                                                  head.address if head else None)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    finally:
        if head is not None:
            head.stop()
    print("\n| source images | exported | wall s | exported img/s | scanned rec/s | peak RSS | DEST | load |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source_images']:,} | {r['images']:,} | {r['wall_s']} | {r['img_per_s']:.0f} | "
              f"{r['scanned_per_s']:.0f} | {r['peak_rss_mib']:.0f} MiB | {r['dest_mib']:.0f} MiB | {r['load']} |")


if __name__ == "__main__":
    main()
