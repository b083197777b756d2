"""Chaos runs in the suite (docs/faults.md): a small version of ``bench/chaos.py``.

An output on S3 (moto) behind ``tests/fault_front.py`` (latency, 503 SlowDown, connection resets, answers lost
after the write landed, seeded), rendered by ``kbatch run`` subprocesses (simulated stages, each run on its own
local Ray) while the harness kills a writer actor, SIGKILLs the driver (its whole process group: driver and
its Ray) and freezes the next driver (SIGSTOP; on S3 with its writers, wherever they are in a shard's write)
until a third run takes its lease over; the frozen run is thawed and must exit 3 writing nothing more. The
same on GCS (fake-gcs-server, ``tests/fake_gcs.py``) behind the front, with fewer faults. The last run completes; every row then has exactly one ok record, read
through kbatch's readers and through a raw listing of the commit records and the metadata files they name.

The front itself is checked first: each kind of fault is injected and counted, and a write whose answer was
lost did land.
"""
import os
import sys

import pytest

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import chaos  # noqa: E402  bench/chaos.py
from cli_helpers import env as cli_env  # noqa: E402
from fault_front import FaultFront, Faults  # noqa: E402
from moto_s3 import aws_env, moto_server  # noqa: E402


def test_the_front_injects_and_counts_each_fault(monkeypatch):
    import boto3
    import botocore.config

    with moto_server(aws_env("AKIAFRONTTEST0001", "front-secret")) as moto_url:
        with FaultFront(moto_url, Faults(seed=7)) as front:
            plain = boto3.client("s3", endpoint_url=moto_url)
            once = boto3.client("s3", endpoint_url=front.url,
                                config=botocore.config.Config(retries={"total_max_attempts": 1, "mode": "standard"}))
            plain.create_bucket(Bucket="front")
            once.put_object(Bucket="front", Key="a", Body=b"through the front")
            assert plain.get_object(Bucket="front", Key="a")["Body"].read() == b"through the front"
            assert once.head_object(Bucket="front", Key="a")["ContentLength"] == len(b"through the front")

            front.set(slowdown=1.0)
            with pytest.raises(Exception, match="SlowDown"):
                once.get_object(Bucket="front", Key="a")
            front.set(slowdown=0.0, reset=1.0)
            with pytest.raises(Exception, match="onnection"):
                once.put_object(Bucket="front", Key="b", Body=b"never sent on")
            assert "Contents" not in plain.list_objects_v2(Bucket="front", Prefix="b")
            front.set(reset=0.0, lost_answer=1.0)
            with pytest.raises(Exception, match="onnection"):
                once.put_object(Bucket="front", Key="c", Body=b"landed")
            assert plain.get_object(Bucket="front", Key="c")["Body"].read() == b"landed"  # the write landed
            once.get_object(Bucket="front", Key="c")  # reads are answered: lost answers are for writes
            front.set(lost_answer=0.0, latency=0.05)
            once.get_object(Bucket="front", Key="c")
            front.set(latency=0.0, slowdown=1.0, match="/front/only-this")  # faults only where the path matches
            once.get_object(Bucket="front", Key="c")
            assert front.injected() == {"latency": 1, "slowdown": 1, "reset": 1, "lost_answer": 1}
            assert front.counts["requests"] == 8


# S3: a writer killed, the driver SIGKILLed, the next run frozen with its writers mid-write past a takeover;
# GCS: the driver SIGKILLed, the next driver frozen past a takeover
EPISODES = {"s3": (300, ("kill_writer", "kill_driver", "freeze_job")), "gcs": (200, ("kill_driver", "freeze_driver"))}


@pytest.mark.parametrize("storage", EPISODES)
def test_chaos_runs_end_with_every_row_exactly_once(tmp_path, monkeypatch, storage):
    rows, sequence = EPISODES[storage]
    faults = Faults(latency=0.002, jitter=0.004, slowdown=0.03, reset=0.02, lost_answer=0.05, seed=11)
    store = chaos.S3(faults) if storage == "s3" else chaos.GCS(faults)
    try:
        for k, v in store.env.items():
            monkeypatch.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "RAY_ADDRESS"):
            monkeypatch.delenv(k, raising=False)
        setup = chaos.Setup(rows=rows, rows_per_shard=20, seed=3, lease_ttl=2.0, writers=1, sequence=sequence,
                            max_runs=10, run_timeout=300,
                            extra={"resources": {"prior": {"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": 10},
                                                 "decoder": {"replicas": 1, "gpus": 0, "cpus": 0.25,
                                                             "batch_size": 10},
                                                 "colocate": False},
                                   "models": {"sim": {"decoder_seconds_per_image": 0.02}}})
        r = chaos.Episode(setup, store, str(tmp_path / "chaos"), cli_env).play()
    finally:
        store.close()
    detail = {k: v for k, v in r.items() if k != "run_log"}, r["run_log"]
    assert r["process_faults"] == {k: 1 for k in sequence}, detail
    assert sum(v for k, v in r["store_faults"].items() if k != "latency") > 0, detail
    assert r["duplicates"] == 0 and r["missing"] == 0, detail
    assert r["reader"]["rows_ok"] == rows and r["raw"]["unexpected_ids"] == 0, detail
    assert r["raw"]["commit_records"] >= 2, detail
    assert r["job_status"] == "complete" and r["success_run_matches_job"], detail
    assert r["anomalies"] == [], detail  # the thawed run exited 3 saying it lost the lease
    assert r["runs"] >= len(sequence) and any(run.get("thawed") for run in r["run_log"]), detail
