"""Issue "Many jobs, one cluster" on ``ray.cluster_utils.Cluster`` (fake GPUs) with the simulated models and
configs without ``resources:``: jobs share the cluster through its coordinator (kbatch/cluster/), a second
job queues instead of failing, a higher priority takes GPUs at batch boundaries and gives them back, a
SIGKILLed driver's share returns, and a killed coordinator costs no job. Every row of every job exactly once.

Each case runs in a subprocess: a Cluster cannot share a process with the suite's local Ray. No timing is
asserted: the sim stages sleep per image, so a job takes at least its work's time, and the waits are on
conditions (with generous limits)."""
import json
import subprocess
import sys
import textwrap

from cli_helpers import env

PRELUDE = textwrap.dedent("""
    import json, os, signal, subprocess, sys, threading, time
    import pandas as pd
    import ray
    from ray.cluster_utils import Cluster
    import kbatch

    base = json.loads(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 0})
    cluster.add_node(num_cpus=4, num_gpus=4)
    def config(name, **schedule):
        return {**base, "output": {**base["output"], "path": os.path.join(base["root"], name)},
                "schedule": schedule}
    def df(n, prefix):
        return pd.DataFrame({"id": [f"{prefix}{i:05d}" for i in range(n)], "prompt": [f"p{i}" for i in range(n)]})
    def start(name, n, resources=None, decoder_s=None, **schedule):  # a job in a daemon thread of this process
        cfg, box = config(name, **schedule), {}
        if resources:
            cfg["resources"] = resources
        if decoder_s:
            cfg["models"] = {**cfg["models"], "sim": {**cfg["models"]["sim"], "decoder_seconds_per_image": decoder_s}}
        def go():
            try:
                box["res"] = kbatch.render(df(n, name), cfg["output"]["path"],
                                           {k: v for k, v in cfg.items() if k != "root"})
            except BaseException as e:
                box["err"] = repr(e)
        t = threading.Thread(target=go, daemon=True)
        t.start()
        return t, box, cfg["output"]["path"]
    def job_file(path):
        try:
            return json.load(open(os.path.join(path, "_job.json")))
        except (OSError, ValueError):
            return {}
    def wait(cond, what, limit=150):
        t0 = time.monotonic()
        while not cond():
            assert time.monotonic() - t0 < limit, f"timed out waiting for {what}"
            time.sleep(0.2)
    def commits(path):
        d = os.path.join(path, "_commits")
        return len(os.listdir(d)) if os.path.isdir(d) else 0
    def coordinator_rows():
        from kbatch.cluster.coordinator import NAME, NAMESPACE
        try:
            return {r.run_id: r for r in ray.get(ray.get_actor(NAME, namespace=NAMESPACE).jobs.remote(), timeout=10)}
        except Exception:
            return {}
    def stack(t):  # where a stalled job's thread is
        import traceback
        frame = sys._current_frames().get(t.ident)
        return "".join(traceback.format_stack(frame)) if frame is not None else "?"
    def finished(job, limit=240):
        t, box, path = job
        t.join(limit)
        if t.is_alive() or "err" in box:
            print("STALLED " + stack(t) if t.is_alive() else box["err"], json.dumps(job_file(path))[-3000:], flush=True)
            os._exit(9)
        res = box["res"]
        d = res.df
        j = job_file(path)
        return {"exit": res.run.exit_code, "n": len(d), "unique": bool(d.id.is_unique),
                "ok": int((d.status == "ok").sum()), "schedule": j.get("schedule"), "error": j.get("error"),
                "replicas": (j.get("driver") or {}).get("replicas")}
""")


def base_config(tmp_path, prior_s=0.007, decoder_s=0.05) -> dict:
    """No ``resources:`` section (what a new user writes); sim stages at 1:7."""
    return {"root": str(tmp_path),
            "models": {"prior": "sim", "decoder": "sim",
                       "sim": {"prior_seconds_per_image": prior_s, "decoder_seconds_per_image": decoder_s}},
            "output": {"path": "", "rows_per_shard": 32, "gallery": False, "format": "parquet"},
            "defaults": {"height": 64, "width": 64}, "progress": "off"}


def _run(script: str, cfg: dict, timeout: int = 420) -> dict:
    p = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script), json.dumps(cfg)],
                       capture_output=True, text=True, env=env(), timeout=timeout)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, p.stdout[-3000:] + p.stderr[-6000:]
    return json.loads(line[len("RESULT"):])


def states(schedule: dict) -> list[str]:
    return [h["state"] for h in (schedule or {}).get("history", [])]


def test_queued_then_run_and_a_higher_priority_takes_gpus_and_gives_them_back(tmp_path):
    """4 fake GPUs. ``low`` (priority 0) holds them all; ``high`` (priority 1) arrives: ``low`` drains its
    replicas at batch boundaries down to nothing (QUEUED) and ``high`` runs on all 4; ``late`` (priority 0)
    arrives while ``high`` runs and is QUEUED (behind ``high``), instead of failing, although it waits longer
    than its ``placement_timeout``; when ``high`` ends, ``low`` grows back and ``late`` runs beside it.
    Every row of every job exactly once."""
    out = _run("""
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            cluster.wait_for_nodes()
            low = start("low", 800)
            wait(lambda: commits(low[2]) >= 2, "low's first commits")
            high = start("high", 700, priority=1, decoder_s=0.14)
            wait(lambda: commits(high[2]) >= 1, "high's first commit")
            late = start("late", 300, resources={"placement_timeout": 10})  # queued longer: never counted
            wait(lambda: (job_file(late[2]).get("schedule") or {}).get("state") == "QUEUED", "late queued")
            queued_view = job_file(late[2])["schedule"]
            # two more queued jobs while high runs: one with a queue_timeout, one cancelled (kbatch cancel)
            impatient = start("impatient", 100, queue_timeout=2)
            doomed = start("doomed", 100)
            wait(lambda: (job_file(doomed[2]).get("schedule") or {}).get("state") == "QUEUED", "doomed queued")
            from kbatch.cluster.coordinator import NAME, NAMESPACE
            ray.get(ray.get_actor(NAME, namespace=NAMESPACE).cancel.remote(job_file(doomed[2])["run_id"]))
            stopped = {}
            for name, j in (("impatient", impatient), ("doomed", doomed)):
                j[0].join(240)
                assert not j[0].is_alive(), stack(j[0])
                res = j[1].get("res")
                job = job_file(j[2])
                stopped[name] = {"exit": res.run.exit_code if res is not None else j[1].get("err"),
                                 "status": job.get("status"), "error": job.get("error")}
            h = finished(high)
            lo, la = finished(low), finished(late)
            print("RESULT" + json.dumps({"low": lo, "high": h, "late": la, "queued_view": queued_view,
                                         "stopped": stopped}))
        finally:
            ray.shutdown(); cluster.shutdown()
    """, base_config(tmp_path))
    for name, n in (("low", 800), ("high", 700), ("late", 300)):
        r = out[name]
        assert r["exit"] == 0 and r["n"] == n and r["unique"] and r["ok"] == n, (name, r)
    q = out["queued_view"]
    assert q["queue_position"] >= 1 and out["high"]["schedule"]["priority"] == 1, q
    assert len(q["ahead"]) >= 1, q  # high (holding the GPUs), then low (queued before it)
    assert states(out["high"]["schedule"])[0] == "RUNNING", out["high"]["schedule"]
    low = states(out["low"]["schedule"])
    assert low[0] == "RUNNING" and ("DRAINING" in low or "QUEUED" in low) and low[-1] == "RUNNING", low
    assert out["low"]["replicas"]["decoder"]["drained"] >= 1, out["low"]["replicas"]  # gave GPUs back
    imp, doomed = out["stopped"]["impatient"], out["stopped"]["doomed"]
    assert imp["exit"] == 3 and "waited queued for" in imp["error"] and "queue_timeout" in imp["error"], imp
    assert doomed["exit"] == 3 and doomed["status"] == "cancelled" and "kbatch cancel" in doomed["error"], doomed
    late = states(out["late"]["schedule"])
    assert "QUEUED" in late and late[-1] == "RUNNING", late
    # queued behind high's work (668 rows x 0.14 s / 3 decoders = 31 s when high's first shard committed,
    # less late's own start): longer than late's placement_timeout (10 s), which did not run while queued
    assert out["late"]["schedule"]["queued_seconds"] > 10, out["late"]["schedule"]


OTHER_DRIVER = textwrap.dedent("""
    import json, sys
    import pandas as pd
    import ray
    import kbatch
    ray.init(address=sys.argv[1], log_to_driver=False)
    cfg, n = json.loads(sys.argv[2]), int(sys.argv[3])
    frame = pd.DataFrame({"id": [f"k{i:05d}" for i in range(n)], "prompt": [f"p{i}" for i in range(n)]})
    kbatch.render(frame, cfg["output"]["path"], cfg)
""")


def test_a_killed_coordinator_costs_no_job_and_a_sigkilled_drivers_share_returns(tmp_path):
    """4 fake GPUs, two jobs of equal priority: ``k`` in a driver process of its own, ``m`` here; 2 GPUs
    each. The coordinator actor is killed: both jobs go on with their allotments and the next heartbeat's
    coordinator knows both again. Then ``k``'s driver is SIGKILLed: within its registration's ttl its 2 GPUs
    are ``m``'s, and ``m`` completes with every row exactly once."""
    out = _run("""
        from kbatch.cluster.coordinator import NAME, NAMESPACE
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            cluster.wait_for_nodes()
            kcfg = {k: v for k, v in config("k").items() if k != "root"}
            proc = subprocess.Popen([sys.executable, "-c", OTHER, cluster.address, json.dumps(kcfg), "6000"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            kpath = kcfg["output"]["path"]
            wait(lambda: commits(kpath) >= 1, "k's first commit")
            m = start("m", 4000)
            wait(lambda: job_file(m[2]).get("run_id") and job_file(kpath).get("run_id"), "both runs' _job.json")
            mid, kid = job_file(m[2])["run_id"], job_file(kpath)["run_id"]
            wait(lambda: {r: a.allotted for r, a in coordinator_rows().items()} == {mid: 2.0, kid: 2.0}, "2 GPUs each")
            before = ray.get(ray.get_actor(NAME, namespace=NAMESPACE).info.remote())["epoch"]
            ray.kill(ray.get_actor(NAME, namespace=NAMESPACE), no_restart=True)
            wait(lambda: set(coordinator_rows()) == {mid, kid}, "a new coordinator that knows both runs")
            after = ray.get(ray.get_actor(NAME, namespace=NAMESPACE).info.remote())["epoch"]
            alive_k = proc.poll() is None
            shared = {r: a.allotted for r, a in coordinator_rows().items()}
            proc.send_signal(signal.SIGKILL); proc.wait()
            wait(lambda: {r: a.allotted for r, a in coordinator_rows().items()} == {mid: 4.0}, "k's share back to m")
            res = finished(m)
            print("RESULT" + json.dumps({"m": res, "new_coordinator": after != before, "alive_k": alive_k,
                                         "shared": shared, "mid": mid, "kid": kid}))
        finally:
            ray.shutdown(); cluster.shutdown()
    """.replace("OTHER,", repr(OTHER_DRIVER) + ","), base_config(tmp_path, prior_s=0.003, decoder_s=0.02))
    m = out["m"]
    assert m["exit"] == 0 and m["n"] == 4000 and m["unique"] and m["ok"] == 4000, m
    assert out["new_coordinator"] and out["alive_k"], out  # k lived through the coordinator's death
    assert out["shared"] == {out["mid"]: 2.0, out["kid"]: 2.0}, out  # and kept its allotment
    assert m["schedule"]["coordinators"] >= 2, m["schedule"]  # m registered with the new coordinator too
    assert m["replicas"]["decoder"]["started"] >= 2, m["replicas"]  # it grew onto k's GPUs
