"""Issue 25's holes in the output protocol, each reproduced (docs/output.md: the lease, shards in flight,
``--overwrite``, ``_job.json`` and ``_SUCCESS``):

- ``--overwrite`` is fenced: a run that loses its lease midway stops and never removes what the new holder
  wrote; commit records become aborts and abort records stay; an overwrite a dead run left half done is
  finished by the next run before it reads the output;
- a takeover's abort list is durable: a swap answered 500 then retried into 412, an error or a SIGKILL during
  the aborts: the next acquirer (or the same run) still aborts the old holder's shards in flight;
- the lease is never deleted (released is a state), so the epoch only grows;
- ``_job.json`` writes are conditional (an old holder's first write cannot replace the new holder's), and
  readers trust ``_SUCCESS`` only with the run id of ``_job.json`` and status complete;
- no hot object: writing shards does not write the lease object;
- resume (and readers' superseding) order runs by ``_job.json``'s runs list, not by their ids' clocks.
"""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pyarrow as pa
import pytest

from kbatch.output import commits, intents
from kbatch.output.lease import LEASE_NAME, Lease, LeaseLost, read_lease, read_lease_record
from kbatch.output.writer import OutputSpec, list_committed_shards, write_shard
from kbatch.storage import conditional_store
from kbatch.storage.conditional import PreconditionFailed


def _records(ids, status="ok", run_id=None, error=None):
    recs, imgs = [], []
    for k, i in enumerate(ids):
        rec = {"id": i, "image_index": 0 if status == "ok" else -1, "status": status, "prompt": f"p {i}",
               "seed": k, "run_id": run_id, "row_hash": f"h{i}"}
        if status == "error":
            rec["error"] = error
        recs.append(rec)
        imgs.append(np.full((8, 8, 3), 10 * (k + 1), np.uint8) if status == "ok" else None)
    return recs, imgs


def _foreign_takeover(root, run_id="run-b", epoch=2):
    """Another run's lease record, as a run that took the output over writes it (bypassing this process's
    Lease: what a frozen holder finds when it wakes)."""
    store = conditional_store(root)
    seen = store.read(LEASE_NAME)
    rec = {"run_id": run_id, "host": "elsewhere.invalid", "pid": 1, "token": uuid.uuid4().hex, "epoch": epoch,
           "state": "held", "ttl": 120.0, "renewed_epoch": time.time()}
    store.replace(LEASE_NAME, json.dumps(rec).encode(), seen.version)


def _takeable(lease):
    time.sleep(lease.ttl + 0.1)  # frozen: no renewal for its ttl (local mtime: the contender watches it)


# ------------------------------------------------------------------------------------------ --overwrite
def test_overwrite_stops_when_the_lease_is_lost_and_keeps_the_new_holders_writes(tmp_path, monkeypatch):
    """A run overwriting the output is frozen midway; run B takes the output over and commits a shard; the
    frozen run wakes: its next batch stops (LeaseLost) and B's shard, data and commit record, are intact.
    Before: remove_tree listed each folder as it went and removed B's commit record and metadata."""
    from fsspec.implementations.local import LocalFileSystem

    from kbatch.output import overwrite as ow

    root = str(tmp_path / "out")
    old = OutputSpec(root, "files", "png")
    for s in ("old-00000", "old-00001", "old-00002"):
        write_shard(old, s, *_records([f"{s}-x", f"{s}-y"]))
    a = Lease.acquire(root, "run-a")
    real_rm, calls = LocalFileSystem.rm, []

    def rm(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:  # frozen here; meanwhile B took the output over and wrote a shard
            _foreign_takeover(root)
            write_shard(OutputSpec(root, "files", "png"), "run-b-00000", *_records(["b1", "b2"], run_id="run-b"))
        return real_rm(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "rm", rm)
    with pytest.raises(LeaseLost, match="run-b"):
        ow.overwrite(a, batch=2)
    monkeypatch.setattr(LocalFileSystem, "rm", real_rm)
    assert list_committed_shards(root) == ["run-b-00000"]
    import kbatch

    assert sorted(kbatch.open_results(root).df.id) == ["b1", "b2"]  # B's files: all there, readable


def test_overwrite_turns_commits_into_aborts_and_keeps_abort_records(tmp_path):
    """A late attempt of an overwritten shard can never commit again, and an abort a takeover made stays."""
    from kbatch.output.overwrite import overwrite

    root = str(tmp_path / "out")
    spec = OutputSpec(root, "files", "png")
    write_shard(spec, "old-00000", *_records(["x"]))
    store = conditional_store(root)
    assert commits.abort(store, "old-00001", {"run_id": "taker", "reason": "lease taken over"}) is None
    (tmp_path / "out" / "notes.txt").write_text("a user's file")
    with Lease.acquire(root, "run-a") as a:
        counts = overwrite(a)
        assert counts["aborted"] == 1 and counts["removed"] >= 3
        assert "overwriting" not in read_lease(root)
    fs_files = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]
    assert not [f for f in fs_files if f.startswith(("meta/", "images/", "stats/"))]
    assert (tmp_path / "out" / "notes.txt").read_text() == "a user's file"  # not kbatch's: stays
    assert commits.read(*_fs(root), "old-00001")["by"]["run_id"] == "taker"  # kept as it was
    superseded = commits.read(*_fs(root), "old-00000")
    assert superseded["aborted"] and superseded["by"]["reason"] == "overwritten (--overwrite)"
    late = commits.create(store, "old-00000", {"shard": "old-00000", "attempt": "late"})
    assert late is not None and late["aborted"]  # the name stays taken: nothing commits under it
    assert list_committed_shards(root) == []


def test_an_unfinished_overwrite_is_finished_before_the_next_run_reads(tmp_path):
    """A run died midway through --overwrite (its record still says ``overwriting``); the next run, without
    --overwrite, finishes it before its scan: it renders every row, never counting records half removed."""
    from cli_helpers import write_job
    from test_scale import sim_config

    from kbatch.config import load_config
    from kbatch.run.runner import Runner

    out = tmp_path / "out"
    path = write_job(tmp_path, sim_config(out, output={"format": "files"}),
                     [{"id": f"r{i}", "prompt": "p"} for i in range(4)])
    write_shard(OutputSpec(str(out), "files", "png"), "old-00000", *_records(["r0", "r1", "r2"]))
    a = Lease.acquire(str(out), "run-a")
    a.begin_overwrite()
    a.release()  # it died: released or expired, its record carries the unfinished overwrite
    assert read_lease_record(str(out))["overwriting"]["run_id"] == "run-a"
    runner = Runner(load_config(path)).plan()
    try:
        assert runner.scan.to_render == 4 and runner.scan.skipped_ok == 0
        assert list_committed_shards(str(out)) == [] and "overwriting" not in runner.lease.holder()
    finally:
        runner.lease.release()


# ------------------------------------------------------------------------------------------ durable takeover
def _a_with_shards_in_flight(root, n=3):
    a = Lease.acquire(root, "run-a", ttl=0.5)
    fence = a.fence()
    shards = [f"run-a-{i:05d}" for i in range(n)]
    for s in shards:
        fence.begin(s, f"att{s[-1]}")
    return a, shards


def _all_aborted(root, shards):
    return all((commits.read(*_fs(root), s) or {}).get("aborted") for s in shards)


def test_a_takeover_answered_500_then_412_still_aborts(tmp_path, monkeypatch):
    """The takeover's swap lands but its answer is lost; the retry fails its condition against our own write
    (and the store cannot tell): the acquirer finds the record its own and still aborts the old holder's
    shards in flight, from the record it wrote. Before: it took the lease without aborting anything."""
    root = str(tmp_path / "out")
    a, shards = _a_with_shards_in_flight(root)
    _takeable(a)
    store_cls = type(a.store)
    real, lost = store_cls.replace, []

    def lost_answer(self, name, data, version):
        new = real(self, name, data, version)
        if name == LEASE_NAME and b'"took_over"' in data and not lost:
            lost.append(1)
            raise PreconditionFailed("412 on the retry of a write that landed")
        return new

    monkeypatch.setattr(store_cls, "replace", lost_answer)
    b = Lease.acquire(root, "run-b", ttl=0.5)
    monkeypatch.setattr(store_cls, "replace", real)
    assert lost and b.epoch == 2 and _all_aborted(root, shards)
    assert intents.listed(b.store) == [] and "aborting" not in read_lease(root)
    b.release()


def test_an_error_during_the_aborts_is_finished_by_the_next_acquirer(tmp_path, monkeypatch):
    root = str(tmp_path / "out")
    a, shards = _a_with_shards_in_flight(root)
    _takeable(a)
    real_abort, calls = commits.abort, []

    def failing(store, shard, by):  # the store answers 503 from the second abort on
        calls.append(shard)
        if len(calls) >= 2:
            raise OSError("503 SlowDown")
        return real_abort(store, shard, by)

    monkeypatch.setattr(commits, "abort", failing)
    with pytest.raises(OSError, match="SlowDown"):
        Lease.acquire(root, "run-b", ttl=0.5)
    monkeypatch.setattr(commits, "abort", real_abort)
    rec = read_lease_record(root)
    assert rec["run_id"] == "run-b" and rec["epoch"] == 2 and set(rec["aborting"]["shards"]) == set(shards)
    c = Lease.acquire(root, "run-c", ttl=0.5)  # b released its record, still carrying the aborts: at once
    assert c.epoch == 3 and _all_aborted(root, shards) and "aborting" not in read_lease(root)
    with pytest.raises(LeaseLost):
        a.fence().check()
    c.release()


_KILLED_DURING_ABORTS = r"""
import sys, time
from kbatch.output import commits
from kbatch.output.lease import Lease
real = commits.abort
def slow(store, shard, by):
    if shard != "run-a-00000":
        time.sleep(600)
    real(store, shard, by)
    print("aborted one", flush=True)
commits.abort = slow
Lease.acquire(sys.argv[1], "run-b", ttl=0.5)
"""


def test_a_sigkill_during_the_aborts_is_finished_by_the_next_acquirer(tmp_path):
    root = str(tmp_path / "out")
    a, shards = _a_with_shards_in_flight(root)
    _takeable(a)
    b = subprocess.Popen([sys.executable, "-c", _KILLED_DURING_ABORTS, root], stdout=subprocess.PIPE, text=True)
    try:
        assert b.stdout.readline().strip() == "aborted one"
    finally:
        b.send_signal(signal.SIGKILL)
        b.wait(30)
    rec = read_lease_record(root)
    assert rec["run_id"] == "run-b" and rec["aborting"] and not _all_aborted(root, shards)
    c = Lease.acquire(root, "run-c", ttl=0.5)  # b's process on this machine is gone: taken over at once
    assert c.epoch == 3 and _all_aborted(root, shards) and "aborting" not in read_lease(root)
    c.release()


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_the_lease_is_never_deleted_and_the_epoch_only_grows(tmp_path, backend):
    root = str(tmp_path / "out") if backend == "local" else f"memory://epochs-{uuid.uuid4().hex}/out"
    epochs = []
    for run in ("run-a", "run-b", "run-c"):
        lease = Lease.acquire(root, run)
        epochs.append(lease.epoch)
        lease.release()
        rec = read_lease_record(root)
        assert rec["state"] == "released" and rec["run_id"] == run and read_lease(root) is None
    assert epochs == [1, 2, 3]


# ------------------------------------------------------------------------------------------ _job.json, _SUCCESS
def test_an_old_holders_first_job_file_write_cannot_replace_the_new_holders(tmp_path, monkeypatch):
    """A saw no _job.json when it planned, then froze between its lease check and its write; B took over and
    wrote _job.json. A's first write is a create-if-absent: it fails, A finds the lease B's, writes nothing."""
    root = str(tmp_path / "out")
    a = Lease.acquire(root, "run-a", ttl=0.5)
    assert a.read_marker("_job.json") is None
    _takeable(a)
    b = Lease.acquire(root, "run-b", ttl=0.5)
    b.write_json("_job.json", {"run_id": "run-b"})
    real_verify, calls = Lease.verify, []

    def verify(self):  # a's check before its write passes: it ran before b's takeover
        calls.append(1)
        if len(calls) > 1:
            return real_verify(self)

    monkeypatch.setattr(Lease, "verify", verify)
    with pytest.raises(LeaseLost, match="run-b"):
        a.write_json("_job.json", {"run_id": "run-a"})
    monkeypatch.setattr(Lease, "verify", real_verify)
    assert json.loads((tmp_path / "out" / "_job.json").read_text())["run_id"] == "run-b"
    b.release()


def test_readers_trust_success_only_for_the_job_files_run_when_complete(tmp_path):
    from kbatch.run.status import summarize
    from kbatch.run.watch import read_view

    root = tmp_path / "out"
    write_shard(OutputSpec(str(root), "files", "png"), "run-x-00000", *_records(["a"], run_id="run-x"))
    (root / "_SUCCESS").write_text(json.dumps({"run_id": "run-x"}))  # an old run's (or a late) marker
    for job in ({"run_id": "run-y", "status": "running"}, {"run_id": "run-y", "status": "complete"},
                {"run_id": "run-x", "status": "failed"}):
        (root / "_job.json").write_text(json.dumps(job))
        assert summarize(str(root))["success_marker"] is False, job
        assert read_view(str(root))["success_marker"] is False, job
    (root / "_job.json").write_text(json.dumps({"run_id": "run-x", "status": "complete"}))
    assert summarize(str(root))["success_marker"] is True and read_view(str(root))["success_marker"] is True


# ------------------------------------------------------------------------------------------ no hot object
def test_writing_shards_does_not_write_the_lease_object(tmp_path):
    """Each shard's attempt is an intent object of its own; the lease object sees renewals and takeovers
    only. Before: every shard registered and deregistered itself in _lease.json (two rewrites per shard)."""
    root = str(tmp_path / "out")
    lease = Lease.acquire(root, "run-a")  # no renewer: nothing else writes the lease
    path = os.path.join(root, LEASE_NAME)
    before, content = os.stat(path), open(path, "rb").read()
    spec = OutputSpec(root, "files", "png", fence=lease.fence())
    for i in range(5):
        write_shard(spec, f"run-a-{i:05d}", *_records([f"r{i}"]))
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert open(path, "rb").read() == content
    assert len(list_committed_shards(root)) == 5 and intents.listed(lease.store) == []
    lease.release()


# ------------------------------------------------------------------------------------------ resume ordering
def test_resume_orders_runs_by_the_job_files_list_not_by_clocks(tmp_path):
    """Run "2099..." (a clock far ahead) ran first, run "2020..." after it; both left an error record for id x.
    The error that stands is the later run's, and only records of runs at or after ``trusted_since`` are
    trusted without a check. Before: the larger run id won both."""
    from kbatch.plan.manifest import ManifestSource
    from kbatch.plan.resume_scan import scan

    root = tmp_path / "out"
    first, second = "20991231T000000-aaaaaa", "20200101T000000-bbbbbb"
    spec = OutputSpec(str(root), "files", "png")
    write_shard(spec, f"{first}-00000", *_records(["x"], "error", first, "prompt: first run's error"))
    write_shard(spec, f"{second}-00000", *_records(["x"], "error", second, "prompt: second run's error"))
    (root / "_job.json").write_text(json.dumps({"run_id": second, "runs": [first, second]}))
    source = ManifestSource.from_table(pa.table({"id": ["x"], "prompt": ["p"]}), str(tmp_path))
    s = scan(source, str(root))
    assert s.failed_examples == [{"id": "x", "error": "prompt: second run's error"}]
    import kbatch

    assert kbatch.open_results(str(root)).df.error.tolist() == ["prompt: second run's error"]  # readers too
    checked = []
    scan(source, str(root), trusted_since=second, check=lambda rows, pos, first_at: checked.append(1) or ["h"])
    assert checked == []  # the standing record is the second run's: trusted
    scan(source, str(root), trusted_since=first, runs=[second, first],
         check=lambda rows, pos, first_at: checked.append(1) or ["h"])
    assert checked == []  # in that order the first run's record stands, and it is trusted too
    s = scan(source, str(root), runs=[second, first])
    assert s.failed_examples == [{"id": "x", "error": "prompt: first run's error"}]


def _fs(root):
    from kbatch.storage import get_fs

    return get_fs(root)
