"""Issue "Outputs and the people who use them": a whole job against an S3-compatible server.

moto's server mode runs on loopback, started by the test. The manifest and its init image (a relative URI,
resolved against the manifest's folder) are read from it and the outputs written to it by the ``kbatch``
command in a subprocess, whose local Ray workers inherit the environment. Credentials and the endpoint come
from the environment only (AWS_*), never from the manifest or the config; the test checks that they are not
copied into the outputs. ``open_results``, ``kbatch.run.status.summarize`` and ``kbatch status`` read it back.
"""
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import kbatch
from kbatch.run.status import summarize

from cli_helpers import env as cli_env, kbatch as run_kbatch
from conftest import assert_pixels_close, sim_models, tiny_config
from reference import render_row

# Credentials reach the driver, the loaders and the writers whatever the models: simulated ones (docs/clusters.md, simulated models) there.
SIM = sim_models()

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
from moto_s3 import aws_env, moto_server  # noqa: E402

BUCKET = "kbatch-s3-job"
KEY_ID = "AKIAKBATCHTESTKEY01"  # distinctive, so that a leak into the outputs is detectable
SECRET = "kbatch-secret-do-not-store-0123456789"
OUT = f"s3://{BUCKET}/out/run1"
MANIFEST = f"s3://{BUCKET}/in/manifest.parquet"
ROWS = [
    {"id": "t2i-a", "prompt": "a red fox in the snow", "mode": "text2img"},
    {"id": "t2i-b", "prompt": "a lighthouse at dusk", "mode": "text2img", "num_images": 2},
    {"id": "i2i", "prompt": "a watercolor of the same scene", "mode": "img2img", "init_image": "img/init.png",
     "strength": 0.5},
    {"id": "escape", "prompt": "outside the manifest folder", "mode": "img2img",
     "init_image": f"s3://{BUCKET}/secret/x.png", "strength": 0.5},
]


def _init_png() -> bytes:
    y, x = np.mgrid[0:64, 0:64]
    arr = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


AWS_ENV = aws_env(KEY_ID, SECRET)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback; this process's env points botocore (and so s3fs) at it."""
    with moto_server(AWS_ENV) as endpoint:
        yield {"endpoint": endpoint, "fs": s3fs.S3FileSystem()}


def _kbatch(endpoint, *args, timeout=300):
    """``kbatch ARGS`` in a subprocess with its own Ray temp dir and the S3 settings in its environment."""
    return run_kbatch(*args, timeout=timeout, env_update={**AWS_ENV, "AWS_ENDPOINT_URL": endpoint},
                      env_drop=("AWS_PROFILE", "AWS_SESSION_TOKEN"))


@pytest.fixture(scope="module")
def job(s3, tiny_models, tmp_path_factory):
    fs = s3["fs"]
    fs.mkdir(BUCKET)
    fs.pipe_file(f"{BUCKET}/in/img/init.png", _init_png())
    fs.pipe_file(f"{BUCKET}/secret/x.png", _init_png())
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("mode", pa.string()),
                        ("num_images", pa.int64()), ("init_image", pa.string()), ("strength", pa.float64())])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(ROWS, schema=schema), buf)
    fs.pipe_file(MANIFEST.removeprefix("s3://"), buf.getvalue())

    folder = tmp_path_factory.mktemp("s3job")
    cfg = tiny_config(tiny_models, OUT, retries={"max_failed_rows": 1})
    cfg["output"]["gallery"] = True
    cfg["manifest"] = MANIFEST
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = _kbatch(s3["endpoint"], "run", path)
    s3fs.S3FileSystem.clear_instance_cache()
    p.config_path = path
    return p


def test_job_runs_against_s3(job):
    assert job.returncode == 0, f"stdout:\n{job.stdout[-3000:]}\nstderr:\n{job.stderr[-5000:]}"
    assert "kbatch: complete" in job.stdout
    assert OUT in job.stdout


def test_results_read_back(job, s3, tiny_models):
    res = kbatch.open_results(OUT)
    df = res.df
    ok = df[df.status == "ok"]
    assert sorted(ok.id.unique()) == ["i2i", "t2i-a", "t2i-b"]
    assert len(ok) == 4 and res.n_images == 4
    i2i = ok[ok.id == "i2i"].iloc[0]
    assert i2i["mode"] == "img2img" and i2i["strength"] == 0.5
    assert i2i["init_image"] == f"s3://{BUCKET}/in/img/init.png", "relative URI resolved against the manifest"
    # the URI outside the manifest's folder (limits.allowed_roots empty) is refused, naming field and value
    err = df[df.id == "escape"]
    assert list(err.status) == ["error"]
    assert "init_image" in err.error.iloc[0] and "allowed roots" in err.error.iloc[0]
    assert res.image("t2i-b", 1).size == (64, 64)
    # the img2img row really used the init image read from S3: plain diffusers with the same image agrees
    row = {"prompt": i2i["prompt"], "negative_prompt": None, "seed": int(i2i["seed"]), "num_images": 1,
           "height": 64, "width": 64, "num_inference_steps": 4, "guidance_scale": 4.0,
           "prior_num_inference_steps": 3, "prior_guidance_scale": 4.0, "mode": "img2img", "strength": 0.5}
    ref = render_row(tiny_models, row, init_image=Image.open(io.BytesIO(_init_png())).convert("RGB"))
    assert_pixels_close(np.asarray(res.image("i2i")), ref[0], "i2i from s3")
    fs = s3["fs"]
    names = {p.split("/out/run1/", 1)[1] for p in fs.find(f"{BUCKET}/out/run1")}
    assert {"_SUCCESS", "_job.json", "gallery.html", "contact_sheet.png"} <= names
    assert set(ok.path) <= names
    assert not [n for n in names if ".tmp-" in n]


def test_status_reads_back(job, s3):
    s = summarize(OUT)
    assert s["complete"] and s["rows_total"] == 4 and s["rows_ok"] == 3 and s["rows_failed"] == 1
    assert s["rows_missing"] == 0 and s["images"] == 4 and s["uncommitted_shards"] == 0
    p = _kbatch(s3["endpoint"], "status", OUT, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "COMPLETE" in p.stdout and "missing: 0" in p.stdout
    p = _kbatch(s3["endpoint"], "status", "--json", OUT, timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout)["rows_ok"] == 3


def test_credentials_not_stored(job, s3):
    """Credentials live in the environment: none of them is copied into any output object."""
    fs = s3["fs"]
    for path in fs.find(f"{BUCKET}/out/run1"):
        data = fs.cat_file(path)
        assert KEY_ID.encode() not in data and SECRET.encode() not in data, path
    job_json = json.loads(fs.cat_file(f"{BUCKET}/out/run1/_job.json"))
    assert job_json["manifest"] == MANIFEST and job_json["status"] == "complete"


def test_validate_reads_s3(job, s3):
    """``kbatch validate`` reads the manifest and decodes the init image from S3 (no models): the row with a
    URI outside the manifest's folder is the one problem."""
    p = _kbatch(s3["endpoint"], "validate", job.config_path, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "4 rows, 3 valid, 1 with problems" in p.stdout
    assert "escape" in p.stdout and "allowed roots" in p.stdout


def test_credentials_from_config_only(job, s3, tmp_path):
    """storage_options in the config reach the driver and the workers; the secret is not stored."""
    cfg = tiny_config(SIM, f"s3://{BUCKET}/out/run2", manifest=MANIFEST,
                      storage_options={"key": KEY_ID, "secret": SECRET},
                      retries={"max_failed_rows": 1})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    e = cli_env()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        e.pop(k, None)
    e.update({k: v for k, v in AWS_ENV.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")})
    e["AWS_ENDPOINT_URL"] = s3["endpoint"]
    p = subprocess.run([sys.executable, "-m", "kbatch.cli", "run", str(path)], capture_output=True, text=True,
                       timeout=300, env=e)
    shutil.rmtree(e["RAY_TMPDIR"], ignore_errors=True)
    assert p.returncode == 0, p.stderr[-3000:]
    res = kbatch.open_results(f"s3://{BUCKET}/out/run2")
    assert sorted(res.df[res.df.status == "ok"].id.unique()) == ["i2i", "t2i-a", "t2i-b"]
    job_json = s3["fs"].cat_file(f"{BUCKET}/out/run2/_job.json")
    assert SECRET.encode() not in job_json and KEY_ID.encode() not in job_json
