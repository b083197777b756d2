"""docs/output.md "One run per output at a time": the output lease (``kbatch/output/lease.py``) on a local disk, on S3
(a moto server on loopback) and on ``memory://``.

A second run on a held output gets LeaseHeld (a ConfigError: exit 2) naming the holder; a holder whose
process is gone (this machine) or that stopped renewing (watched unchanged for its ttl on the contender's
monotonic clock) does not block; of runs racing for the same lease exactly one wins; a run whose lease was
taken over learns it at its next renewal (LeaseLost). The fencing parts (epochs, writers refused, shards in
flight aborted, guarded writes, clocks) are further down and in tests/test_fencing.py.
"""
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest

from kbatch.config import ConfigError
from kbatch.output.lease import (LEASE_NAME, Fenced, Lease, LeaseHeld, LeaseLost, LeaseUnsupported, _machine,
                                  dead_reason, looks_recent, read_lease)
from kbatch.output import intents
from kbatch.storage import get_fs, join

OTHER_HOST = "some-other-host.invalid"


def _record(**over):
    """A lease as another run would have written it: this machine, this process, renewed just now."""
    now = time.time()
    rec = {"run_id": "earlier-run", **_machine(), "pid": os.getpid(), "pid_started": None,
           "started": "2026-01-01T00:00:00+00:00", "started_epoch": now, "renewed": "recently",
           "renewed_epoch": now, "ttl": 120.0, "token": uuid.uuid4().hex}
    rec.update(over)
    return rec


def _put(root, rec, storage_options=None):
    """Write a lease object directly (bypassing the module), as a crashed or foreign run left it."""
    fs, path = get_fs(root, storage_options)
    data = rec if isinstance(rec, bytes) else json.dumps(rec).encode()
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(join(path, LEASE_NAME), data)
    fs.invalidate_cache()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # exited and reaped: the pid is gone
    return proc.pid


# ---------------------------------------------------------------------------------------- local disk
def test_acquire_held_release(tmp_path):
    root = str(tmp_path / "out")
    a = Lease.acquire(root, "run-a")
    content = read_lease(root)
    assert content == a.holder()
    assert content["run_id"] == "run-a" and content["pid"] == os.getpid()
    assert content["host"] == socket.gethostname() and content["token"] and content["ttl"] == 120.0
    assert content["renewed"].endswith("+00:00") and content["pid_started"] > 0

    with pytest.raises(LeaseHeld) as err:
        Lease.acquire(root, "run-b")
    msg = str(err.value)
    assert isinstance(err.value, ConfigError)  # -> exit code 2
    assert "'run-a'" in msg and socket.gethostname() in msg and f"pid {os.getpid()}" in msg
    assert os.path.join(root, LEASE_NAME) in msg
    assert err.value.holder["run_id"] == "run-a"
    assert read_lease(root)["token"] == a.token  # the loser changed nothing

    a.release()
    assert read_lease(root) is None
    a.release()  # twice: no error
    b = Lease.acquire(root, "run-b")
    assert read_lease(root)["run_id"] == "run-b"
    os.unlink(os.path.join(root, LEASE_NAME))
    b.release()  # already gone: no error


def test_renew_refreshes_and_context_manager_releases(tmp_path):
    root = str(tmp_path)
    with Lease.acquire(root, "run-a") as a:
        first = read_lease(root)["renewed_epoch"]
        time.sleep(0.05)
        a.renew()
        assert read_lease(root)["renewed_epoch"] > first
        assert read_lease(root)["started_epoch"] == a.holder()["started_epoch"]
    assert read_lease(root) is None


def test_dead_process_on_this_machine_is_taken_over_at_once(tmp_path):
    root = str(tmp_path)
    _put(root, _record(pid=_dead_pid()))  # renewed just now, but its process is gone
    lease = Lease.acquire(root, "rerun")
    assert read_lease(root)["run_id"] == "rerun"
    assert "is gone" in lease.holder()["took_over"]["reason"]


def test_reused_pid_is_not_the_holder(tmp_path):
    root = str(tmp_path)
    started = psutil.Process().create_time()
    # our own (live) pid, but a process start time that is not ours: the pid was reused
    _put(root, _record(pid=os.getpid(), pid_started=started - 1000))
    Lease.acquire(root, "rerun")
    # the same pid with the right start time is a live holder
    _put(root, _record(pid=os.getpid(), pid_started=started))
    with pytest.raises(LeaseHeld):
        Lease.acquire(root, "rerun-2")


def test_other_machine_is_watched_for_its_ttl_then_taken_over(tmp_path):
    root = str(tmp_path)
    lease_file = os.path.join(root, LEASE_NAME)
    now = time.time()
    # a live pid, but on another host: it cannot be probed; written just now by the storage's clock: held
    _put(root, _record(host=OTHER_HOST, renewed_epoch=now - 5, ttl=120))
    with pytest.raises(LeaseHeld, match=OTHER_HOST):
        Lease.acquire(root, "b")
    # its own clock says "renewed long ago", but the file was written just now: held, no clock compared
    _put(root, _record(host=OTHER_HOST, renewed_epoch=now - 500, ttl=120))
    with pytest.raises(LeaseHeld):
        Lease.acquire(root, "b")

    # old by the storage's clock: not taken at once, but watched for the holder's ttl (1 s) on this run's
    # monotonic clock, then taken over because it did not change
    _put(root, _record(host=OTHER_HOST, renewed_epoch=now - 500, ttl=1.0))
    os.utime(lease_file, (now - 500, now - 500))
    t0 = time.monotonic()
    lease = Lease.acquire(root, "b")
    assert time.monotonic() - t0 >= 1.0
    assert read_lease(root)["run_id"] == "b"
    assert "did not change for 1 s" in lease.holder()["took_over"]["reason"]
    assert lease.epoch == 1 and read_lease(root)["epoch"] == 1  # the foreign record had no epoch: 0 + 1


def test_a_lease_that_changes_while_watched_is_held(tmp_path):
    """The holder renews while the contender watches: a live holder (exit 2), whatever the timestamps say."""
    root = str(tmp_path)
    lease_file = os.path.join(root, LEASE_NAME)
    old = time.time() - 500
    _put(root, _record(host=OTHER_HOST, renewed_epoch=old, ttl=2.0))
    os.utime(lease_file, (old, old))

    def renew_later():
        time.sleep(0.5)
        _put(root, _record(host=OTHER_HOST, renewed_epoch=old, ttl=2.0, renewals=1))
        os.utime(lease_file, (old, old))  # its mtime still says "old": only the change counts

    t = threading.Thread(target=renew_later)
    t.start()
    with pytest.raises(LeaseHeld, match="renewed while this run watched it"):
        Lease.acquire(root, "b")
    t.join()
    assert read_lease(root)["run_id"] == "earlier-run"


def test_corrupt_lease_is_held_until_watched(tmp_path):
    root = str(tmp_path)
    _put(root, b'{"run_id": "half-writ')
    with pytest.raises(LeaseHeld, match="unreadable"):
        Lease.acquire(root, "b", ttl=60)
    assert read_lease(root)["unreadable"] is True
    old = time.time() - 120
    os.utime(os.path.join(root, LEASE_NAME), (old, old))
    Lease.acquire(root, "b", ttl=0.5)  # watched for its own ttl (the holder's is unknown)
    assert read_lease(root)["run_id"] == "b"


def test_renew_after_takeover_raises_lease_lost(tmp_path):
    root = str(tmp_path)
    a = Lease.acquire(root, "run-a", ttl=0.3)
    time.sleep(1.2)  # a stops renewing (hung): both its clock and the file's mtime pass the ttl
    b = Lease.acquire(root, "run-b")
    with pytest.raises(LeaseLost, match="run-b"):
        a.renew()
    assert not a.held
    a.release()  # not ours any more: b's lease stays
    assert read_lease(root)["run_id"] == "run-b"
    b.renew()
    b.release()
    assert read_lease(root) is None


def test_lease_removed_under_a_run_is_lost(tmp_path):
    a = Lease.acquire(str(tmp_path), "run-a")
    os.unlink(os.path.join(tmp_path, LEASE_NAME))
    with pytest.raises(LeaseLost, match="removed"):
        a.renew()


def _contend(root, start_at, results, done):
    time.sleep(max(0.0, start_at - time.time()))
    try:
        lease = Lease.acquire(root, f"racer-{os.getpid()}")
        results.put(("won", lease.token))
    except LeaseHeld:
        results.put(("held", None))
    except Exception as e:  # noqa: BLE001
        results.put(("error", repr(e)))
    done.wait(30)  # stay alive (a live holder) until every racer has tried


@pytest.mark.parametrize("initial", ["stale", "dead", "none"])
def test_processes_racing_exactly_one_wins(tmp_path, initial):
    root = str(tmp_path)
    if initial == "stale":
        old = time.time() - 1000
        _put(root, _record(host=OTHER_HOST, renewed_epoch=old, ttl=1.0))  # every racer watches it 1 s
        os.utime(os.path.join(root, LEASE_NAME), (old, old))
    elif initial == "dead":
        _put(root, _record(pid=_dead_pid()))
    ctx = multiprocessing.get_context("fork")
    results, done = ctx.Queue(), ctx.Event()
    start_at = time.time() + 0.5
    procs = [ctx.Process(target=_contend, args=(root, start_at, results, done)) for _ in range(8)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=30) for _ in procs]
        winners = [token for kind, token in outcomes if kind == "won"]
        assert sorted(kind for kind, _ in outcomes) == ["held"] * 7 + ["won"], outcomes
        assert read_lease(root)["token"] == winners[0]
    finally:
        done.set()
        for p in procs:
            p.join(10)


def test_dead_and_recent_rules():
    now = time.time()
    assert dead_reason(_record()) is None  # this process: alive
    assert dead_reason(_record(pid=_dead_pid()))
    assert dead_reason(_record(host=OTHER_HOST, pid=_dead_pid())) is None  # not probed
    # same host name, but another boot or pid namespace (a container, a rebooted machine): not probed either
    assert dead_reason(_record(pid=_dead_pid(), boot_id="another-boot")) is None
    assert dead_reason(_record(pid=_dead_pid(), pid_namespace="pid:[1]")) is None
    # no boot id on one side (no /proc): two machines with one hostname must not take each other as dead
    assert dead_reason(_record(pid=_dead_pid(), boot_id=None)) is None
    me_without_proc = {**_machine(), "boot_id": None}
    assert dead_reason(_record(pid=_dead_pid()), me_without_proc) is None
    # "recent" is only a hint (exit 2 at once rather than watch): never a reason to take over
    assert looks_recent(None, now - 10, 60, now=now)
    assert not looks_recent(None, now - 61, 60, now=now)
    assert not looks_recent(None, now + 300, 60, now=now)  # in the future: the clocks disagree, watch it
    assert looks_recent(_record(renewed_epoch=now - 1), None, 60, now=now)  # no storage time: its stamp


# ---------------------------------------------------------------------------------------- memory://
def test_memory_lease():
    root = f"memory://lease-{uuid.uuid4().hex}/out"
    a = Lease.acquire(root, "run-a")
    assert a.path.startswith("memory://") and a.path.endswith(f"/out/{LEASE_NAME}")
    with pytest.raises(LeaseHeld, match="'run-a'"):
        Lease.acquire(root, "run-b")
    a.release()
    b = Lease.acquire(root, "run-b")
    _put(root, _record(pid=_dead_pid()))
    c = Lease.acquire(root, "run-c")
    with pytest.raises(LeaseLost):
        b.renew()
    c.renew()
    c.release()
    assert read_lease(root) is None


def _race_threads(root, n=8, storage_options=None):
    barrier = threading.Barrier(n)
    outcomes = []

    def go(i):
        barrier.wait()
        try:
            Lease.acquire(root, f"racer-{i}", storage_options)
            outcomes.append("won")
        except LeaseHeld:
            outcomes.append("held")
        except Exception as e:  # noqa: BLE001
            outcomes.append(repr(e))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return sorted(outcomes)


def test_memory_threads_racing_exactly_one_wins(monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    slow_read = MemoryFileSystem.cat_file

    def cat_file(self, path, *args, **kwargs):
        data = slow_read(self, path, *args, **kwargs)
        time.sleep(0.005)  # widen the window between a check and a write, as a busy machine would
        return data

    monkeypatch.setattr(MemoryFileSystem, "cat_file", cat_file)
    for initial in ("none", "dead", "dead"):
        root = f"memory://lease-{uuid.uuid4().hex}"
        if initial == "dead":
            _put(root, _record(pid=_dead_pid()))
        assert _race_threads(root) == ["held"] * 7 + ["won"], initial


# ---------------------------------------------------------------------------------------- S3 (moto)
s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
from moto_s3 import aws_env, moto_server  # noqa: E402

BUCKET = "kbatch-lease"
AWS_ENV = aws_env("AKIAKBATCHLEASETEST1", "kbatch-lease-secret")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback; this process's env points botocore (and so s3fs) at it."""
    with moto_server(AWS_ENV):
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs


def _s3_root():
    return f"s3://{BUCKET}/out/{uuid.uuid4().hex}"


def test_s3_acquire_held_release(s3):
    root = _s3_root()
    a = Lease.acquire(root, "run-a")
    assert a.path == f"{root}/{LEASE_NAME}"
    assert read_lease(root) == a.holder()
    with pytest.raises(LeaseHeld) as err:
        Lease.acquire(root, "run-b")
    assert "'run-a'" in str(err.value) and f"pid {os.getpid()}" in str(err.value) and a.path in str(err.value)
    a.renew()
    a.release()
    assert read_lease(root) is None
    a.release()
    Lease.acquire(root, "run-b").release()


def test_s3_takeover_and_lease_lost(s3):
    root = _s3_root()
    b = Lease.acquire(root, "run-b")
    _put(root, _record(pid=_dead_pid()))  # another run took over from b meanwhile, then died
    with pytest.raises(LeaseLost):
        b.renew()  # If-Match on b's etag fails
    b.release()  # not ours: stays
    assert read_lease(root)["run_id"] == "earlier-run"

    c = Lease.acquire(root, "run-c")  # dead process on this machine: taken over at once
    assert "is gone" in c.holder()["took_over"]["reason"]

    # a holder on another machine whose own clock says "renewed long ago": held while the object's
    # LastModified (the server's clock) is younger than the ttl; then watched for its ttl and taken over
    _put(root, _record(host=OTHER_HOST, renewed_epoch=time.time() - 600, ttl=2))
    with pytest.raises(LeaseLost):
        c.renew()
    with pytest.raises(LeaseHeld, match=OTHER_HOST):
        Lease.acquire(root, "run-d")
    time.sleep(3.1)  # S3's LastModified has one-second resolution
    d = Lease.acquire(root, "run-d")
    assert "did not change for 2 s" in d.holder()["took_over"]["reason"]
    d.release()


def test_s3_threads_racing_exactly_one_wins(s3):
    for initial in ("none", "dead"):
        root = _s3_root()
        if initial == "dead":
            _put(root, _record(pid=_dead_pid()))
        outcomes = _race_threads(root)
        assert outcomes == ["held"] * 7 + ["won"], (initial, outcomes)


# ---------------------------------------------------------------------------------------- every backend
@pytest.fixture(params=["local", "memory", "s3"])
def any_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    if request.param == "memory":
        return f"memory://lease-{uuid.uuid4().hex}"
    request.getfixturevalue("s3")
    return _s3_root()


def _store_class(root):
    return type(Lease(root, "probe")._store)


def test_create_does_not_overwrite_a_lease_created_meanwhile(any_root, monkeypatch):
    """Another run creates the lease between this run's look (nothing there) and its create: the create
    must fail (O_EXCL / If-None-Match), not overwrite the other run's lease."""
    cls = _store_class(any_root)
    real_read = cls.read
    calls = []

    def read(self, name):
        if name != LEASE_NAME:
            return real_read(self, name)
        calls.append(1)
        if len(calls) == 1:
            Lease.acquire(any_root, "sneaky")  # lands just after our look
            return None
        return real_read(self, name)

    monkeypatch.setattr(cls, "read", read)
    with pytest.raises(LeaseHeld, match="sneaky"):
        Lease.acquire(any_root, "slow")
    monkeypatch.setattr(cls, "read", real_read)
    assert read_lease(any_root)["run_id"] == "sneaky"


def test_takeover_does_not_overwrite_a_lease_changed_meanwhile(any_root, monkeypatch):
    """This run judged the lease stale, but another run took it over before this run's swap: the swap must
    fail (compare against what was judged: bytes under a lock / If-Match), not overwrite the new holder."""
    _put(any_root, _record(pid=_dead_pid()))
    cls = _store_class(any_root)
    real_read = cls.read
    stale = real_read(Lease(any_root, "probe")._store, LEASE_NAME)
    Lease.acquire(any_root, "quick")  # took it over first
    calls = []

    def read(self, name):
        if name != LEASE_NAME:
            return real_read(self, name)
        calls.append(1)
        return stale if len(calls) == 1 else real_read(self, name)  # our look saw the dead holder

    monkeypatch.setattr(cls, "read", read)
    with pytest.raises(LeaseHeld, match="quick"):
        Lease.acquire(any_root, "slow")
    monkeypatch.setattr(cls, "read", real_read)
    assert read_lease(any_root)["run_id"] == "quick"


# ---------------------------------------------------------------------------------------- fencing (docs/output.md)
def _make_takeable(root, lease):
    """``lease`` stops renewing (frozen): wait until the storage's clock calls its object old, so that a
    contender watches it (for its ttl) and takes it over."""
    time.sleep(lease.ttl + (1.1 if root.startswith("s3://") else 0.1))  # S3's LastModified: 1 s resolution


def test_takeover_bumps_the_epoch_and_fences_the_old_holder(any_root):
    a = Lease.acquire(any_root, "run-a", ttl=1.0)
    fence_a = a.fence()
    fence_a.begin("run-a-00001", "att1")  # a shard of a's in flight: its intent, not the lease
    assert [s for s, _, _ in intents.listed(a.store)] == ["run-a-00001"] and a.epoch == 1
    assert "open" not in read_lease(any_root)
    _make_takeable(any_root, a)
    b = Lease.acquire(any_root, "run-b", ttl=1.0)
    assert b.epoch == 2 and read_lease(any_root)["epoch"] == 2 and b.token != a.token
    # the shard a had in flight was aborted before b returned: a's late commit can never land
    from kbatch.output import commits

    fs, path = get_fs(any_root)
    rec = commits.read(fs, path, "run-a-00001")
    assert rec["aborted"] and rec["by"]["run_id"] == "run-b" and rec["by"]["epoch"] == 2
    assert commits.create(b.store, "run-a-00001", {"shard": "run-a-00001", "attempt": "late"}) is not None
    assert intents.listed(b.store) == [] and "aborting" not in read_lease(any_root)  # done, then cleared
    # every write path of a is refused, naming b
    with pytest.raises(Fenced, match="run-b"):
        fence_a.begin("run-a-00002", "att2")
    assert intents.listed(b.store) == []  # the refused attempt's intent is gone again
    with pytest.raises(Fenced, match="run-b"):
        fence_a.check()
    with pytest.raises(LeaseLost, match="run-b"):
        a.write_json("_job.json", {"run_id": "run-a"})
    with pytest.raises(LeaseLost, match="run-b"):
        a.renew()
    assert not fs.exists(join(path, "_job.json"))
    # b's own writes go through
    b.write_json("_job.json", {"run_id": "run-b"})
    b.fence().begin("run-b-00000", "att3")
    a.release()  # not a's: b's lease stays
    assert read_lease(any_root)["run_id"] == "run-b"
    b.release()
    assert read_lease(any_root) is None
    # b ended with a shard still in flight: aborted at release, so a write still in flight commits nothing
    assert commits.read(fs, path, "run-b-00000")["aborted"]


def test_renewer_keeps_a_live_lease_and_retries_storage_errors(any_root, monkeypatch):
    a = Lease.acquire(any_root, "run-a", ttl=1.0)
    store_cls = type(a._store)
    real_replace = store_cls.replace
    failures = {"left": 2}

    def flaky(self, name, data, version):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError("503 SlowDown")
        return real_replace(self, name, data, version)

    monkeypatch.setattr(store_cls, "replace", flaky)
    a.start_renewing()
    try:
        time.sleep(1.5)
        assert failures["left"] == 0 and a.lost is None  # two failed renewals, retried within the ttl
        assert read_lease(any_root)["renewals"] >= 2
        a.check()

        def down(self, name, data, version):
            raise OSError("503 SlowDown")

        monkeypatch.setattr(store_cls, "replace", down)
        deadline = time.monotonic() + 5
        while a.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.lost and "could not renew" in a.lost and "503" in a.lost
        with pytest.raises(LeaseLost, match="could not renew"):
            a.check()
    finally:
        a.stop_renewing()
        monkeypatch.setattr(store_cls, "replace", real_replace)
        a.release()


def test_a_contender_whose_clock_is_far_ahead_does_not_take_a_live_lease(any_root, monkeypatch):
    """The holder renews (its own thread, the true clock); the contender's clock is 200 s fast: by the
    timestamps the lease looks 200 s old, but the contender watches it change and leaves it (exit 2)."""
    import kbatch.output.lease as lease_mod

    a = Lease.acquire(any_root, "run-a", ttl=1.0)
    a.start_renewing()
    real_now = lease_mod._now
    main = threading.main_thread()
    monkeypatch.setattr(lease_mod, "_now",
                        lambda: real_now() + (200.0 if threading.current_thread() is main else 0.0))
    try:
        with pytest.raises(LeaseHeld, match="run-a"):
            Lease.acquire(any_root, "run-fast-clock", ttl=1.0)
        assert read_lease(any_root)["run_id"] == "run-a" and a.lost is None
    finally:
        a.release()


def test_release_is_best_effort(tmp_path, monkeypatch):
    a = Lease.acquire(str(tmp_path), "run-a")
    monkeypatch.setattr(type(a._store), "replace", lambda self, *a: (_ for _ in ()).throw(OSError("EIO")))
    a.release()  # a storage error at the very end never turns a finished run into a crash
    assert not a.held


def test_a_filesystem_without_locks_is_refused(tmp_path, monkeypatch):
    import errno

    import kbatch.storage.local_store as local_store

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(local_store.fcntl, "flock", no_locks)
    with pytest.raises(ConfigError, match="refuses flock") as err:  # the store's probe at acquire
        Lease.acquire(str(tmp_path / "out"), "run-a")
    assert isinstance(err.value, ConfigError)  # exit 2, before anything is written
    assert not os.path.exists(tmp_path / "out" / LEASE_NAME)


def test_a_store_without_conditional_writes_is_refused(monkeypatch):
    """A filesystem without conditional writes kbatch can use (no create-if-absent / replace-if-version, e.g.
    sftp or http): refused with a message naming the store, never run unfenced. A stand-in class whose
    protocol is "nocond"."""
    from fsspec.implementations.memory import MemoryFileSystem

    class NoConditions(MemoryFileSystem):
        protocol = ("nocond",)
        store, pseudo_dirs = {}, [""]

    import importlib

    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, "nocond", NoConditions)
    with pytest.raises(LeaseUnsupported, match="nocond") as err:
        Lease.acquire("nocond://bucket/out", "run-a")
    assert isinstance(err.value, ConfigError) and "s3://" in str(err.value)


def test_reprs_mask_secrets(tmp_path):
    from kbatch.config import JobConfig
    from kbatch.output.writer import OutputSpec

    secret = {"key": "AKIA-VISIBLE-KEY-ID", "secret": "s3cr3t-value"}
    lease = Lease.acquire(str(tmp_path), "run-a", storage_options=secret)
    try:
        for obj in (lease, lease.fence(), OutputSpec(str(tmp_path), storage_options=secret),
                    JobConfig(storage_options=secret)):
            assert "s3cr3t-value" not in repr(obj) and "AKIA-VISIBLE" not in repr(obj), type(obj)
        assert lease.token not in repr(lease) and lease.token not in repr(lease.fence())
    finally:
        lease.release()


def test_one_commit_per_shard_on_every_store(any_root):
    """A second attempt of a committed shard (a resend that raced the first) creates no second commit record:
    If-None-Match on S3, a hard link (O_EXCL) on disk, a locked check on memory://. It is answered with the
    first attempt's stats and its own objects are removed."""
    import numpy as np

    from kbatch.output import commits
    from kbatch.output.writer import OutputSpec, commit_shard, read_records, write_shard

    lease = Lease.acquire(any_root, "run-a")
    spec = OutputSpec(any_root, "files", "png", fence=lease.fence())
    records = [{"id": "x", "image_index": 0, "status": "ok"}, {"id": "y", "status": "error", "error": "p: bad"}]
    first = write_shard(spec, "run-a-00000", records, [np.zeros((8, 8, 3), np.uint8), None])
    late = commit_shard(spec, "run-a-00000", records, [], 0, time.time(), n_ok=1, attempt="late0attempt")
    assert late.attempt == first.attempt and (late.rows, late.images, late.errors) == (2, 1, 1)
    fs, path = get_fs(any_root)
    assert commits.read(fs, path, "run-a-00000")["attempt"] == first.attempt
    assert not fs.exists(join(path, "meta", "run-a-00000~late0attempt.parquet"))
    assert sorted(read_records(any_root).id) == ["x", "y"]
    lease.release()


def test_s3_job_file_write_of_an_old_holder_fails_after_a_takeover(s3, monkeypatch):
    """S3 has no conditional write across two objects: an old holder that passed its lease check just before
    a takeover (frozen between that check and its PUT) is stopped by If-Match on _job.json, which the run
    taking over rewrote first."""
    root = _s3_root()
    a = Lease.acquire(root, "run-a", ttl=1.0)
    a.write_json("_job.json", {"run_id": "run-a", "n": 1})
    _make_takeable(root, a)
    b = Lease.acquire(root, "run-b", ttl=1.0)
    fs, path = get_fs(root)
    marked = json.loads(fs.cat_file(join(path, "_job.json")))
    assert marked["lease_taken_over"] == {"by": "run-b", "epoch": 2, "from": "run-a"}
    real_verify, calls = Lease.verify, []

    def verify(self):  # a's first check passes: it ran before b's takeover
        calls.append(self.run_id)
        if len(calls) > 1:
            return real_verify(self)

    monkeypatch.setattr(Lease, "verify", verify)
    with pytest.raises(LeaseLost, match="run-b"):
        a.write_json("_job.json", {"run_id": "run-a", "n": 2})
    assert json.loads(fs.cat_file(join(path, "_job.json"))) == marked
    monkeypatch.setattr(Lease, "verify", real_verify)
    b.write_json("_job.json", {"run_id": "run-b"})
    assert json.loads(fs.cat_file(join(path, "_job.json"))) == {"run_id": "run-b"}
    b.release()


def test_s3_overwrite_supersedes_commits_and_removes_objects(s3):
    """--overwrite on S3 (kbatch.output.overwrite): commit records become aborts (never deleted), the data
    objects go in lease-checked batches, a file that is not kbatch's stays, and the run's lease is kept."""
    import numpy as np

    from kbatch.output import commits
    from kbatch.output.overwrite import overwrite
    from kbatch.output.writer import OutputSpec, list_committed_shards, write_shard

    root = _s3_root()
    for s in ("old-00000", "old-00001"):
        write_shard(OutputSpec(root, "files", "png"), s, [{"id": s, "image_index": 0, "status": "ok"}],
                    [np.zeros((8, 8, 3), np.uint8)])
    fs, path = get_fs(root)
    fs.pipe_file(join(path, "notes.txt"), b"a user's file")
    with Lease.acquire(root, "run-a") as a:
        counts = overwrite(a, batch=2)  # four objects per shard: several batches, each after a lease check
        assert counts == {"aborted": 2, "removed": 6}
        assert list_committed_shards(root) == [] and a.held
    fs.invalidate_cache()
    assert all(commits.read(fs, path, s)["aborted"] for s in ("old-00000", "old-00001"))
    assert not fs.find(join(path, "images")) and not fs.find(join(path, "meta"))
    assert fs.cat_file(join(path, "notes.txt")) == b"a user's file"
