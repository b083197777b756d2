"""The conditional-write interface (kbatch/storage/conditional.py), one body per property over every backend:
a local folder, memory://, S3 (moto) and GCS (fake-gcs-server). Also: the probe refusing a server that ignores
If-None-Match / If-Match, network filesystems from a /proc/mounts sample, and local fsyncs of the folder."""
from __future__ import annotations

import os
import pickle
import stat
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_gcs import fake_gcs_server  # noqa: E402
from fault_front import FaultFront  # noqa: E402
from moto_s3 import aws_env, moto_server  # noqa: E402

from kbatch.config import ConfigError  # noqa: E402
from kbatch.storage import (ConditionalWritesUnsupported, PreconditionFailed, Versioned,  # noqa: E402
                            conditional_store, get_fs, join, probe_conditional_writes, store_for,
                            sync_folders, write_bytes_atomic, write_exclusive)
from kbatch.storage.local_store import (LocalStore, LockTimeout, NetworkFilesystemUnsupported,  # noqa: E402
                                        file_lock, network_mount)

BACKENDS = ["local", "memory", "s3", "gcs"]


@pytest.fixture(scope="module")
def moto_url():
    with moto_server(aws_env("kbatch-test", "kbatch-test")) as url:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("kbatch-bucket")
        yield url


@pytest.fixture(scope="module")
def gcs():
    with fake_gcs_server() as g:
        g.make_bucket("kbatch-bucket")
        yield g


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    root = f"t-{uuid.uuid4().hex[:8]}"
    if request.param == "local":
        return conditional_store(str(tmp_path / root))
    if request.param == "memory":
        return conditional_store(f"memory://{root}")
    if request.param == "s3":
        request.getfixturevalue("moto_url")
        return conditional_store(f"s3://kbatch-bucket/{root}")
    g = request.getfixturevalue("gcs")
    return conditional_store(f"gs://kbatch-bucket/{root}", g.storage_options())


def test_conditions_hold(store):
    v1 = store.create("_lease.json", b"one")
    with pytest.raises(PreconditionFailed):
        store.create("_lease.json", b"two")  # create twice
    seen = store.read("_lease.json")
    assert isinstance(seen, Versioned) and seen.data == b"one" and seen.version == v1
    v2 = store.replace("_lease.json", b"three", v1)
    assert v2 != v1 and store.read("_lease.json").data == b"three"
    with pytest.raises(PreconditionFailed):
        store.replace("_lease.json", b"four", v1)  # a stale version
    with pytest.raises(PreconditionFailed):
        store.delete("_lease.json", v1)  # a stale version
    assert store.read("_lease.json").data == b"three"
    store.create("_commits/s1.json", b"c1")
    store.create("_commits/s0.json", b"c0")
    assert store.list("_commits/") == ["_commits/s0.json", "_commits/s1.json"]
    assert store.list() == ["_commits/s0.json", "_commits/s1.json", "_lease.json"]
    assert pickle.loads(pickle.dumps(store)).read("_lease.json").version == v2  # stores travel to Ray actors
    store.delete("_lease.json", v2)
    assert store.read("_lease.json") is None
    store.delete("_lease.json", v2)  # already gone: done
    with pytest.raises(PreconditionFailed):
        store.replace("_lease.json", b"five", v2)  # nothing to replace
    with pytest.raises(ValueError):
        store.create("../escape", b"x")


def test_concurrent_replaces_lose_no_update(store):
    """A counter incremented by replace-if-version from 4 threads: every successful replace counts once."""
    import json
    import threading

    store.create("n.json", json.dumps({"n": 0}).encode())
    wins = []

    def work():
        done = 0
        while done < 6:
            seen = store.read("n.json")
            n = json.loads(seen.data)["n"]
            try:
                store.replace("n.json", json.dumps({"n": n + 1, "by": uuid.uuid4().hex}).encode(), seen.version)
            except PreconditionFailed:
                continue
            done += 1
            wins.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(wins) == 24 and json.loads(store.read("n.json").data)["n"] == 24


def _lose_first_answer(monkeypatch, store, method: str, write_instead: bytes | None = None):
    """The store's first ``method`` call lands (with ``write_instead`` if given: another writer's bytes),
    then raises as a reset connection would; later calls go through."""
    real = getattr(store, method)
    calls = []

    def flaky(name, data, *version):
        calls.append(name)
        out = real(name, data if write_instead is None else write_instead, *version)
        if len(calls) == 1:
            raise ConnectionResetError("connection reset after the write landed")
        return out

    monkeypatch.setattr(store, method, flaky)
    return calls


def test_lost_answer_is_settled_by_reading_back(store, monkeypatch):
    calls = _lose_first_answer(monkeypatch, store, "_create")
    version = store.create("_commits/s1.json", b"ours nonce=1")  # retried into 412: our bytes are there
    assert len(calls) == 2 and store.read("_commits/s1.json") == Versioned(
        b"ours nonce=1", version, store.read("_commits/s1.json").modified)
    monkeypatch.undo()

    calls = _lose_first_answer(monkeypatch, store, "_replace")
    v2 = store.replace("_commits/s1.json", b"ours nonce=2", version)
    assert len(calls) == 2 and store.read("_commits/s1.json").version == v2
    monkeypatch.undo()

    # the create that landed was someone else's: the retry's 412 stands
    _lose_first_answer(monkeypatch, store, "_create", write_instead=b"theirs")
    with pytest.raises(PreconditionFailed):
        store.create("_commits/s2.json", b"ours nonce=3")
    assert store.read("_commits/s2.json").data == b"theirs"


def test_probe_accepts_every_backend_and_cleans_up(store):
    probe_conditional_writes(store)
    assert store.list("_probe") == []


def test_write_exclusive_goes_through_the_backend(store):
    fs, root = (store.fs, store.root) if hasattr(store, "fs") else get_fs(store.url)
    assert write_exclusive(fs, join(root, "_commits/x.json"), b"a") is True
    assert write_exclusive(fs, join(root, "_commits/x.json"), b"b") is False
    assert store.read("_commits/x.json").data == b"a"


class ConditionIgnoringFront(FaultFront):
    """An S3-compatible server that ignores If-None-Match and If-Match (moto behind a front that drops them)."""

    async def _handle(self, request, session):
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("if-none-match", "if-match")}
        return await super()._handle(request.clone(headers=headers), session)


def test_probe_refuses_a_server_that_ignores_conditional_writes(moto_url):
    import s3fs

    with ConditionIgnoringFront(moto_url) as front:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=front.url)
        store = store_for(fs, "kbatch-bucket/ignoring")
        with pytest.raises(ConditionalWritesUnsupported) as e:
            probe_conditional_writes(store)
        assert isinstance(e.value, ConfigError)  # exit 2
        message = str(e.value)
        assert front.url in message and "second create-if-absent" in message
        assert "s3://kbatch-bucket/ignoring" in message
        assert store.list("_probe") == []  # cleaned up
        assert front.counts["requests"] >= 3


def test_a_run_on_a_server_that_ignores_conditional_writes_exits_2(moto_url, tmp_path):
    """Before: such a run exited 0 and wrote its commits as if they were safe. Now it is refused at acquire,
    before anything is written, naming the server and the test."""
    import subprocess

    import s3fs

    from cli_helpers import env as cli_env
    from cli_helpers import write_job
    from conftest import sim_models, tiny_config

    out = "s3://kbatch-bucket/ignored-run"
    path = write_job(tmp_path, tiny_config(sim_models(), out), [{"id": "a", "prompt": "a fox"}])
    with ConditionIgnoringFront(moto_url) as front:
        e = cli_env()
        e["AWS_ENDPOINT_URL"] = front.url
        p = subprocess.run([sys.executable, "-m", "kbatch.cli", "run", path], capture_output=True, text=True,
                           timeout=300, env=e)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert front.url in p.stderr and "second create-if-absent" in p.stderr
    assert s3fs.S3FileSystem(skip_instance_cache=True).find("kbatch-bucket/ignored-run") == []


MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
fs1:/export/home /nfshome nfs4 rw,vers=4.2,addr=10.0.0.1,local_lock=none 0 0
fs1:/export/scratch /scratch nfs rw,vers=3,nolock,addr=10.0.0.1 0 0
fs2:/data /data nfs4 rw,vers=4.1,local_lock=flock 0 0
10.0.0.2@tcp:/lustre /mnt/lustre lustre rw,localflock 0 0
10.0.0.2@tcp:/lustre2 /mnt/lustre2 lustre rw,flock 0 0
gcsfuse-bucket /mnt/my\\040bucket fuse.gcsfuse rw,nosuid 0 0
/dev/nvme0n1 /scratch/alice xfs rw 0 0
"""


def test_network_filesystems_with_per_node_locks_are_detected_from_proc_mounts():
    assert network_mount("/scratch/job/out", MOUNTS) == ("/scratch", "nfs")  # nolock
    assert network_mount("/data/out", MOUNTS) == ("/data", "nfs4")  # local_lock=flock
    assert network_mount("/mnt/lustre/job/out", MOUNTS) == ("/mnt/lustre", "lustre")  # localflock
    assert network_mount("/mnt/my bucket/out", MOUNTS) == ("/mnt/my bucket", "fuse.gcsfuse")
    # trusted: NFS locks held by the server, Lustre mounted flock; local disks, also inside a network mount
    assert network_mount("/nfshome/alice/out", MOUNTS) is None
    assert network_mount("/mnt/lustre2/out", MOUNTS) is None
    assert network_mount("/scratch/alice/out", MOUNTS) is None
    assert network_mount("/tmp/out", MOUNTS) is None and network_mount("/srv/out", MOUNTS) is None
    assert network_mount("/scratchpad/out", MOUNTS) is None  # /scratch is not a prefix of /scratchpad


def test_a_network_filesystem_is_refused_with_its_mount(tmp_path):
    store = LocalStore(str(tmp_path / "out"), mount=("/data", "nfs4"))
    with pytest.raises(NetworkFilesystemUnsupported) as e:
        probe_conditional_writes(store)
    assert isinstance(e.value, ConfigError)
    assert "nfs4 mounted at /data" in str(e.value) and str(tmp_path / "out") in str(e.value)
    v = store.create("_commits/s1.json", b"a")  # link() stays exclusive across nodes
    with pytest.raises(NetworkFilesystemUnsupported):
        store.replace("_commits/s1.json", b"b", v)


def test_local_writes_fsync_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store = LocalStore(str(tmp_path / "out"), mount=False)
    v = store.create("_commits/s1.json", b"a")
    folder = str(tmp_path / "out" / "_commits")
    assert ("dir", folder) in synced and any(k == "file" and p.startswith(folder) for k, p in synced)
    assert ("dir", str(tmp_path / "out")) in synced  # the new _commits folder's own name
    synced.clear()
    store.replace("_commits/s1.json", b"b", v)
    assert ("dir", folder) in synced
    synced.clear()
    store.delete("_commits/s1.json", store.read("_commits/s1.json").version)
    assert ("dir", folder) in synced
    assert os.listdir(folder) == []  # a deleted name leaves no lock file behind
    # a shard's files (contents fsynced, names not yet): their folders are synced once, before its commit
    fs, root = get_fs(str(tmp_path / "out"))
    files = [join(root, f) for f in ("images/s1~a/x.png", "images/s1~a/y.png", "meta/s1~a.parquet")]
    for f in files:
        write_bytes_atomic(fs, f, b"data")
    synced.clear()
    assert sync_folders(fs, files) == 2
    assert sorted(p for k, p in synced if k == "dir") == [str(tmp_path / "out" / "images" / "s1~a"),
                                                          str(tmp_path / "out" / "meta")]


def test_a_held_local_lock_times_out_instead_of_hanging(tmp_path):
    store = LocalStore(str(tmp_path / "out"), lock_timeout=0.3, mount=False)
    v = store.create("_lease.json", b"a")
    with file_lock(str(tmp_path / "out" / "_lease.json.lock")):  # a frozen holder
        with pytest.raises(LockTimeout):
            store.replace("_lease.json", b"b", v)
    assert store.replace("_lease.json", b"b", v)
