"""Issue "Real clusters" on ``ray.cluster_utils.Cluster`` (several raylets on this machine, fake GPUs) with
the simulated models: fewer GPUs than the config asks for, a node killed mid-run and another joining.

Each case runs in a subprocess: a Cluster cannot share a process with the suite's local Ray.
"""
import json
import subprocess
import sys
import textwrap

from cli_helpers import env
from test_scale import sim_config

PRELUDE = textwrap.dedent("""
    import json, os, sys, threading, time
    import pandas as pd
    import ray
    from ray.cluster_utils import Cluster
    import kbatch

    cfg = json.loads(sys.argv[1])
    # fast node-death detection (Ray's default health check takes ~15 s to declare a node dead)
    system = {"health_check_period_ms": 500, "health_check_failure_threshold": 4, "health_check_timeout_ms": 500}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "_system_config": system})
    def df(n):
        return pd.DataFrame({"id": [f"r{i:05d}" for i in range(n)], "prompt": [f"p{i}" for i in range(n)]})
    def report(res, **extra):
        d = res.df
        print("RESULT" + json.dumps({"exit": res.run.exit_code, "complete": res.run.complete, "n": len(d),
                                     "unique": bool(d.id.is_unique), "ok": int((d.status == "ok").sum()),
                                     "decoders": sorted(set(d.decoder_worker)), **extra}))
""")


def _run(script: str, cfg: dict, timeout: int = 400) -> dict:
    p = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script), json.dumps(cfg)],
                       capture_output=True, text=True, env=env(), timeout=timeout)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, p.stdout[-3000:] + p.stderr[-5000:]
    return json.loads(line[len("RESULT"):])


def test_more_gpus_asked_than_the_cluster_has_completes_on_those_it_has(tmp_path):
    """Head with 1 GPU + a node with 1 GPU; the config asks prior 1 GPU + 3 decoders x 1 GPU: one decoder
    runs, the two that cannot be placed wait without blocking anything, and the job completes."""
    cfg = sim_config(tmp_path / "o", resources={"device": "cpu", "placement_timeout": 60,
                                                "prior": {"gpus": 1}, "decoder": {"replicas": 3, "gpus": 1}})
    out = _run("""
        cluster.add_node(num_cpus=2, num_gpus=1)
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            cluster.wait_for_nodes()
            res = kbatch.render(df(300), cfg["output"]["path"], cfg)
            job = json.load(open(os.path.join(cfg["output"]["path"], "_job.json")))
            report(res, layout=job["layout"])
        finally:
            ray.shutdown(); cluster.shutdown()
    """, cfg)
    assert out["exit"] == 0 and out["complete"] and out["n"] == 300 and out["unique"]
    assert len(out["decoders"]) == 1 and "gpu:" in out["decoders"][0]


def test_node_killed_mid_run_and_a_new_node_joins(tmp_path):
    """replicas: auto. Decoders run on a 2-GPU worker node; mid-run it is killed outright (no drain) and
    another 2-GPU node joins: every row lands exactly once, nothing is charged as a failure, and the new
    node renders."""
    cfg = sim_config(tmp_path / "o", models={"sim": {"decoder_seconds_per_image": 0.03}},
                     resources={"device": "cpu", "prior": {"gpus": 1}, "decoder": {"replicas": "auto", "gpus": 1,
                                "batch_size": 8}, "prior_ahead": 4},
                     output={"rows_per_shard": 16}, retries={"max_attempts": 1})
    out = _run("""
        w1 = cluster.add_node(num_cpus=2, num_gpus=2)
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            cluster.wait_for_nodes()
            box = {}
            t = threading.Thread(target=lambda: box.update(res=kbatch.render(df(600), cfg["output"]["path"], cfg)))
            t.start()
            commits = os.path.join(cfg["output"]["path"], "_commits")
            while not (os.path.isdir(commits) and len(os.listdir(commits)) >= 3):
                time.sleep(0.1)
            cluster.remove_node(w1, allow_graceful=False)
            time.sleep(1)
            w2 = cluster.add_node(num_cpus=2, num_gpus=2)
            t.join(300)
            res = box["res"]
            job = json.load(open(os.path.join(cfg["output"]["path"], "_job.json")))
            report(res, w1=w1.node_id[:8], w2=w2.node_id[:8], failed=res.run.rows_failed,
                   reasons=res.run.failed_by_reason)
        finally:
            ray.shutdown(); cluster.shutdown()
    """, cfg, timeout=500)
    assert out["exit"] == 0 and out["complete"], out
    assert out["n"] == 600 and out["unique"] and out["ok"] == 600 and out["failed"] == 0, out
    nodes = {d.split("/")[0].split(":")[1] for d in out["decoders"]}
    assert out["w1"] in nodes and out["w2"] in nodes, (nodes, out)
