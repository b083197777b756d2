"""``python bench/many_jobs.py``: many kbatch jobs on one cluster (docs/clusters.md, "Many jobs on one cluster").

``ray.cluster_utils.Cluster`` on this machine, as ``bench/scale.py cluster`` builds it: a head without GPUs and
``--nodes`` x ``--gpus-per-node`` fake GPUs (default 4 x 4), the simulated models at the 1:7 prior:decoder
per-image cost (0.032 / 0.224 s/img, times ``--slow``), the default config (no ``resources:``; parquet output,
64 rows per shard, no gallery). Every job is a separate ``kbatch run`` process (its own driver, as separate
``ray job submit`` jobs or notebooks are) connected to that cluster by ``RAY_ADDRESS``. This process watches
from outside, once a second: the GPU-stage actors (PriorWorker, DecoderWorker, StagesWorker; 1 GPU each in
this layout) each job's driver owns, from Ray's actor and job tables (what each job really holds, not what it
says), the GPUs Ray reports in use, and the coordinator's ``jobs()`` (allotted, state) when one runs.

Scenarios (``--only a b c d``; rows times ``--scale``):

* **a** two equal jobs (4,000 rows), the second 20 s after the first: the fraction of the ideal rate
  16 / (prior_s + decoder_s) the union keeps: ``whole`` = the GPU-seconds of work / (last exit - first spawn),
  ``steady`` = the union's img/s between the commits reaching 10% and 90% of all images; and the seconds from
  the second job's start until each holds half the GPUs (8 +- 1). Target >= 0.9, half within 60 s.
* **b** a priority-0 job of 12,000 rows; once it holds every GPU, a priority-1 job of 300 rows: seconds from
  the urgent job's start to its first image (its first committed shard: shards of 16 rows there, so an upper
  bound by one shard), both exit codes, every row of both exactly once. Target <= 60 s.
* **c** three equal jobs (4,000 rows) started 5 s apart: GPUs each holds in steady state (from 30 s after all
  three first hold a started GPU actor, and at least 45 s after the third start, until 10 s before the first
  one ends). Target 16/3 +- 1.
* **d** two equal jobs (4,000 rows); once both hold 8 GPUs, the second's driver is SIGKILLed: seconds until the
  first holds every GPU again (and until it is allotted them), against the registration ttl (15 s). The first
  job is stopped (SIGTERM) once that is measured.

Every scenario checks each completed output: every manifest row exactly once, all ok. Prints one JSON line per
scenario and a markdown table (copy it into RESULTS.md with the date and machine printed).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from _common import ROOT, loadavg, machine, ray_env, versions, write_yaml
from scale_cluster import steady

PRIOR_S, DECODER_S = 0.032, 0.224  # s/img at --slow 1: the 1:7 cost of Kandinsky 2.1 on an H200 (bench/scale_cluster.py)
GPU_STAGES = ("PriorWorker", "DecoderWorker", "StagesWorker")


# ====================================================================================== inside the cluster
def _manifest(path: str, n: int, prefix: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"id": [f"{prefix}-{i:07d}" for i in range(n)],
                             "prompt": [f"a picture of thing number {i}" for i in range(n)]}), path)
    return path


def _config(manifest: str, out: str, prior_s: float, decoder_s: float, priority: int, rows_per_shard: int) -> dict:
    """The default config (no ``resources:``), as bench/scale_cluster.py, and the job's priority."""
    cfg = {"models": {"prior": "sim", "decoder": "sim",
                      "sim": {"prior_seconds_per_image": prior_s, "decoder_seconds_per_image": decoder_s}},
           "manifest": manifest, "progress": "log", "defaults": {"height": 64, "width": 64},
           "output": {"path": out, "format": "parquet", "rows_per_shard": rows_per_shard, "gallery": False}}
    if priority:
        cfg["schedule"] = {"priority": priority}
    return cfg


class Job:
    def __init__(self, name: str, rows: int, work: str, a: dict, priority: int = 0, rows_per_shard: int = 64):
        self.name, self.rows, self.priority = name, rows, priority
        self.out = os.path.join(work, f"out-{name}")
        shutil.rmtree(self.out, ignore_errors=True)
        manifest = _manifest(os.path.join(work, f"manifest-{name}", "m.parquet"), rows, name)
        self.config = write_yaml(os.path.join(work, f"{name}.yaml"),
                                 _config(manifest, self.out, a["prior_s"], a["decoder_s"], priority, rows_per_shard))
        self.log = os.path.join(work, f"log-{name}.txt")
        self.proc = None
        self.spawned = self.ended = None
        self.killed = False

    def start(self, env: dict, t0: float, driver: str = "cli"):
        self.spawned = time.time() - t0
        if driver == "cli":  # `kbatch run CONFIG` with RAY_ADDRESS, as a user (or `ray job submit`) runs it
            cmd = [sys.executable, "-m", "kbatch.cli", "run", self.config]
        else:  # a Python driver attached to the cluster first (a notebook's ray.init(address)), then the same run
            cmd = [sys.executable, "-c", "import os, sys, ray; ray.init(address=os.environ['RAY_ADDRESS']); "
                   f"from kbatch.cli import main; sys.exit(main(['run', {self.config!r}]))"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=os.path.dirname(self.log))

    def poll(self, t0: float):
        if self.proc is not None and self.ended is None and self.proc.poll() is not None:
            self.ended = time.time() - t0
        return self.ended is not None

    def commits(self, t0: float) -> list[tuple[float, int]]:
        out = []
        for f in glob.glob(os.path.join(self.out, "_commits", "*.json")):
            try:
                c = json.load(open(f))
            except (OSError, ValueError):
                continue
            if not c.get("aborted"):
                out.append((c["time"] - t0, int(c.get("images") or 0)))
        return sorted(out)

    def check(self) -> dict:
        """Every manifest row exactly once, all ok (read from the output's records)."""
        from kbatch.output.results import open_results

        try:
            df = open_results(self.out).df
        except Exception as e:  # noqa: BLE001 - no output at all
            return {"rows": 0, "error": f"{type(e).__name__}: {e}"}
        return {"rows": int(len(df)), "unique": bool(df.id.is_unique), "ok": int((df.status == "ok").sum()),
                "once": bool(df.id.is_unique and len(df) == self.rows and (df.status == "ok").all())}


class Watcher:
    """Once a second: GPU-stage actors alive per job (Ray's actor and job tables), GPUs in use, and the
    coordinator's rows when it runs."""

    def __init__(self, ray, jobs: list[Job], t0: float):
        from ray._private import state

        self.ray, self.state, self.jobs, self.t0 = ray, state, jobs, t0
        self.samples: list[dict] = []
        self.coordinator = None

    def _coordinator_rows(self) -> dict:
        ray = self.ray
        if self.coordinator is None:
            try:
                self.coordinator = ray.get_actor("kbatch-coordinator", namespace="kbatch")
            except ValueError:
                return {}
        try:
            rows = ray.get(self.coordinator.jobs.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - restarting, or gone: ask again next time
            self.coordinator = None
            return {}
        by_out = {j.out: j.name for j in self.jobs}
        out = {}
        for r in rows:
            r = r if isinstance(r, dict) else r.to_dict()
            name = by_out.get(r.get("output")) or by_out.get(str(r.get("output")).rstrip("/"))
            if name:
                out[name] = {"allotted": r.get("allotted"), "state": r.get("state"), "said_held": r.get("held"),
                             "position": r.get("queue_position")}
        return out

    def sample(self) -> dict:
        pid_job = {}
        for j in self.state.state.job_table():
            if not j.get("IsDead"):
                pid_job[j["DriverPid"]] = j["JobID"]
        job_name = {pid_job.get(j.proc.pid): j.name for j in self.jobs if j.proc is not None}
        held = {j.name: 0 for j in self.jobs}
        for a in self.state.actors().values():
            if a.get("State") == "ALIVE" and a.get("ActorClassName") in GPU_STAGES:
                name = job_name.get(a.get("JobID"))
                if name:
                    held[name] += 1
        total = self.ray.cluster_resources().get("GPU", 0.0)
        used = total - self.ray.available_resources().get("GPU", 0.0)
        s = {"t": round(time.time() - self.t0, 1), "held": held, "gpus_used": used,
             "coordinator": self._coordinator_rows()}
        self.samples.append(s)
        return s


def _first(samples, cond, after: float = 0.0):
    return next((s["t"] for s in samples if s["t"] >= after and cond(s)), None)


def scenario(a: dict) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    sys.path.insert(0, ROOT)
    work, kind, scale = a["work"], a["scenario"], a["scale"]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    for _ in range(a["nodes"]):
        cluster.add_node(num_cpus=a["cpus_per_node"], num_gpus=a["gpus_per_node"])
    gpus = a["nodes"] * a["gpus_per_node"]
    env = dict(os.environ, RAY_ADDRESS=cluster.address)
    n = lambda rows: max(16, int(round(rows * scale)))  # noqa: E731
    if kind == "a":
        jobs = [Job("a1", n(4000), work, a), Job("a2", n(4000), work, a)]
    elif kind == "b":
        jobs = [Job("long", n(12000), work, a), Job("urgent", 300, work, a, priority=1, rows_per_shard=16)]
    elif kind == "c":
        jobs = [Job(f"c{k}", n(4000), work, a) for k in (1, 2, 3)]
    else:
        jobs = [Job("d1", n(4000), work, a), Job("d2", n(4000), work, a)]
    half = gpus / 2
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        t0 = time.time()
        w = Watcher(ray, jobs, t0)
        jobs[0].start(env, t0, a["driver"])
        killed_at = stop_at = None
        deadline = t0 + a["timeout"]
        while time.time() < deadline:
            s = w.sample()
            now = s["t"]
            h = s["held"]
            if kind == "a" and jobs[1].proc is None and now >= 20:
                jobs[1].start(env, t0, a["driver"])
            elif kind == "b" and jobs[1].proc is None and (h["long"] >= gpus or now >= 120):
                jobs[1].start(env, t0, a["driver"])  # the long job holds every GPU (or 2 minutes passed)
            elif kind == "c":
                for k, j in enumerate(jobs):
                    if j.proc is None and now >= 5 * k:
                        j.start(env, t0, a["driver"])
            elif kind == "d":
                if jobs[1].proc is None and now >= 20:
                    jobs[1].start(env, t0, a["driver"])
                both = jobs[1].spawned is not None and abs(h["d1"] - half) <= 1 and abs(h["d2"] - half) <= 1
                if killed_at is None and (both and now - jobs[1].spawned >= 20 or
                                          jobs[1].spawned is not None and now - jobs[1].spawned >= 150):
                    os.kill(jobs[1].proc.pid, signal.SIGKILL)
                    jobs[1].killed, killed_at = True, now
                if killed_at is not None and stop_at is None and (h["d1"] >= gpus or now - killed_at >= 90):
                    stop_at = now + 10  # measured: let it run 10 s more, then stop it
                if stop_at is not None and now >= stop_at and jobs[0].ended is None and jobs[0].proc.poll() is None:
                    jobs[0].proc.send_signal(signal.SIGTERM)
                    stop_at = float("inf")
            ended = [j.poll(t0) for j in jobs if j.proc is not None]  # every job's end time, not the first's
            if all(ended) and all(j.proc is not None for j in jobs):
                break
            time.sleep(max(0.0, 1.0 - (time.time() - t0 - now)))
        for j in jobs:
            if j.proc is not None and j.proc.poll() is None:
                j.proc.kill()
                j.proc.wait()
                j.poll(t0)
        res = {"scenario": kind, "gpus": gpus, "samples": w.samples, "killed_at": killed_at, "jobs": {}}
        for j in jobs:
            res["jobs"][j.name] = {"rows": j.rows, "priority": j.priority, "spawned": j.spawned, "ended": j.ended,
                                   "exit": j.proc.returncode if j.proc else None, "killed": j.killed,
                                   "commits": j.commits(t0),
                                   "check": None if j.killed or kind == "d" else j.check(),
                                   "log_tail": open(j.log).read()[-1500:] if j.proc and j.proc.returncode else ""}
        return res
    finally:
        ray.shutdown()
        cluster.shutdown()


# ============================================================================================= reading
def _steady(commits, lo=0.1, hi=0.9) -> float:
    """img/s between the commits reaching ``lo`` and ``hi`` of the images (bench/scale_cluster.py's rule)."""
    return steady(commits, lo, hi)[0] if commits else float("nan")


def summarize(res: dict, prior_s: float, decoder_s: float, ttl: float) -> dict:
    """``held``: a job's GPU-stage actors ALIVE (started); ``gpus_used``: GPUs Ray has granted, with those of
    actors still starting (on a loaded 2-core machine 16 actor processes take tens of seconds to start)."""
    gpus, kind, jobs, samples = res["gpus"], res["scenario"], res["jobs"], res["samples"]
    ideal = gpus / (prior_s + decoder_s)
    out = {"scenario": kind, "ideal_img_s": round(ideal, 2),
           "exits": {k: v["exit"] for k, v in jobs.items()},
           "once": {k: (v["check"] or {}).get("once") for k, v in jobs.items()},
           "seconds": {k: [v["spawned"], v["ended"]] for k, v in jobs.items()}}
    coordinated = any(s["coordinator"] for s in samples)
    out["coordinator"] = coordinated
    names = list(jobs)
    if kind == "a":
        images = sum(k for v in jobs.values() for _, k in v["commits"])
        first = min(v["spawned"] for v in jobs.values())
        last = max(v["ended"] or 0 for v in jobs.values())
        union = sorted(c for v in jobs.values() for c in v["commits"])
        out["whole_fraction"] = round(images / ideal / (last - first), 3)
        # the same from the union's first committed shard to its last: without the start (Ray connect, plan,
        # actor processes: a minute on a loaded 2-core machine) and the finish
        out["first_to_last_commit_fraction"] = round(images / ideal / (union[-1][0] - union[0][0]), 3)
        out["steady_fraction"] = round(_steady(union) / ideal, 3)
        second = jobs[names[1]]["spawned"]
        t = _first(samples, lambda s: all(abs(s["held"][n] - gpus / 2) <= 1 for n in names), after=second)
        out["half_after_s"] = None if t is None else round(t - second, 1)
        at60 = [s for s in samples if s["t"] >= second + 60][:1]
        out["held_60s_after_second"] = at60[0]["held"] if at60 else None
    elif kind == "b":
        u, l = jobs["urgent"], jobs["long"]
        out["urgent_started_s"] = u["spawned"]
        out["long_held_at_urgent_start"] = next((s["held"]["long"] for s in samples if s["t"] >= u["spawned"]), None)
        out["urgent_first_image_s"] = round(u["commits"][0][0] - u["spawned"], 1) if u["commits"] else None
        out["urgent_done_s"] = round(u["ended"] - u["spawned"], 1) if u["ended"] is not None else None
        out["urgent_max_gpus"] = max((s["held"]["urgent"] for s in samples), default=0)
        for k, n in (("urgent_first_gpu_s", 1), ("urgent_8_gpus_s", gpus // 2), ("urgent_all_gpus_s", gpus)):
            t = _first(samples, lambda s, n=n: s["held"]["urgent"] >= n, after=u["spawned"])
            out[k] = None if t is None else round(t - u["spawned"], 1)
        out["urgent_last_commit_s"] = round(u["commits"][-1][0] - u["spawned"], 1) if u["commits"] else None
        out["long_end_s"] = l["ended"]
    elif kind == "c":
        third = max(v["spawned"] for v in jobs.values())
        first_end = min(v["ended"] or 1e9 for v in jobs.values())
        # steady: from 30 s after every job first holds a started GPU actor (and 45 s after the third start)
        all_up = _first(samples, lambda s: all(s["held"][n] > 0 for n in names), after=third) or third
        start = max(third + 45, all_up + 30)
        window = [s for s in samples if start <= s["t"] <= first_end - 10]
        out["window_s"] = [round(start, 1), round(first_end - 10, 1)]
        fair = gpus / len(jobs)
        per = {}
        for n in names:
            vals = sorted(s["held"][n] for s in window)
            per[n] = {"median": vals[len(vals) // 2] if vals else None, "min": min(vals, default=None),
                      "max": max(vals, default=None),
                      "within": round(sum(abs(v - fair) <= 1 for v in vals) / len(vals), 3) if vals else None}
        out["held"] = per
        out["fair_share"] = round(fair, 2)
    else:
        d1, killed = names[0], res["killed_at"]
        out["killed_at_s"] = killed
        if killed is not None:
            before = [s for s in samples if s["t"] <= killed][-1:]  # the sample the kill was decided on
            out["held_before_kill"] = before[0]["held"] if before else None
            t_held = _first(samples, lambda s: s["held"][d1] >= gpus, after=killed)
            t_all = _first(samples, lambda s: (s["coordinator"].get(d1) or {}).get("allotted") == gpus, after=killed)
            t_free = _first(samples, lambda s: s["gpus_used"] <= s["held"][d1], after=killed)
            out["gpus_free_in_ray_s"] = None if t_free is None else round(t_free - killed, 1)
            out["allotted_all_s"] = None if t_all is None else round(t_all - killed, 1)
            out["held_all_s"] = None if t_held is None else round(t_held - killed, 1)
            out["ttl_s"] = ttl
    return out


# ================================================================================================ main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list("abcd"), default=list("abcd"))
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--gpus-per-node", type=int, default=4)
    ap.add_argument("--cpus-per-node", type=int, default=4)
    ap.add_argument("--slow", type=float, default=2.0,
                    help="multiplies the 1:7 per-image seconds (0.032 / 0.224): a 2-core machine running 16 actors")
    ap.add_argument("--scale", type=float, default=0.5, help="multiplies every job's rows (not the urgent 300)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one scenario may take")
    ap.add_argument("--driver", choices=["cli", "python"], default="cli",
                    help="cli: each job is `kbatch run CONFIG` with RAY_ADDRESS; python: a process that calls "
                         "ray.init(address) first (as a notebook attached to the cluster), then the same run")
    ap.add_argument("--work", default="/tmp/kbatch-many-jobs")
    ap.add_argument("--scenario", help=argparse.SUPPRESS)  # inside the scenario's own process
    a = ap.parse_args()
    prior_s, decoder_s = PRIOR_S * a.slow, DECODER_S * a.slow
    if a.scenario:
        args = {"work": a.work, "scenario": a.scenario, "scale": a.scale, "nodes": a.nodes,
                "gpus_per_node": a.gpus_per_node, "cpus_per_node": a.cpus_per_node, "prior_s": prior_s,
                "decoder_s": decoder_s, "timeout": a.timeout, "driver": a.driver}
        print("RESULT" + json.dumps(scenario(args)), flush=True)
        return
    try:
        from kbatch.cluster.state import JobDemand

        ttl = JobDemand.__dataclass_fields__["ttl_s"].default
    except (ImportError, KeyError):
        ttl = None
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}, {json.dumps(versions())}, "
          f"git {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()}")
    print(f"# {a.nodes} x {a.gpus_per_node} fake GPUs, head without GPUs; prior/decoder {prior_s:g}/{decoder_s:g} s/img "
          f"(1:7 x {a.slow:g}); rows x {a.scale:g}; drivers: {a.driver}", flush=True)
    results = []
    for kind in a.only:
        work = os.path.join(a.work, kind)
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        tmp = tempfile.mkdtemp(prefix="kbm-", dir="/tmp")
        load = loadavg()
        cmd = [sys.executable, os.path.abspath(__file__), "--scenario", kind, "--work", work, "--scale", str(a.scale),
               "--slow", str(a.slow), "--nodes", str(a.nodes), "--gpus-per-node", str(a.gpus_per_node),
               "--cpus-per-node", str(a.cpus_per_node), "--timeout", str(a.timeout), "--driver", a.driver]
        # a loaded 2-core machine starts 5 raylets slowly: more time than Ray's default before a node counts as failed
        p = subprocess.run(cmd, env=ray_env(tmp, extra={"RAY_raylet_start_wait_time_s": "120"}), capture_output=True,
                           text=True)
        shutil.rmtree(tmp, ignore_errors=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT")), None)
        if not line:
            print(p.stdout[-3000:], p.stderr[-5000:])
            print(f"scenario {kind} failed", flush=True)
            continue
        res = json.loads(line[len("RESULT"):])
        with open(os.path.join(work, "samples.json"), "w") as fh:
            json.dump(res, fh)
        r = summarize(res, prior_s, decoder_s, ttl)
        r.update(load_before=round(load, 2), load_after=round(loadavg(), 2))
        for name, j in res["jobs"].items():
            if j["log_tail"] and not j["killed"]:
                r.setdefault("log_tails", {})[name] = j["log_tail"][-600:]
        print(json.dumps(r), flush=True)
        results.append(r)
    print("\n| scenario | result | target | exits | every row once | coordinator |")
    print("|---|---|---|---|---|---|")
    for r in results:
        k = r["scenario"]
        if k == "a":
            res = (f"union {r['whole_fraction']} of ideal (first spawn to last exit), "
                   f"{r['first_to_last_commit_fraction']} (first to last commit), {r['steady_fraction']} (10-90%); "
                   f"each holds 8 +- 1 GPUs {r['half_after_s']} s after the second's start")
            target = ">= 0.9; half within 60 s"
        elif k == "b":
            res = (f"urgent job's first image {r['urgent_first_image_s']} s after its start (long job held "
                   f"{r['long_held_at_urgent_start']} GPUs then; urgent holds 1 / 8 / 16 GPUs after "
                   f"{r['urgent_first_gpu_s']} / {r['urgent_8_gpus_s']} / {r['urgent_all_gpus_s']} s); its last "
                   f"image after {r['urgent_last_commit_s']} s; long job ends at {r['long_end_s']:.0f} s")
            target = "<= 60 s; both complete"
        elif k == "c":
            res = "; ".join(f"{n}: median {v['median']} (min {v['min']}, max {v['max']}; {v['within']} of samples "
                            f"within +-1)" for n, v in r["held"].items()) + f" over {r['window_s']} s"
            target = f"{r['fair_share']} +- 1"
        else:
            res = (f"killed at {r.get('killed_at_s')} s holding {r.get('held_before_kill')}; GPUs free in Ray after "
                   f"{r.get('gpus_free_in_ray_s')} s, survivor allotted all after {r.get('allotted_all_s')} s, "
                   f"holds all after {r.get('held_all_s')} s")
            target = f"within the ttl ({r.get('ttl_s')} s)"
        print(f"| {k} | {res} | {target} | {r['exits']} | {r['once']} | {r['coordinator']} |")


if __name__ == "__main__":
    main()
