"""Time to first image with model folders in object storage: a cold node cache vs a warm one.

A moto S3 server on loopback stands in for the bucket. The tiny models (``kbatch models tiny``) are staged
into it once with ``kbatch.models.store.pull_model`` (what ``kbatch models pull`` does), then the same small
``kbatch run`` (8 text2img rows, 64x64) is timed with ``models.*: s3://...``:

* **local**: the model folders on local disk (no staging), the baseline;
* **cold**: an empty ``models.cache_dir``: each node's first actor copies the folders from S3;
* **warm**: the same cache again: the copies are verified and reused.

Reported per case: the whole command (spawn to exit) and ``first_image_seconds`` (the driver loop's start to
its first decoder batch done: actor start, staging, model load, first prior and decoder batch).

    python bench/models.py [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from _common import machine, ray_env, versions, write_yaml

AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default="/tmp/kbatch-bench-models-s3")
    a = ap.parse_args()
    from moto.server import ThreadedMotoServer

    from kbatch.models.store import pull_model
    from kbatch.models.tiny import write_tiny_models

    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_port(), verbose=False)
    server.start()
    endpoint = "http://%s:%d" % server.get_host_and_port()
    os.environ.update(AWS, AWS_ENDPOINT_URL=endpoint)
    import s3fs

    s3fs.S3FileSystem().mkdir("bench")
    local = write_tiny_models(os.path.join(a.work, "tiny"))
    t0 = time.perf_counter()
    remote = {}
    for k in ("prior", "decoder", "inpaint"):
        pull_model(local[k], f"s3://bench/models/{k}")
        remote[k] = f"s3://bench/models/{k}"
    pulled = time.perf_counter() - t0
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = os.path.join(a.work, "m.parquet")
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(8)], "prompt": [f"thing {i}" for i in range(8)]}), manifest)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}, {json.dumps(versions())}")
    print(f"pull of the three tiny folders to S3 (moto): {pulled:.2f} s")
    rows = []
    cache = os.path.join(a.work, "cache")
    for rep in range(a.repeats):
        for case in ("local", "cold", "warm"):
            if case == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            models = local if case == "local" else remote
            out = os.path.join(a.work, f"out-{case}-{rep}")
            cfg = {"models": {**models, "dtype": "float32", "cache_dir": cache}, "manifest": manifest,
                   "output": {"path": out, "gallery": False}, "progress": "off",
                   "defaults": {"height": 64, "width": 64, "num_inference_steps": 10,
                                "prior_num_inference_steps": 5}}
            path = write_yaml(os.path.join(a.work, f"{case}.yaml"), cfg)
            tmp = tempfile.mkdtemp(prefix="kbm-", dir="/tmp")
            env = ray_env(tmp, extra={**AWS, "AWS_ENDPOINT_URL": endpoint})
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "kbatch.cli", "run", path], env=env, capture_output=True,
                               text=True)
            wall = time.perf_counter() - t0
            shutil.rmtree(tmp, ignore_errors=True)
            job = json.load(open(os.path.join(out, "_job.json")))
            r = {"case": case, "repeat": rep, "exit": p.returncode, "wall_s": round(wall, 2),
                 "first_image_s": job.get("driver", {}).get("first_image_seconds")}
            if p.returncode:
                r["stderr"] = p.stderr[-1500:]
            print(json.dumps(r), flush=True)
            rows.append(r)
    server.stop()
    print("\n| case | repeat | exit | whole command s | first image s (from the driver loop's start) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['repeat']} | {r['exit']} | {r['wall_s']} | {r['first_image_s']} |")


if __name__ == "__main__":
    main()
