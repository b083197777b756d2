"""docs/output.md: fenced writes and "one shard is committed at most once" (issue 19, items 1 and 2).

- the double commit: with the real writer functions, an attempt that stalls after its data objects while its
  shard is resent (same rows) or its rows go to other shards (some payloads died) commits nothing when it
  wakes; every id is in exactly one committed shard and every committed record is readable;
- a writer whose run lost its lease commits nothing;
- readers trust only the files a commit record names, and commit records written before attempts existed
  stay readable;
- the frozen run: run A frozen (SIGSTOP) past its lease ttl, run B completes on the same output, A thawed
  (SIGCONT) exits 3 saying it lost the lease and writes nothing: B's ``_SUCCESS`` and ``_job.json`` stand and
  every row is there exactly once.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import kbatch
from kbatch.output import commits
from kbatch.output import writer as writer_mod
from kbatch.output.lease import Fenced, Lease
from kbatch.output.writer import OutputSpec, ShardAborted, list_committed_shards, write_shard
from kbatch.run.shards import Shard, ShardBuffer, settle_lost_write

FORMATS = ["files", "webdataset", "parquet"]


def _records(ids):
    recs, imgs = [], []
    for k, i in enumerate(ids):
        recs.append({"id": i, "image_index": 0, "status": "ok", "prompt": f"prompt of {i}", "seed": k})
        imgs.append(np.full((16, 16, 3), 10 * (k + 1), dtype=np.uint8))
    return recs, imgs


class _Stalled:
    """``writer.commit_shard`` for the thread named ``attempt-1``: it stops after its data objects (before
    metadata and commit) until released."""

    def __init__(self, monkeypatch):
        self.reached, self.go = threading.Event(), threading.Event()
        real = writer_mod.commit_shard

        def commit_shard(*args, **kwargs):
            if threading.current_thread().name == "attempt-1":
                self.reached.set()
                assert self.go.wait(60)
            return real(*args, **kwargs)

        monkeypatch.setattr(writer_mod, "commit_shard", commit_shard)

    def start(self, fn):
        out = {}

        def run():
            try:
                out["value"] = fn()
            except BaseException as e:  # noqa: BLE001
                out["error"] = e

        t = threading.Thread(target=run, name="attempt-1")
        t.start()
        assert self.reached.wait(60)
        return t, out


def _every_id_once_and_readable(root, ids):
    res = kbatch.open_results(root)
    assert sorted(res.df.id) == sorted(ids), res.df[["id", "shard"]]
    for i in ids:
        res.image(i)  # the committed record's image is there (and matches its sha256)
    return res


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_stalled_attempt_does_not_commit_over_its_resend(tmp_path, monkeypatch, fmt):
    """The writer of attempt 1 is presumed dead (ActorUnavailableError, a partition); the driver resends the
    shard (same rows, same name) and it commits; attempt 1 wakes and finds the commit record taken."""
    root = str(tmp_path / "out")
    lease = Lease.acquire(root, "run-a")
    spec = OutputSpec(root, fmt, "png", fence=lease.fence())
    stall = _Stalled(monkeypatch)
    t, first = stall.start(lambda: write_shard(spec, "run-a-00000", *_records(["x", "y"])))
    second = write_shard(spec, "run-a-00000", *_records(["x", "y"]))  # the resend
    stall.go.set()
    t.join(60)
    assert "error" not in first, first
    # refused: attempt 1 is answered with the commit of attempt 2, its own objects removed
    assert first["value"].attempt == second.attempt != ""
    rec = commits.read(*_fs(root), "run-a-00000")
    assert rec["attempt"] == second.attempt and all(second.attempt in f for f in rec["files"])
    everything = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]
    assert not [f for f in everything if "run-a-00000~" in f and second.attempt not in f]
    _every_id_once_and_readable(root, ["x", "y"])
    assert read_lease_open(root) == []  # committed: no longer in flight
    lease.release()


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_made_again_elsewhere_abort_the_stalled_shard(tmp_path, monkeypatch, fmt):
    """The issue's reproduction: attempt 1 of S holds x and y and stalls after its data file; y's images died
    with a node, so the driver makes y again into another shard and resends x; attempt 1 then tries to commit
    S = (x, y). Before: y was in two shards and reading it from S raised KeyError. Now the driver aborts S's
    name first (settle_lost_write), x goes out under a new name, and attempt 1 commits nothing."""
    root = str(tmp_path / "out")
    lease = Lease.acquire(root, "run-a")
    spec = OutputSpec(root, fmt, "png", fence=lease.fence())
    buffer = ShardBuffer("run-a", 2)
    shard = buffer.take()  # run-a-00000
    stall = _Stalled(monkeypatch)
    t, first = stall.start(lambda: write_shard(spec, shard.name, *_records(["x", "y"])))
    assert settle_lost_write(spec, shard.name) is None  # aborted: no attempt of it can commit any more
    resent = buffer.rename(shard)
    assert resent.name != shard.name
    write_shard(spec, resent.name, *_records(["x"]))
    write_shard(spec, buffer.take().name, *_records(["y"]))  # y made again
    stall.go.set()
    t.join(60)
    assert isinstance(first.get("error"), ShardAborted), first
    assert shard.name not in list_committed_shards(root)
    res = _every_id_once_and_readable(root, ["x", "y"])
    assert set(res.df.shard) == {"run-a-00001", "run-a-00002"}
    lease.release()


def test_a_shard_committed_before_its_rows_were_lost_is_kept(tmp_path):
    """settle_lost_write finds the shard committed: its rows are done, nothing is made again."""
    root = str(tmp_path / "out")
    spec = OutputSpec(root, "files", "png")
    stats = write_shard(spec, "run-a-00000", *_records(["x", "y"]))
    got = settle_lost_write(spec, "run-a-00000")
    assert got is not None and got.attempt == stats.attempt and got.rows == 2
    _every_id_once_and_readable(root, ["x", "y"])


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_a_writer_of_a_run_that_lost_its_lease_commits_nothing(tmp_path, backend):
    import uuid

    root = str(tmp_path / "out") if backend == "local" else f"memory://fence-{uuid.uuid4().hex}/out"
    a = Lease.acquire(root, "run-a", ttl=0.5)
    spec = OutputSpec(root, "files", "png", fence=a.fence())
    write_shard(spec, "run-a-00000", *_records(["x"]))
    time.sleep(0.6)  # a is frozen: no renewal
    b = Lease.acquire(root, "run-b", ttl=0.5)  # watched 0.5 s unchanged, taken over
    with pytest.raises(Fenced, match="run-b"):
        write_shard(spec, "run-a-00001", *_records(["y"]))
    assert list_committed_shards(root) == ["run-a-00000"]
    fs, path = _fs(root)
    assert not fs.exists(f"{path}/_commits/run-a-00001.json")
    b.release()


def test_old_commit_records_stay_readable(tmp_path):
    """An output written before attempts existed (``meta/<shard>.parquet``, files under the shard's name,
    commit records without ``attempt``) reads as before."""
    root = str(tmp_path / "out")
    write_shard(OutputSpec(root, "files", "png"), "old-0", *_records(["x", "y"]))
    fs, path = _fs(root)
    rec = commits.read(fs, path, "old-0")
    stem = f"old-0~{rec['attempt']}"
    import pyarrow.parquet as pq

    meta = pq.read_table(os.path.join(root, "meta", f"{stem}.parquet"))
    meta = meta.set_column(meta.schema.get_field_index("path"), "path",
                           [[p.replace(stem, "old-0") for p in meta.column("path").to_pylist()]])
    os.rename(os.path.join(root, "images", stem), os.path.join(root, "images", "old-0"))
    pq.write_table(meta, os.path.join(root, "meta", "old-0.parquet"))
    os.remove(os.path.join(root, "meta", f"{stem}.parquet"))
    old = {"shard": "old-0", "rows": 2, "images": 2, "errors": 0, "format": "files", "image_format": "png",
           "files": ["images/old-0/x__0.png", "images/old-0/y__0.png", "meta/old-0.parquet", "stats/old-0.json"]}
    with open(os.path.join(root, "_commits", "old-0.json"), "w") as fh:
        json.dump(old, fh)
    res = _every_id_once_and_readable(root, ["x", "y"])
    assert set(res.df.path) == {"images/old-0/x__0.png", "images/old-0/y__0.png"}


def _fs(root):
    from kbatch.storage import get_fs

    return get_fs(root)


def read_lease_open(root):
    """The shards with an intent in flight (``_inflight/``)."""
    from kbatch.output import intents
    from kbatch.storage import conditional_store

    return [s for s, _, _ in intents.listed(conditional_store(root))]


# ------------------------------------------------------------------------------------------ the frozen run
def test_a_frozen_run_loses_its_lease_and_writes_nothing_more(ray_session, tmp_path, capsys, caplog):
    """Run A (simulated models, a 2 s lease ttl) is frozen with SIGSTOP after its first commits; run B on the
    same output watches A's lease unchanged for its ttl, takes it over and completes (exit 0, _SUCCESS); A is
    thawed: it exits 3 saying it lost the lease, and B's _SUCCESS / _job.json stand; every row once."""
    from cli_helpers import env, write_job
    from test_scale import sim_config

    out = tmp_path / "out"
    n = 400
    cfg = sim_config(out, models={"sim": {"decoder_seconds_per_image": 0.02}},
                     output={"rows_per_shard": 20, "format": "files", "lease_ttl": 2})
    path = write_job(tmp_path, cfg, [{"id": f"r{i:04d}", "prompt": f"thing {i}"} for i in range(n)])
    a = subprocess.Popen([sys.executable, "-m", "kbatch.cli", "run", path], env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while a.poll() is None and time.monotonic() < deadline and len(_committed(out)) < 2:
            time.sleep(0.05)
        assert a.poll() is None and len(_committed(out)) >= 2, a.communicate(timeout=60)
        os.kill(a.pid, signal.SIGSTOP)  # the driver only: its writers finish what they hold
        a_run = json.loads((out / "_lease.json").read_text())["run_id"]
        # past the ttl, and quiet: A's writers finish the writes they hold (each changes the lease: in flight,
        # then done) on a busy machine maybe later than the ttl; B would then rightly see a live holder
        last, since, deadline = None, time.monotonic(), time.monotonic() + 120
        while time.monotonic() < deadline:
            now = (out / "_lease.json").read_bytes()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since > 4:
                break
            time.sleep(0.1)
        assert len(_committed(out)) < n // 20, "A finished before it was frozen: use more rows"

        from kbatch.cli import main

        code = main(["run", path])  # run B, on this test's Ray
        captured = capsys.readouterr()
        assert code == 0, captured.err[-3000:]
        job = json.loads((out / "_job.json").read_text())
        success = json.loads((out / "_SUCCESS").read_text())
        b_run = job["run_id"]
        assert b_run != a_run and success["run_id"] == b_run and job["status"] == "complete"
        assert "taking over the output lease" in caplog.text and "did not change for 2 s" in caplog.text
        assert "skipped 0" not in captured.out  # A's commits before the freeze count: B renders the rest

        os.kill(a.pid, signal.SIGCONT)
        stdout, stderr = a.communicate(timeout=120)
        assert a.returncode == 3, (stdout[-2000:], stderr[-3000:])
        said = stdout + stderr
        assert "lost the output lease" in said and b_run in said, said[-3000:]
        # A wrote nothing more: B's markers stand; every row exactly once
        assert json.loads((out / "_job.json").read_text()) == job
        assert json.loads((out / "_SUCCESS").read_text()) == success
        df = kbatch.open_results(str(out)).df
        assert len(df) == n and df.id.is_unique and set(df.status) == {"ok"}
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGCONT)
            os.killpg(a.pid, signal.SIGKILL)
            a.communicate(timeout=60)


def _committed(out):
    folder = out / "_commits"
    return [f for f in os.listdir(folder) if f.endswith(".json")] if folder.exists() else []


# ------------------------------------------------------------------------------------- the driver's side
class _Work:
    """What ``Outcomes._inputs_lost`` uses of the dispatcher."""

    def __init__(self, spec):
        from collections import deque

        self.spec, self.buffer, self.to_write, self.restarted = spec, ShardBuffer("run-a", 2), deque(), []

    def restart_rows(self, rows, extra=None):
        self.restarted += [r.id for r in rows]


class _Nodes:
    def __init__(self, dead):
        self.dead = dead

    def refresh(self, force=False):
        return []

    def is_dead(self, node):
        return node in self.dead


def _lost_write_case(tmp_path, commit_first: bool):
    from types import SimpleNamespace

    from kbatch.config import JobConfig
    from kbatch.run.outcomes import Outcomes
    from kbatch.run.shards import Entry

    root = str(tmp_path / "out")
    lease = Lease.acquire(root, "run-a")
    spec = OutputSpec(root, "files", "png", fence=lease.fence())
    work = _Work(spec)
    shard = work.buffer.take()  # run-a-00000: x made on node-1, y on node-2 (which dies)
    shard.entries = [Entry([SimpleNamespace(id="x", num_images=1)], None, "node-1"),
                     Entry([SimpleNamespace(id="y", num_images=1)], None, "node-2")]
    if commit_first:  # an attempt had committed it (a writer behind a partition, a Ray retry)
        write_shard(spec, shard.name, *_records(["x", "y"]))
    out = Outcomes(None, JobConfig(), work, _Nodes({"node-2"}), {}, lambda: [])
    out._inputs_lost(SimpleNamespace(kind="write", shard=shard), RuntimeError("ObjectLostError"))
    return lease, spec, work, out, shard


def test_the_driver_makes_rows_again_only_after_aborting_the_shards_name(tmp_path):
    lease, spec, work, out, shard = _lost_write_case(tmp_path, commit_first=False)
    assert work.restarted == ["y"]  # y's images died with node-2: made again
    assert [s.name for s in work.to_write] == ["run-a-00001"]  # x goes out under a new name
    assert commits.read(*_fs(spec.root), "run-a-00000")["aborted"]
    with pytest.raises(ShardAborted):  # the first attempt, if it still runs, commits nothing
        write_shard(spec, "run-a-00000", *_records(["x", "y"]))
    assert out.rows_ok == 0 and not out.write_failures
    lease.release()


def test_the_driver_counts_a_lost_write_that_had_committed(tmp_path):
    lease, spec, work, out, shard = _lost_write_case(tmp_path, commit_first=True)
    assert work.restarted == [] and not work.to_write  # nothing made again, nothing resent
    assert out.rows_ok == 2 and out.committed == {0}
    _every_id_once_and_readable(spec.root, ["x", "y"])
    lease.release()


def test_the_lease_is_renewed_while_the_run_plans(tmp_path, monkeypatch):
    """The renewer runs from the moment the lease is taken, not from the driver loop's first tick: a plan
    (the resume scan, here held for 1.5 ttl) does not let another run take the output over."""
    import kbatch.plan.resume_scan as resume_scan
    from cli_helpers import write_job
    from test_scale import sim_config

    from kbatch.config import load_config
    from kbatch.output.lease import LeaseHeld
    from kbatch.run.runner import Runner

    out = tmp_path / "out"
    path = write_job(tmp_path, sim_config(out, output={"lease_ttl": 1}), [{"id": "a", "prompt": "p"}])
    real_scan, seen = resume_scan.scan, {}

    def slow_scan(*args, **kwargs):
        time.sleep(1.5)  # a long plan: more than the ttl without a driver tick
        try:
            Lease.acquire(str(out), "contender", ttl=1.0)
            seen["taken"] = True
        except LeaseHeld as e:
            seen["held"] = str(e)
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(resume_scan, "scan", slow_scan)
    runner = Runner(load_config(path)).plan()
    try:
        assert "held" in seen and "taken" not in seen, seen
        assert runner.lease.lost is None and json.loads((out / "_lease.json").read_text())["renewals"] >= 4
    finally:
        runner.lease.release()
