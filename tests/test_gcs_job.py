"""A whole job on GCS (``gs://``), on fake-gcs-server: manifest read from the bucket, outputs written there by the
``kbatch`` command in a subprocess (simulated models, local Ray), with the same promises as on S3: the lease,
one commit per shard, ``_job.json`` and ``_SUCCESS``; reading
back with ``open_results`` and ``kbatch status``'s summary. The emulator is reached through ``storage_options`` in the
config (``endpoint_url``, ``token: anon``), which reach the driver and the workers."""
import io
import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import kbatch
from kbatch.run.status import summarize
from cli_helpers import env as cli_env
from conftest import sim_models, tiny_config
from fake_gcs import PLAIN_GCSFS, fake_gcs_server

BUCKET = "kbatch-gcs-job"
OUT = f"gs://{BUCKET}/out/run1"
MANIFEST = f"gs://{BUCKET}/in/manifest.parquet"
ROWS = [{"id": f"r{i}", "prompt": f"prompt {i}"} for i in range(10)]


@pytest.fixture(scope="module")
def gcs():
    with fake_gcs_server() as g:
        g.make_bucket(BUCKET)
        yield g


def _kbatch(gcs, *args, timeout=300):
    e = cli_env()
    e.update(PLAIN_GCSFS)
    try:
        return subprocess.run([sys.executable, "-m", "kbatch.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, env=e)
    finally:
        shutil.rmtree(e["RAY_TMPDIR"], ignore_errors=True)


@pytest.fixture(scope="module")
def job(gcs, tmp_path_factory):
    from gcsfs.core import GCSFileSystem

    fs = GCSFileSystem(skip_instance_cache=True, **gcs.storage_options())
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(ROWS), buf)
    fs.pipe_file(MANIFEST.removeprefix("gs://"), buf.getvalue())
    cfg = tiny_config(sim_models(), OUT, manifest=MANIFEST, storage_options=gcs.storage_options())
    path = tmp_path_factory.mktemp("gcsjob") / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"fs": fs, "first": _kbatch(gcs, "run", path), "config": path}


def test_a_job_runs_on_gcs(job, gcs):
    p = job["first"]
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-5000:]}"
    fs = job["fs"]
    names = {n.split("/out/run1/", 1)[1] for n in fs.find(f"{BUCKET}/out/run1")}
    assert {"_SUCCESS", "_job.json", "_lease.json"} <= names
    commits = sorted(n for n in names if n.startswith("_commits/"))
    assert not [n for n in names if n.startswith("_probe/") or ".tmp-" in n]
    job_json = json.loads(fs.cat_file(f"{BUCKET}/out/run1/_job.json"))
    assert job_json["status"] == "complete" and job_json["manifest"] == MANIFEST
    res = kbatch.open_results(OUT, storage_options=gcs.storage_options())
    ok = res.df[res.df.status == "ok"]
    assert sorted(ok.id) == sorted(r["id"] for r in ROWS) and len(ok) == len(ROWS)  # every row once
    assert sorted(f"_commits/{s}.json" for s in set(ok.shard)) == commits  # one commit per shard
    s = summarize(OUT, storage_options=gcs.storage_options())
    assert s["complete"] and s["rows_ok"] == len(ROWS) and s["rows_missing"] == 0
