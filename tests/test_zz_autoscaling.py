"""docs/clusters.md "Autoscaling" on Ray's own autoscaler (the fake multi-node provider Ray's tests use).

A head of 2 CPUs and no GPU; one node type of 2 GPUs, min 0, max 3, idle timeout 30 s. The default config
(no ``resources:``) with simulated models slow enough that GPU nodes are worth adding. Before: the job took
the CPU layout from the alive nodes, rendered on the head and never asked for a GPU node. Now: the GPU layout
(the autoscaler's node types count), pending replicas as demand, GPU nodes launched and used, and nothing
left asking, so the cluster is back to 0 GPU nodes within its idle timeout + 1 minute.

This cluster has its own temp dir and ports and is stopped by killing only its own processes
(``tests/fake_autoscaler.py``; ``ray stop`` would end the suite's Ray). Named ``test_zz_`` to run last.
The measured times are printed (``-s``) and kept in bench/RESULTS.md.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cli_helpers import write_job
from conftest import sim_models
from fake_autoscaler import FakeAutoscalingCluster

IDLE_TIMEOUT_S = 30
GPU_TYPE = {"resources": {"CPU": 2, "GPU": 2, "object_store_memory": 200_000_000}, "min_workers": 0, "max_workers": 3}
ROWS = 320

WATCH = textwrap.dedent("""
    import json, os, sys, time
    import ray
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get
    ray.init(address=sys.argv[1], log_to_driver=False)
    stop, t0 = sys.argv[2], float(sys.argv[3])
    def status():
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        lm = (json.loads(raw) if raw else {}).get("load_metrics_report") or {}
        actors = ray._private.state.actors().values()
        return {"requests": lm.get("request_demand") or [], "demand": lm.get("resource_demand") or [],
                "actors": sum(a.get("State") != "DEAD" for a in actors)}
    while not os.path.exists(stop):
        nodes = {n["NodeID"]: n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]}
        print(json.dumps({"t": round(time.time() - t0, 1), "nodes": nodes, **status()}), flush=True)
        time.sleep(1.0)
    pids = {str(a.get("Pid")): (a.get("Address") or {}).get("NodeID") for a in ray._private.state.actors().values()}
    print(json.dumps({"t": round(time.time() - t0, 1), "pids": pids, **status()}), flush=True)
""")


def _gpu_nodes(line: dict) -> set:
    return {n for n, g in line.get("nodes", {}).items() if g > 0}


class Watch:
    """The cluster seen once a second from a process of its own (nodes, autoscaler demand, live actors)."""

    def __init__(self, cluster, address, folder, t0):
        self.stop_file, self.file = folder / "watch.stop", folder / "watch.jsonl"
        self.proc = subprocess.Popen([sys.executable, "-c", WATCH, address, str(self.stop_file), str(t0)],
                                     env=cluster.env, stdout=open(self.file, "w"), stderr=subprocess.DEVNULL)

    def lines(self) -> list[dict]:
        out = []
        for x in self.file.read_text().splitlines():
            try:
                out.append(json.loads(x))
            except ValueError:  # a line being written
                pass
        return out

    def wait(self, what, timeout: float, since: float = -1.0) -> dict | None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hit = next((x for x in self.lines() if x["t"] > since and "nodes" in x and what(x)), None)
            if hit is not None:
                return hit
            if self.proc.poll() is not None:
                raise RuntimeError("the watcher exited")
            time.sleep(0.5)
        return None

    def close(self) -> dict:
        self.stop_file.touch()
        self.proc.wait(timeout=60)
        return self.lines()[-1]


@pytest.mark.timeout(480)
def test_default_config_scales_gpu_nodes_from_zero_and_leaves_nothing_behind(tmp_path):
    """A full job from 0 GPU nodes, then a second job interrupted (SIGTERM) while it renders: both leave no
    demand behind, and the cluster is back to 0 GPU nodes within its idle timeout + 1 minute."""
    cluster = FakeAutoscalingCluster(2, {"gpu_node": GPU_TYPE}, idle_timeout_minutes=IDLE_TIMEOUT_S / 60)
    cfg = {"models": sim_models(decoder_seconds=0.25, prior_seconds=0.005),
           "output": {"path": str(tmp_path / "out"), "rows_per_shard": 64, "gallery": False, "format": "parquet"},
           "defaults": {"height": 64, "width": 64}, "progress": "off"}
    rows = [{"id": f"r{i:04d}", "prompt": f"a red fox {i}"} for i in range(ROWS)]
    job = write_job(tmp_path / "job", cfg, rows)
    job2 = write_job(tmp_path / "job2", {**cfg, "output": {**cfg["output"], "path": str(tmp_path / "out2")}}, rows)
    watch = None
    try:
        address = cluster.start()
        env = {**cluster.env, "RAY_ADDRESS": address}
        t0 = time.time()
        watch = Watch(cluster, address, tmp_path, t0)
        run = subprocess.run([sys.executable, "-m", "kbatch.cli", "run", job], env=env, capture_output=True,
                             text=True, timeout=300)
        job_s = time.time() - t0
        (tmp_path / "kbatch.log").write_text(run.stdout + run.stderr)
        after_job = watch.wait(lambda x: True, 10, since=job_s)  # what is left asking once it exited

        # a second job, stopped by SIGTERM (a scheduler's stop) while its replicas run
        t2 = time.time() - t0
        p = subprocess.Popen([sys.executable, "-m", "kbatch.cli", "run", job2], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        busy = watch.wait(lambda x: x["actors"] >= 3, 120, since=t2)
        time.sleep(2)
        p.send_signal(signal.SIGTERM)
        code2 = p.wait(timeout=120)
        t_end = time.time() - t0
        cleared = watch.wait(lambda x: x["actors"] == 0 and not x["demand"] and not x["requests"], 30, since=t_end)
        down = watch.wait(lambda x: not _gpu_nodes(x), IDLE_TIMEOUT_S + 60 + 15, since=t_end)
        last = watch.close()
        lines = watch.lines()
    finally:
        if watch is not None and watch.proc.poll() is None:
            watch.proc.kill()
        cluster.stop()

    assert run.returncode == 0, (run.returncode, run.stdout[-3000:], run.stderr[-5000:])
    from kbatch.output.results import open_results

    df = open_results(cfg["output"]["path"]).df
    assert len(df) == ROWS and df["id"].is_unique and set(df["id"]) == {r["id"] for r in rows}
    assert (df["status"] == "ok").all(), df["status"].value_counts()
    done = json.load(open(tmp_path / "out" / "_job.json"))
    assert done["layout"]["autoscaler"]["node_types"]["gpu_node"]["max"] == 3, done["layout"]
    # near the tail, decoders the batches left could not use were stopped (their nodes free to go)
    replicas = done["driver"]["replicas"]["decoder"]
    assert replicas["started"] >= 3 and replicas["drained"] >= 1, replicas

    # every image was made on a GPU (the records say gpu:<id>), on autoscaled nodes, more than one of them
    assert df["decoder_worker"].str.contains("/gpu:").all(), df["decoder_worker"].unique()
    pids = {w.rsplit("pid:", 1)[1] for w in df["decoder_worker"]}
    gpu_nodes = set().union(*(_gpu_nodes(x) for x in lines))
    used = {last["pids"].get(p) for p in pids}
    assert used <= gpu_nodes and len(used) >= 2, (used, gpu_nodes)

    # nothing asked of the autoscaler once a job ends, normally or by SIGTERM; then no GPU node within the
    # idle timeout + 1 minute
    assert after_job is not None and after_job["requests"] == [] and after_job["demand"] == [], after_job
    assert busy is not None and code2 == 3, (busy, code2)  # interrupted: exit 3, committed shards kept
    assert cleared is not None, lines[-5:]
    assert down is not None and down["t"] - t_end <= IDLE_TIMEOUT_S + 60, lines[-5:]
    assert last["requests"] == [] and last["demand"] == [], last

    first_gpu = next(x["t"] for x in lines if _gpu_nodes(x))
    peak = max(len(_gpu_nodes(x)) for x in lines if x["t"] < job_s)
    peak_t = next(x["t"] for x in lines if len(_gpu_nodes(x)) == peak)
    print(f"\nautoscaling: job {job_s:.1f} s (spawn to exit, {ROWS} rows); first GPU node alive at "
          f"{first_gpu:.1f} s, {peak} GPU nodes at {peak_t:.1f} s; {len(used)} nodes made images; decoders "
          f"{replicas}; "
          f"SIGTERM job: exit {code2}, no actor or demand left {cleared['t'] - t_end:.1f} s after its exit; "
          f"0 GPU nodes {down['t'] - t_end:.1f} s after it (idle timeout {IDLE_TIMEOUT_S} s)")
