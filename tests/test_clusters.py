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
    def render_in_thread(frame):  # a daemon thread: a stalled run cannot keep this process alive
        box = {}
        def go():
            try:
                box["res"] = kbatch.render(frame, cfg["output"]["path"], cfg)
            except BaseException as e:
                box["err"] = repr(e)
        t = threading.Thread(target=go, daemon=True)
        t.start()
        return t, box
    def wait_commits(t, n, limit=120):
        commits = os.path.join(cfg["output"]["path"], "_commits")
        t0 = time.monotonic()
        while not (os.path.isdir(commits) and len(os.listdir(commits)) >= n):
            assert t.is_alive() and time.monotonic() - t0 < limit, f"no {n} commits ({time.monotonic() - t0:.0f} s)"
            time.sleep(0.1)
    def finished(t, box, limit):
        t.join(limit)
        if t.is_alive() or "err" in box:
            try:
                job = open(os.path.join(cfg["output"]["path"], "_job.json")).read()
            except OSError as e:
                job = repr(e)
            print("STALLED" if t.is_alive() else box["err"], job[-3000:], flush=True)
            os._exit(9)
        return box["res"]
    def report(res, **extra):
        d = res.df
        print("RESULT" + json.dumps({"exit": res.run.exit_code, "complete": res.run.complete, "n": len(d),
                                     "unique": bool(d.id.is_unique), "ok": int((d.status == "ok").sum()),
                                     "decoders": sorted(set(d.decoder_worker)), **extra}))
""")


def _run(script: str, cfg: dict, timeout: int = 400, head_gpus: int = 1, failures_to_dead: int = 4) -> dict:
    """``failures_to_dead``: missed 0.5 s health checks before Ray declares a node dead."""
    prelude = (PRELUDE.replace('"num_gpus": 1', f'"num_gpus": {head_gpus}')
               .replace('"health_check_failure_threshold": 4', f'"health_check_failure_threshold": {failures_to_dead}'))
    p = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script), json.dumps(cfg)],
                       capture_output=True, text=True, env=env(), timeout=timeout)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, p.stdout[-3000:] + p.stderr[-5000:]
    return json.loads(line[len("RESULT"):])


def test_node_killed_mid_run_and_a_new_node_joins(tmp_path):
    """replicas: auto. The prior and a decoder run on a 2-GPU worker node (the head has no GPU); mid-run it
    is killed outright (no drain) and another 2-GPU node joins before Ray declares the first dead (6 s):
    every row lands exactly once, nothing is charged as a failure, and the new node renders.

    While the dead node still counts, the decoders' auto target is 3 and they take both new GPUs; the new
    prior then has nowhere to go until the decoder pool drains back to its target (kbatch.run.stage_pool) or makes
    room (kbatch.run.room_policy). Before, the run waited for placement_timeout and exited 3 (a CI run hung here)."""
    cfg = sim_config(tmp_path / "o", models={"sim": {"decoder_seconds_per_image": 0.01}},
                     resources={"device": "cpu", "prior": {"gpus": 1}, "decoder": {"replicas": "auto", "gpus": 1,
                                "batch_size": 8}, "prior_ahead": 4, "placement_timeout": 90},
                     output={"rows_per_shard": 16}, retries={"max_attempts": 1})
    out = _run("""
        w1 = cluster.add_node(num_cpus=2, num_gpus=2)
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            cluster.wait_for_nodes()
            t, box = render_in_thread(df(400))
            wait_commits(t, 3)
            cluster.remove_node(w1, allow_graceful=False)
            w2 = cluster.add_node(num_cpus=2, num_gpus=2)
            res = finished(t, box, 240)
            job = json.load(open(os.path.join(cfg["output"]["path"], "_job.json")))
            report(res, w1=w1.node_id[:8], w2=w2.node_id[:8], failed=res.run.rows_failed,
                   reasons=res.run.failed_by_reason, replicas=job["driver"]["replicas"])
        finally:
            ray.shutdown(); cluster.shutdown()
    """, cfg, timeout=360, head_gpus=0, failures_to_dead=12)
    assert out["exit"] == 0 and out["complete"], out
    assert out["n"] == 400 and out["unique"] and out["ok"] == 400 and out["failed"] == 0, out
    nodes = {d.split("/")[0].split(":")[1] for d in out["decoders"]}
    assert out["w1"] in nodes and out["w2"] in nodes, (nodes, out)


def test_more_gpus_asked_than_the_cluster_has_and_a_crashed_prior_gets_room(tmp_path):
    """One node, 2 GPUs; the config asks 3 (a prior and 2 decoders): the prior and one decoder run, the second
    decoder waits for a GPU without blocking anything. Mid-run the prior's process is killed; Ray gives its
    GPU to the waiting decoder, and the new prior has nowhere to go. kbatch drains a decoder to make room
    (kbatch.run.room_policy) and the job completes (it used to wait for placement_timeout and exit 3)."""
    cfg = sim_config(tmp_path / "o", models={"sim": {"decoder_seconds_per_image": 0.01}},
                     resources={"device": "cpu", "placement_timeout": 60, "prior": {"gpus": 1},
                                "decoder": {"replicas": 2, "gpus": 1, "batch_size": 8}, "prior_ahead": 4},
                     output={"rows_per_shard": 16})
    out = _run("""
        import signal
        from ray.util.state import list_actors
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            t, box = render_in_thread(df(200))
            wait_commits(t, 3)
            alive = list_actors(filters=[("class_name", "=", "PriorWorker"), ("state", "=", "ALIVE")])
            os.kill(alive[0].pid, signal.SIGKILL)
            res = finished(t, box, 240)
            job = json.load(open(os.path.join(cfg["output"]["path"], "_job.json")))
            report(res, replicas=job["driver"]["replicas"])
        finally:
            ray.shutdown(); cluster.shutdown()
    """, cfg, head_gpus=2)
    assert out["exit"] == 0 and out["complete"] and out["n"] == 200 and out["ok"] == 200 and out["unique"], out
    assert out["replicas"]["prior"]["started"] == 2, out
    assert out["replicas"]["decoder"]["drained"] >= 1, out
