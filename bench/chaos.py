"""``python bench/chaos.py``: chaos runs. Every row exactly once on object storage that misbehaves, with the
driver, the writers and the nodes killed or frozen at random points, resumed by rerunning the same command.

One *episode* = one output of ``--rows`` rows (simulated stages, ``models.*: sim``, small costs) on S3 (moto)
or GCS (an emulator, ``--storage gcs``) behind ``tests/fault_front.py`` (per-request latency, 503s, connection
resets, answers lost after the write landed), rendered by ``kbatch run CONFIG`` runs on a
``ray.cluster_utils.Cluster`` with fake-GPU nodes. While a run renders, at random commit counts, the harness
injects ``--faults`` process faults, drawn from:

- ``kill_driver``: SIGKILL of the driver (its job's actors die with it); the next run resumes;
- ``freeze_driver``: SIGSTOP of the driver until its lease is quiet for the lease ttl; the next run takes the
  lease over; the frozen one is thawed (SIGCONT) at a random moment after the takeover and must exit 3
  writing nothing more;
- ``freeze_job``: the same with the run's writer processes frozen too, wherever they are in a shard's write
  (between their lease check and their commit, say), and thawed with the driver after the takeover: their
  late commits must find their shards aborted;
- ``pause_driver``: SIGSTOP for a fraction of the ttl, then SIGCONT: the run carries on;
- ``kill_writer``: SIGKILL of one writer actor's process (the driver resends its shards);
- ``remove_node``: ``Cluster.remove_node`` of a fake-GPU node (its actors and objects die), a replacement added;
- ``outage``: the store unreachable (every request reset) for 0.5-2 lease ttls, then back as it was.

A run that ends incomplete is rerun (the same command) until one completes. Then the episode checks, twice,
that every manifest row has exactly one ok record: through kbatch's own readers (``open_results``,
``kbatch.run.status.summarize``) and through a raw listing of the commit records (``_commits/*.json``) and
the metadata files they name (``meta/*.parquet``, read with pyarrow), with the store's faults off.
``duplicates`` (ok records of an id beyond the first) and ``missing`` (ids without an ok record) must be 0.

The functions here are also used by ``tests/test_chaos.py`` (a small version in the suite). Results:
bench/RESULTS.md; how to read them: bench/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (os.path.join(ROOT, "tests"), HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

KINDS = ("kill_driver", "freeze_driver", "freeze_job", "pause_driver", "kill_writer", "remove_node", "outage")
KEY_ID, SECRET = "AKIACHAOSKEY0000", "chaos-secret-0123456789"


@dataclasses.dataclass
class Setup:
    rows: int = 10_000
    rows_per_shard: int = 50
    faults: int = 8                      # process faults injected per episode
    kinds: tuple = KINDS
    sequence: tuple = ()                 # these kinds in this order instead of random draws from kinds
    seed: int = 0
    lease_ttl: float = 4.0
    prior_s: float = 0.0005              # simulated seconds per image
    decoder_s: float = 0.002
    writers: int = 2
    overwrite_latency: float = 0.1       # seconds per request while an --overwrite removes (overwrite_round)
    fresh_readers: bool = True           # the checks read through new filesystem objects (no cached state)
    max_runs: int = 40
    run_timeout: float = 900.0           # seconds one run may take before the harness gives up
    extra: dict = dataclasses.field(default_factory=dict)   # merged into the config


# ------------------------------------------------------------------------------------------------ stores
class S3:
    """A moto server (in this process) behind a fault front; ``raw`` reads it directly (no faults)."""
    scheme = "s3"

    def __init__(self, faults, bucket: str = "chaos"):
        import s3fs
        from fault_front import FaultFront
        from moto_s3 import aws_env, free_port
        from moto import server as moto

        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
        self.env = aws_env(KEY_ID, SECRET)
        self._moto = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self.upstream = f"http://{host}:{port}"
        self.front = FaultFront(self.upstream, faults, flavor="s3").start()
        self.env["AWS_ENDPOINT_URL"] = self.front.url
        self.options = {}  # the environment carries the endpoint and credentials
        self.bucket = bucket
        self.raw = s3fs.S3FileSystem(key=KEY_ID, secret=SECRET, endpoint_url=self.upstream, use_listings_cache=False)
        self.raw.mkdir(bucket)

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def apply_env(self) -> None:
        """Point this process (and the processes it starts later: Ray nodes, drivers) at the front."""
        import s3fs

        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            os.environ.pop(k, None)
        os.environ.update(self.env)
        s3fs.S3FileSystem.clear_instance_cache()

    def close(self) -> None:
        self.front.stop()
        self._moto.stop()


class GCS:
    """fake-gcs-server (``tests/fake_gcs.py``) behind a fault front; ``raw`` reads it directly (no faults)."""
    scheme = "gs"

    def __init__(self, faults, bucket: str = "chaos"):
        import contextlib

        import fake_gcs  # tests/fake_gcs.py
        from fault_front import FaultFront
        from gcsfs.core import GCSFileSystem

        self._stack = contextlib.ExitStack()
        server = self._stack.enter_context(fake_gcs.fake_gcs_server())
        self.upstream = server.url
        self.front = FaultFront(self.upstream, faults, flavor="gcs").start()
        self.env = {**fake_gcs.FakeGCS(self.front.url).env(), "GOOGLE_CLOUD_PROJECT": "kbatch-test"}
        self.options = fake_gcs.FakeGCS(self.front.url).storage_options()  # in the config (token anon)
        self.bucket = bucket
        self.raw = GCSFileSystem(skip_instance_cache=True, use_listings_cache=False, **server.storage_options())
        self.raw.mkdir(bucket)

    def url(self, prefix: str) -> str:
        return f"gs://{self.bucket}/{prefix}"

    def apply_env(self) -> None:
        from gcsfs.core import GCSFileSystem

        os.environ.update(self.env)
        GCSFileSystem.clear_instance_cache()

    def close(self) -> None:
        self.front.stop()
        self._stack.close()


# ----------------------------------------------------------------------------------------------- helpers
def sim_config(manifest: str, out: str, s: Setup, storage_options: dict | None = None) -> dict:
    from kbatch.config import deep_merge

    cfg = {"models": {"prior": "sim", "decoder": "sim",
                      "sim": {"prior_seconds_per_image": s.prior_s, "decoder_seconds_per_image": s.decoder_s}},
           "manifest": manifest, "progress": "log", "defaults": {"height": 64, "width": 64},
           "output": {"path": out, "format": "parquet", "rows_per_shard": s.rows_per_shard, "gallery": False,
                      "lease_ttl": s.lease_ttl},
           "resources": {"writers": s.writers}}
    if storage_options:
        cfg["storage_options"] = storage_options
    return deep_merge(cfg, s.extra)


def write_manifest(path: str, n: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"c{i:07d}" for i in range(n)]
    pq.write_table(pa.table({"id": ids, "prompt": [f"chaos thing {i}" for i in range(n)]}), path,
                   row_group_size=4096)
    return ids


def _descendants(name: str, root: int | None = None) -> list:
    """The descendants of ``root`` (default: this process) whose title starts with ``name`` (Ray sets
    ``ray::<Actor>...``): only processes this harness started, never another job's on the machine."""
    import psutil

    out = []
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for p in children:
        try:
            cmd = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if cmd and cmd[0].startswith(name):
            out.append(p)
    return out


class Run:
    """One ``kbatch run CONFIG`` subprocess, its log in a file."""

    def __init__(self, n: int, config: str, env: dict, log_dir: str, own_session: bool, args: tuple = ()):
        self.n, self.log = n, os.path.join(log_dir, f"run-{n:02d}.log")
        self.own_session = own_session
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "kbatch.cli", "run", config, *args], env=env,
                                     stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=log_dir)  # not the repo: `python -m` puts the cwd first on sys.path
        self.t0 = time.monotonic()
        self.frozen = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self):
        return self.proc.poll()

    def signal(self, sig) -> None:
        """The driver only; or, when it started its own Ray, its whole process group for SIGKILL."""
        if self.proc.poll() is not None:
            return
        if sig == signal.SIGKILL and self.own_session:
            os.killpg(self.proc.pid, sig)
        else:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float | None = None):
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is not None:
                self._fh.close()

    def tail(self, n: int = 3000) -> str:
        if not self._fh.closed:
            self._fh.flush()
        with open(self.log, errors="replace") as fh:
            return fh.read()[-n:]


# ----------------------------------------------------------------------------------------------- episode
class Episode:
    """One output, runs until it is complete, faults injected on the way; ``play()`` returns the counts."""

    def __init__(self, setup: Setup, store, work: str, env: dict, cluster=None, node_args: dict | None = None,
                 log=print):
        self.s, self.store, self.work, self.env = setup, store, work, env
        self.cluster, self.node_args = cluster, node_args or {}
        self.rng = random.Random(setup.seed)
        self.log = log
        os.makedirs(work, exist_ok=True)
        self.manifest = os.path.join(work, "manifest.parquet")
        self.ids = write_manifest(self.manifest, setup.rows)
        self.out = store.url(f"out-{os.path.basename(work)}-{setup.seed}")
        from _common import write_yaml

        self.config = write_yaml(os.path.join(work, "job.yaml"), sim_config(self.manifest, self.out, setup,
                                                                                       store.options))
        self.shards = -(-setup.rows // max(setup.rows_per_shard, 32))  # about: a shard takes whole batches
        self._calibrated = False
        self.faults: Counter = Counter()
        self.runs: list[dict] = []
        self.frozen: list[Run] = []       # frozen drivers waiting to be thawed after a takeover
        self.anomalies: list[str] = []
        self.unfaulted: list[dict] = []   # runs that ended incomplete without a process fault
        self.store_faults = {k: v for k, v in dataclasses.asdict(store.front.faults).items() if k != "seed"}
        self.run_ids: set = set()         # the run ids seen holding the lease, in order of runs
        self.kinds = [k for k in setup.kinds if k != "remove_node" or cluster is not None]

    # -- raw views of the output (the store directly, no faults) --
    def _raw(self, rel: str) -> str:
        return f"{self.out.split('://', 1)[1]}/{rel}"

    def commit_names(self) -> list[str]:
        try:
            return [p.rsplit("/", 1)[-1] for p in self.store.raw.ls(self._raw("_commits"), refresh=True)
                    if p.endswith(".json")]
        except FileNotFoundError:
            return []

    def lease_run(self) -> str | None:
        try:
            return json.loads(self.store.raw.cat_file(self._raw("_lease.json"))).get("run_id")
        except Exception:  # noqa: BLE001 - absent, or a format this harness does not know
            return None

    def lease_bytes(self) -> bytes | None:
        try:
            return self.store.raw.cat_file(self._raw("_lease.json"))
        except Exception:  # noqa: BLE001
            return None

    def job_state(self) -> dict:
        """_job.json's status and error (the last run that wrote it)."""
        try:
            job = json.loads(self.store.raw.cat_file(self._raw("_job.json")))
        except Exception:  # noqa: BLE001
            return {}
        err = job.get("error")
        return {"status": job.get("status"), "job_run_id": job.get("run_id"),
                "error": (err if isinstance(err, str) else json.dumps(err))[:300] if err else None}

    # -- faults --
    def _kind(self, left: int) -> str | None:
        if left <= 0:
            return None
        if self.s.sequence:
            return self.s.sequence[len(self.s.sequence) - left]
        return self.rng.choice(self.kinds)

    def _calibrate(self) -> None:
        """Shards hold whole batches (``--rows-per-shard`` or more): once a commit record is there, the number of
        shards to expect is counted from its rows."""
        if self._calibrated:
            return
        for name in self.commit_names():
            try:
                rec = json.loads(self.store.raw.cat_file(self._raw(f"_commits/{name}")))
            except Exception:  # noqa: BLE001
                continue
            if not rec.get("aborted") and rec.get("rows"):
                self.shards = max(1, -(-self.s.rows // int(rec["rows"])))
                self._calibrated = True
                return

    def _next_at(self, done: int, left: int) -> int:
        """A commit count to inject the next fault at: faults spread over what is left to commit."""
        self._calibrate()
        remaining = max(1, self.shards - done)
        return done + self.rng.randint(1, max(1, remaining // (left + 1)))

    def _inject(self, kind: str, run: Run) -> str:
        """Do it; returns what happened to the run: 'killed', 'frozen' or 'running'."""
        self.faults[kind] += 1
        if kind == "kill_driver":
            run.signal(signal.SIGKILL)
            return "killed"
        if kind in ("freeze_driver", "freeze_job"):
            run.signal(signal.SIGSTOP)
            if kind == "freeze_job":
                run.also_frozen = _descendants("ray::WriterWorker", run.pid if self.cluster is None else None)
                for p in run.also_frozen:
                    try:
                        p.suspend()
                    except Exception:  # noqa: BLE001 - gone
                        pass
            run.frozen = True
            self.frozen.append(run)
            self._wait_lease_quiet()
            return "frozen"
        if kind == "pause_driver":
            run.signal(signal.SIGSTOP)
            time.sleep(self.rng.uniform(0.2, 0.5) * self.s.lease_ttl)
            run.signal(signal.SIGCONT)
            return "running"
        if kind == "kill_writer":
            # the run's own Ray (no cluster) or the cluster's nodes, both started by this harness
            writers = _descendants("ray::WriterWorker", run.pid if self.cluster is None else None)
            if not writers:
                self.faults[kind] -= 1
                self.faults["kill_writer_none_found"] += 1
                return "running"
            victim = self.rng.choice(writers)
            try:
                victim.kill()
            except Exception:  # noqa: BLE001 - gone already
                pass
            return "running"
        if kind == "outage":
            saved = dataclasses.asdict(self.store.front.faults)
            saved.pop("seed")
            self.store.front.set(reset=1.0, slowdown=0.0, lost_answer=0.0, match=None)
            time.sleep(self.rng.uniform(0.5, 2.0) * self.s.lease_ttl)
            self.store.front.set(**saved)
            return "running"
        if kind == "remove_node":
            nodes = list(self.cluster.worker_nodes)
            if not nodes:
                self.faults[kind] -= 1
                return "running"
            self.cluster.remove_node(self.rng.choice(nodes), allow_graceful=False)
            self.cluster.add_node(**self.node_args)  # a replacement (a preempted VM comes back as a new node)
            return "running"
        raise ValueError(kind)

    def _wait_lease_quiet(self) -> None:
        """A frozen driver's writers may still finish what they hold (each touching the lease): wait until the
        lease object has not changed for the ttl, so that the next run finds it old and takes it over."""
        last, since, deadline = None, time.monotonic(), time.monotonic() + 60 + 5 * self.s.lease_ttl
        while time.monotonic() < deadline:
            now = self.lease_bytes()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since > self.s.lease_ttl + 0.5:
                return
            time.sleep(0.2)

    def _thaw_due(self, run: Run, took_over_at: dict) -> bool:
        """Thaw a frozen driver a random moment after another run holds the lease (or after a long wait)."""
        holder = self.lease_run()
        key = run.n
        if key not in took_over_at and holder is not None and holder != getattr(run, "run_id", None) \
                and getattr(run, "run_id", None) is not None:
            took_over_at[key] = time.monotonic() + self.rng.uniform(0, 1.5 * self.s.lease_ttl)
        if getattr(run, "thaw_after_new_commits", None) is not None:  # an --overwrite: once the rerun committed
            if key in took_over_at and len(set(self.commit_names()) - run.commits_at_freeze) >= \
                    run.thaw_after_new_commits:
                return True
            return time.monotonic() - run.t_frozen > 120 + 10 * self.s.lease_ttl
        return (key in took_over_at and time.monotonic() >= took_over_at[key]) or \
            time.monotonic() - run.t_frozen > 120 + 10 * self.s.lease_ttl

    def _thaw(self, run: Run) -> None:
        for p in getattr(run, "also_frozen", []):
            try:
                p.resume()
            except Exception:  # noqa: BLE001 - gone
                pass
        run.signal(signal.SIGCONT)
        run.frozen = False
        try:
            code = run.wait(120)
        except subprocess.TimeoutExpired:
            run.signal(signal.SIGKILL)
            code = run.wait(60)
            self.anomalies.append(f"run {run.n}: thawed after a takeover but still running after 120 s")
        said = run.tail(20000)
        self.runs[run.n]["exit"] = code
        self.runs[run.n]["thawed"] = True
        if code != 3 or "lost the output lease" not in said:
            self.anomalies.append(f"run {run.n}: thawed after a takeover exited {code} "
                                  f"(expected 3, lost the output lease): {said[-600:]!r}")

    # -- the loop --
    def play(self) -> dict:
        t0 = time.monotonic()
        left = len(self.s.sequence) or self.s.faults
        held_retries = 0
        while True:
            if len(self.runs) >= self.s.max_runs:
                raise RuntimeError(f"no complete run after {len(self.runs)} runs: {self.runs[-3:]}")
            env = self.env() if callable(self.env) else self.env  # a callable: a fresh env (Ray temp dir) per run
            run = Run(len(self.runs), self.config, env, self.work, own_session=self.cluster is None)
            info = {"run": run.n, "faults": [], "exit": None}
            self.runs.append(info)
            self.log(f"  run {run.n} started (faults left {left})")
            due = self._next_at(len(self.commit_names()), left) if left > 0 else None
            kind = self._kind(left)
            took_over_at: dict = {}
            state = "running"
            while run.poll() is None and state == "running":
                if getattr(run, "run_id", None) is None:
                    holder = self.lease_run()
                    if holder is not None and holder not in self.run_ids:  # this run took the lease
                        run.run_id = holder
                        self.run_ids.add(holder)
                        info["run_id"] = holder
                for f in list(self.frozen):
                    if f.frozen and self._thaw_due(f, took_over_at):
                        self.frozen.remove(f)
                        self._thaw(f)
                if due is not None and len(self.commit_names()) >= due and run.poll() is None:
                    if kind in ("freeze_driver", "freeze_job", "kill_driver") and getattr(run, "run_id", None) is None:
                        pass  # not yet holding the lease: wait for it (a fault before it would test nothing new)
                    else:
                        info["faults"].append(kind)
                        self.log(f"  run {run.n}: {kind} at {len(self.commit_names())} commit records")
                        state = self._inject(kind, run)
                        if state == "frozen":
                            run.t_frozen = time.monotonic()
                        left -= 1
                        due = self._next_at(len(self.commit_names()), left) if left > 0 else None
                        kind = self._kind(left)
                if time.monotonic() - run.t0 > self.s.run_timeout:
                    run.signal(signal.SIGKILL)
                    self.anomalies.append(f"run {run.n}: still running after {self.s.run_timeout} s, killed")
                time.sleep(0.25)
            if state == "frozen":
                continue  # the next run takes over; this one is thawed later
            code = run.wait()
            info["exit"] = code
            info["seconds"] = round(time.monotonic() - run.t0, 1)
            tail = run.tail(6000)
            info.update(self.job_state())
            self.log(f"  run {run.n} exit {code} after {info['seconds']} s: {info.get('status')} {info.get('error') or ''}")
            if code == 0 or code == 1:
                break
            if code == 2:
                if "in use by" in tail and held_retries < 10:  # a live lease (a thawed run still exiting)
                    held_retries += 1
                    info["held"] = True
                    time.sleep(self.s.lease_ttl)
                    continue
                raise RuntimeError(f"run {run.n} exit 2: {tail}")
            if code not in (3, -signal.SIGKILL):
                self.anomalies.append(f"run {run.n}: exit {code}: {tail[-600:]!r}")
            elif code == 3 and not info["faults"] and not any(f.frozen for f in self.frozen):
                # no process fault in this run: the store's faults (or the machine) ended it; reported, not judged
                self.unfaulted.append({"run": run.n, "status": info.get("status"), "error": info.get("error"),
                                       "said": tail[-400:]})
        for f in list(self.frozen):  # a frozen run never taken over (should not happen): thaw and collect it
            self.frozen.remove(f)
            self._thaw(f)
        seconds = time.monotonic() - t0
        self.store.front.set(slowdown=0.0, reset=0.0, lost_answer=0.0, latency=0.0, jitter=0.0)
        checks = self.check()
        return {"rows": self.s.rows, "runs": len(self.runs), "seconds": round(seconds, 1),
                "process_faults": dict(self.faults), "store_faults": self.store.front.injected(),
                "requests": self.store.front.counts["requests"], **checks, "anomalies": self.anomalies,
                "unfaulted_incomplete": self.unfaulted,
                "run_log": self.runs}

    def overwrite_round(self) -> dict:
        """On the complete output: run A, ``kbatch run CONFIG --overwrite``, is frozen (SIGSTOP) as soon as its
        removal of the old output shows (a commit record replaced or gone, a metadata file gone), with the
        store's latency raised to ``overwrite_latency`` while it removes (a long delete); the same command
        without ``--overwrite`` is then rerun until it completes: it takes A's lease over (and finishes or
        discards A's removal). A is thawed once that run has committed 2 shards and must exit 3 removing nothing
        more: every
        row once, every file a commit record names present. Returns play()'s counts, with ``froze_mid_removal``."""
        def state():
            try:
                commits = {p["name"]: p.get("ETag") or p.get("etag") or p.get("md5Hash") or p.get("generation")
                           for p in self.store.raw.ls(self._raw("_commits"), detail=True, refresh=True)}
            except FileNotFoundError:
                commits = {}
            try:
                metas = len(self.store.raw.ls(self._raw("meta"), refresh=True))
            except FileNotFoundError:
                metas = 0
            return commits, metas

        self.store.front.set(**self.store_faults)  # play() turned them off for its checks
        self.anomalies, self.unfaulted = [], []
        commits0, metas0 = state()
        saved = self.store.front.faults.latency
        self.store.front.set(latency=self.s.overwrite_latency)
        env = self.env() if callable(self.env) else self.env
        a = Run(len(self.runs), self.config, env, self.work, own_session=self.cluster is None, args=("--overwrite",))
        info = {"run": a.n, "faults": ["freeze_overwrite"], "exit": None, "overwrite": True}
        self.runs.append(info)
        froze = False
        deadline = time.monotonic() + self.s.run_timeout
        while a.poll() is None and time.monotonic() < deadline:
            commits, metas = state()
            if commits != commits0 or metas < metas0:
                a.signal(signal.SIGSTOP)
                froze = True
                break
            time.sleep(0.05)
        self.store.front.set(latency=saved)
        if not froze:
            info["exit"] = a.wait()
            self.anomalies.append(f"run {a.n}: --overwrite ended ({info['exit']}) before its removal showed")
        else:
            self.faults["freeze_overwrite"] += 1
            holder = self.lease_run()
            a.run_id = holder
            self.run_ids.add(holder)
            info["run_id"] = holder
            a.frozen, a.t_frozen = True, time.monotonic()
            # thawed once the rerun has committed shards of its own: a removal that carried on would take them
            a.commits_at_freeze, a.thaw_after_new_commits = set(self.commit_names()), 2
            self.frozen.append(a)
            self.log(f"  run {a.n}: --overwrite frozen mid-removal ({len(commits0)} commit records before)")
            self._wait_lease_quiet()
        self.s = dataclasses.replace(self.s, faults=0, sequence=())
        out = self.play()
        out["froze_mid_removal"] = froze
        return out

    # -- the checks --
    def check(self) -> dict:
        """Exactly once, read two ways. Returns the counts of both and the job's final state."""
        import pyarrow.parquet as pq

        import kbatch
        from kbatch.run.status import summarize

        ids = set(self.ids)
        # 1. kbatch's own readers, on fresh filesystem objects: a reader in a process that read this output before
        #    an --overwrite rewrote it can fail on the old output's files (bench/RESULTS.md, chaos runs)
        if self.s.fresh_readers:
            import fsspec

            fsspec.get_filesystem_class(self.store.scheme).clear_instance_cache()
        try:
            df = kbatch.open_results(self.out, storage_options=self.store.options).df
            ok = df[df.status == "ok"]
            reader_dups = int(len(ok) - ok["id"].nunique())
            reader_missing = len(ids - set(ok["id"]))
            reader_ok = int(ok["id"].nunique())
        except Exception as e:  # noqa: BLE001 - e.g. a committed shard's files deleted under it
            self.anomalies.append(f"kbatch's readers failed: {e!r}"[:600])
            reader_dups, reader_missing, reader_ok = -1, len(ids), 0
            try:  # again with fresh filesystem objects (no listing cached in this process)
                import fsspec

                for cls in (fsspec.get_filesystem_class(self.store.scheme),):
                    cls.clear_instance_cache()
                df = kbatch.open_results(self.out, storage_options=self.store.options).df
                ok = df[df.status == "ok"]
                self.anomalies.append(f"... and read fine with fresh filesystem objects: {int(ok['id'].nunique())} "
                                      f"ids ok, {int(len(ok) - ok['id'].nunique())} duplicates")
            except Exception as e2:  # noqa: BLE001
                self.anomalies.append(f"... and again with fresh filesystem objects: {e2!r}"[:600])
        try:
            s = summarize(self.out, storage_options=self.store.options)
        except Exception as e:  # noqa: BLE001
            self.anomalies.append(f"summarize failed: {e!r}"[:600])
            s = {}
        # 2. raw: every commit record, the metadata file each names
        seen: Counter = Counter()
        aborted = committed = files_missing = 0
        named = set()
        base = self._raw("")
        present = {p[len(base):] for p in self.store.raw.find(base.rstrip("/"))}
        for name in self.commit_names():
            rec = json.loads(self.store.raw.cat_file(self._raw(f"_commits/{name}")))
            if rec.get("aborted"):
                aborted += 1
                continue
            committed += 1
            files_missing += sum(f not in present for f in rec.get("files") or [])
            meta = rec.get("meta") or next(f for f in rec["files"] if f.startswith("meta/"))
            named.add(meta)
            if meta not in present:
                continue  # its rows count as missing
            with self.store.raw.open(self._raw(meta), "rb") as fh:
                t = pq.read_table(fh, columns=["id", "status"])
            seen.update(i for i, st in zip(t.column("id").to_pylist(), t.column("status").to_pylist()) if st == "ok")
        try:
            base = self._raw("")
            metas = [p[len(base):] for p in self.store.raw.ls(self._raw("meta"), refresh=True)]
        except FileNotFoundError:
            metas = []
        raw_dups = sum(n - 1 for n in seen.values() if n > 1)
        raw_missing = len(ids - set(seen))
        try:  # the protocol's leftovers, reported (not judged): writers' intents, the lease's state and epoch
            inflight = len(self.store.raw.ls(self._raw("_inflight"), refresh=True))
        except FileNotFoundError:
            inflight = 0
        try:
            lease = json.loads(self.store.raw.cat_file(self._raw("_lease.json")))
        except FileNotFoundError:
            lease = {}
        job = json.loads(self.store.raw.cat_file(self._raw("_job.json")))
        try:
            success = json.loads(self.store.raw.cat_file(self._raw("_SUCCESS")))
        except FileNotFoundError:
            success = None
        return {"duplicates": max(reader_dups, raw_dups), "missing": max(reader_missing, raw_missing),
                "reader": {"rows_ok": reader_ok, "duplicates": reader_dups, "missing": reader_missing,
                           "summarize_rows_done": s.get("rows_done"), "summarize_complete": s.get("complete")},
                "raw": {"commit_records": committed, "abort_records": aborted, "files_missing": files_missing,
                        "duplicates": raw_dups,
                        "missing": raw_missing, "unexpected_ids": len(set(seen) - ids),
                        "meta_files": len(metas), "meta_files_not_committed": len(set(metas) - named),
                        "inflight_left": inflight, "lease_state": lease.get("state"), "lease_epoch": lease.get("epoch")},
                "job_status": job.get("status"), "success_run_matches_job": bool(success) and
                success.get("run_id") == job.get("run_id")}


# ---------------------------------------------------------------------------------------------- the bench
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=1, help="outputs, each rendered to completion")
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--rows-per-shard", type=int, default=50)
    ap.add_argument("--faults", type=int, default=8, help="process faults per episode")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lease-ttl", type=float, default=4.0)
    ap.add_argument("--storage", choices=["s3", "gcs"], default="s3")
    ap.add_argument("--latency", type=float, default=0.01, help="seconds added to every storage request")
    ap.add_argument("--jitter", type=float, default=0.01)
    ap.add_argument("--slowdown", type=float, default=0.02, help="probability of a 503 per request")
    ap.add_argument("--reset", type=float, default=0.01, help="probability of a connection reset per request")
    ap.add_argument("--lost", type=float, default=0.02, help="probability, per write, of a lost answer")
    ap.add_argument("--match", help="regex on the request path: only matching requests get 503s, resets and "
                                    "lost answers (e.g. '_lease|_commits')")
    ap.add_argument("--nodes", type=int, default=3, help="fake-GPU worker nodes")
    ap.add_argument("--gpus-per-node", type=int, default=2)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--overwrite-rounds", type=int, default=0,
                    help="after each episode: rounds of `run --overwrite` frozen mid-removal, resumed by a rerun")
    ap.add_argument("--cached-readers", action="store_true",
                    help="the checks reuse this process's filesystem objects (as a notebook would)")
    ap.add_argument("--kbatch-path", help="a folder holding another kbatch package to run instead")
    ap.add_argument("--work", help="keep logs and manifests here (default: a temp dir, removed)")
    ap.add_argument("--json", help="append the results as one JSON line to this file")
    a = ap.parse_args(argv)

    from fault_front import Faults

    from _common import loadavg, ray_env

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a SIGTERM stops the cluster and the store too
    work = a.work or tempfile.mkdtemp(prefix="kbchaos-", dir="/tmp")
    os.makedirs(work, exist_ok=True)
    ray_tmp = tempfile.mkdtemp(prefix="kbc-", dir="/tmp")  # short: Ray's socket paths
    os.environ.update(ray_env(ray_tmp, a.kbatch_path))
    if a.kbatch_path:
        sys.path.insert(0, a.kbatch_path)
    faults = Faults(latency=a.latency, jitter=a.jitter, slowdown=a.slowdown, reset=a.reset, lost_answer=a.lost,
                    match=a.match, seed=a.seed)
    store = (S3 if a.storage == "s3" else GCS)(faults)
    store.apply_env()
    from ray.cluster_utils import Cluster

    node_args = {"num_cpus": 2, "num_gpus": a.gpus_per_node}
    for attempt in range(3):  # a head that times out starting on a loaded machine: try again
        try:
            cluster = Cluster(initialize_head=True,
                              head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
            break
        except Exception as e:  # noqa: BLE001
            print(f"cluster head did not start ({e}); again", flush=True)
            if attempt == 2:
                store.close()
                raise
    results = []
    try:
        for _ in range(a.nodes):
            cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        env = dict(os.environ, RAY_ADDRESS=cluster.address)
        load = loadavg()
        for ep in range(a.episodes):
            setup = Setup(rows=a.rows, rows_per_shard=a.rows_per_shard, faults=a.faults,
                          kinds=tuple(a.kinds.split(",")), seed=a.seed + ep, lease_ttl=a.lease_ttl,
                          writers=a.writers, fresh_readers=not a.cached_readers)
            store.front.set(latency=a.latency, jitter=a.jitter, slowdown=a.slowdown, reset=a.reset,
                            lost_answer=a.lost)
            before = store.front.injected()
            print(f"episode {ep}: {a.rows} rows, {a.faults} process faults, seed {setup.seed}", flush=True)
            episode = Episode(setup, store, os.path.join(work, f"ep{ep}"), env, cluster, node_args,
                              log=lambda m: print(m, flush=True))
            for k in range(1 + a.overwrite_rounds):
                if k:
                    print(f"episode {ep}: overwrite round {k}", flush=True)
                    before = store.front.injected()
                runs_before, faults_before = len(episode.runs), Counter(episode.faults)
                r = episode.play() if k == 0 else episode.overwrite_round()
                r["store_faults"] = {k: v - before[k] for k, v in r["store_faults"].items()}
                r["runs"] -= runs_before
                r["process_faults"] = dict(Counter(r["process_faults"]) - faults_before)
                r["round"] = "episode" if k == 0 else f"overwrite {k}"
                r["load_before"], r["load_after"] = round(load, 2), round(loadavg(), 2)
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "run_log"}), flush=True)
    finally:
        cluster.shutdown()
        store.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    total = {"episodes": len(results), "runs": sum(r["runs"] for r in results),
             "rows": sum(r["rows"] for r in results),
             "process_faults": dict(sum((Counter(r["process_faults"]) for r in results), Counter())),
             "store_faults": dict(sum((Counter(r["store_faults"]) for r in results), Counter())),
             "duplicates": sum(r["duplicates"] for r in results), "missing": sum(r["missing"] for r in results),
             "anomalies": sum(len(r["anomalies"]) for r in results),
             "seconds": round(sum(r["seconds"] for r in results), 1)}
    print("TOTAL " + json.dumps(total), flush=True)
    if a.json:
        with open(a.json, "a") as fh:
            fh.write(json.dumps({"args": vars(a), "total": total, "episodes": results}) + "\n")
    return 0 if total["duplicates"] == 0 and total["missing"] == 0 and not total["anomalies"] else 1


if __name__ == "__main__":
    sys.exit(main())
