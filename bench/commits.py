"""Shard commits per second by writers, on S3 with ~60 ms per request (issue 25 item 4; docs/output.md).

Each writer thread does, per shard, what a writer does around its data (the data objects themselves are left
out: they do not contend): the shard's fence and commit work.

- now: ``Fence.begin`` (create the attempt's intent ``_inflight/<shard>~<attempt>.json``, read the lease),
  ``Fence.check`` (read the lease), create the commit record, ``Fence.end`` (delete the intent);
- before (a checkout of ccf01fc, ``--tree``): ``Fence.register`` (the shard listed in ``_lease.json``: read +
  conditional PUT, retried on conflict), ``Fence.check``, create the commit record, ``Fence.deregister``.

Moto's S3 server and the latency front (``tests/fault_front.py``, ``--latency``) each run in a process of
their own, away from the writers' GIL; the writers share one s3fs client with a connection pool larger than
the writers (``max_pool_connections``), for both trees alike.

    python bench/commits.py                                   # this tree, 1 4 16 64 writers, 60 ms
    git worktree add /tmp/kb-ccf01fc ccf01fc
    python bench/commits.py --tree /tmp/kb-ccf01fc            # the code before (same script, same servers)
    python bench/commits.py --both /tmp/kb-ccf01fc            # both, one table (what bench/RESULTS.md shows)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUCKET = "kbatch-bench-commits"
ENV = {"AWS_ACCESS_KEY_ID": "AKIABENCHCOMMITS0001", "AWS_SECRET_ACCESS_KEY": "bench-commits-secret",
       "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent/aws-config",
       "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-creds", "AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


class Servers:
    """moto's S3 server and the latency front, each a process of its own; stopped on exit."""

    def __init__(self, latency: float):
        self.latency = latency
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> str:
        port = _free_port()
        moto = subprocess.Popen(
            [sys.executable, "-c", "import sys; from moto.server import ThreadedMotoServer as S; "
             f"s = S(ip_address='127.0.0.1', port={port}, verbose=False); s.start(); sys.stdin.read(); s.stop()"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(moto)
        _wait_port(port)
        front = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "fault_front.py"),
                                  f"http://127.0.0.1:{port}", "--latency", str(self.latency)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(front)
        first = front.stdout.readline().split()
        if len(first) != 2 or first[0] != "url":
            raise RuntimeError(f"the latency front did not start: {first}")
        self.url = first[1]
        return self.url

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            try:
                p.stdin.close()
                p.wait(20)
            except Exception:  # noqa: BLE001
                p.kill()


def _writers_run(tree: str | None, endpoint: str, writers: int, seconds: float) -> dict:
    """In this process: one output, ``writers`` threads committing shards for ``seconds``."""
    if tree:
        sys.path.insert(0, tree)
    os.environ.update(ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    import kbatch
    import s3fs

    from kbatch.output import commits
    from kbatch.output.lease import Lease
    from kbatch.storage import get_fs

    so = {"config_kwargs": {"max_pool_connections": max(16, 2 * writers)}}
    fs = s3fs.S3FileSystem(**so)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    root = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    run_id = f"bench-{uuid.uuid4().hex[:6]}"
    lease = Lease.acquire(root, run_id, so)
    fence = lease.fence()
    new = hasattr(fence, "begin")
    if new:
        store = fence.store()
    else:
        cfs, croot = get_fs(root, so)
    counter = itertools.count()
    done, errors = [0] * writers, []
    stop = threading.Event()

    def one_shard(i: int) -> None:
        shard = f"{run_id}-{i:06d}"
        attempt = commits.new_attempt()
        record = {"shard": shard, "attempt": attempt, "rows": 256, "run_id": run_id, "epoch": fence.epoch}
        if new:
            fence.begin(shard, attempt)
            fence.check()
            assert commits.create(store, shard, record) is None
            fence.end(shard, attempt)
        else:
            fence.register(shard)
            fence.check()
            assert commits.create(cfs, croot, shard, record) is None
            fence.deregister(shard)

    def writer(w: int) -> None:
        while not stop.is_set():
            try:
                one_shard(next(counter))
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}")
                return
            done[w] += 1

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(writers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(600)
    elapsed = time.perf_counter() - t0
    try:
        lease.release()
    except Exception:  # noqa: BLE001
        pass
    return {"tree": "before" if not new else "now", "kbatch": os.path.dirname(kbatch.__file__),
            "writers": writers, "shards": sum(done), "seconds": round(elapsed, 2),
            "shards_per_s": round(sum(done) / elapsed, 2), "errors": errors[:3]}


def measure(tree: str | None, endpoint: str, writers: int, seconds: float) -> dict:
    """One measurement in a fresh process (so that ``--tree`` decides which kbatch is imported)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", str(writers), "--seconds", str(seconds),
           "--endpoint", endpoint] + (["--tree", tree] if tree else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = tree or REPO
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/tmp", timeout=seconds + 600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", help="a checkout of another kbatch (e.g. ccf01fc) to measure instead of this one")
    p.add_argument("--both", metavar="OLD_TREE", help="measure OLD_TREE and this tree on the same servers")
    p.add_argument("--writers", default="1,4,16,64")
    p.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    p.add_argument("--latency", type=float, default=0.06, help="seconds the front adds to every request")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(_writers_run(args.tree, args.endpoint, args.one, args.seconds)), flush=True)
        return
    writers = [int(w) for w in args.writers.split(",")]
    trees = [args.both, None] if args.both else [args.tree]
    rows = []
    with Servers(args.latency) as endpoint:
        for tree in trees:
            for w in writers:
                r = measure(tree, endpoint, w, args.seconds)
                rows.append(r)
                print(f"{r['tree']:6s} {w:3d} writers: {r['shards']:6d} shards in {r['seconds']:6.1f} s = "
                      f"{r['shards_per_s']:7.2f} shards/s" + (f"  errors: {r['errors']}" if r["errors"] else ""),
                      flush=True)
    print(json.dumps({"latency_s": args.latency, "rows": rows}))


if __name__ == "__main__":
    main()
