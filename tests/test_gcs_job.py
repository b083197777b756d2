"""A whole job on GCS (``gs://``), on fake-gcs-server: manifest read from the bucket, outputs written there by the
``kbatch`` command in a subprocess (simulated models, local Ray), with the same promises as on S3: the lease,
one commit per shard, ``_job.json`` and ``_SUCCESS``; reading
back with ``open_results`` and ``kbatch status``'s summary. Models too: pulled to gs:// and staged from it. The emulator is reached through ``storage_options`` in the
config (``endpoint_url``, ``token: anon``), which reach the driver and the workers."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import kbatch
from kbatch.run.status import summarize
from cli_helpers import kbatch as run_kbatch
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
    return run_kbatch(*args, timeout=timeout, env_update=PLAIN_GCSFS)


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


def test_models_pull_and_stage_on_gcs(gcs, tmp_path):
    """``kbatch models pull`` to gs:// and staging from it: the staged copy holds the same bytes, and a second
    pull of the same folder uploads nothing (GCS's md5Hash matches each local file)."""
    import os

    from kbatch.models.store import pull_model, stage_model

    src = tmp_path / "model"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    (src / "unet" / "config.json").write_text("{}")
    (src / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(200_000))
    url = f"gs://{BUCKET}/models/m1"
    first = pull_model(str(src), url, gcs.storage_options())
    assert first["files"] == 3 and first["uploaded"] == 3
    again = pull_model(str(src), url, gcs.storage_options())
    assert again["uploaded"] == 0 and again["skipped"] == 3
    staged = stage_model(url, gcs.storage_options(), cache_dir=str(tmp_path / "cache"))
    assert str(staged).startswith(str(tmp_path / "cache"))
    for rel in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"):
        with open(os.path.join(str(staged), rel), "rb") as fh:
            assert fh.read() == (src / rel).read_bytes(), rel
