"""fsspec ``memory://`` as a job's output and input storage: it lives in one process (the driver), so its
shards are written and its input images read there, not in Ray workers whose memory filesystems differ."""
import io
import json

import fsspec
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import kbatch
from kbatch.storage import process_local

from conftest import sim_models, tiny_config

# Where the pixels do not matter, the simulated models (docs/clusters.md, simulated models); the sim decoder checks it got the sim prior's
# embeddings for each row, so the stage-to-stage plumbing through memory:// is still checked.
SIM = sim_models()


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def memory_inputs():
    fs = fsspec.filesystem("memory")
    init = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    fs.pipe("/kbt-inputs/init.png", _png(init))
    yield "memory://kbt-inputs"
    fs.rm("/kbt-inputs", recursive=True)


def _df(init_uri: str) -> pd.DataFrame:
    return pd.DataFrame([
        {"id": "t", "prompt": "a red fox", "mode": "text2img", "seed": 1, "init_image": None},
        {"id": "i", "prompt": "a red fox", "mode": "img2img", "seed": 2, "init_image": init_uri},
        {"id": "bad", "prompt": "a red fox", "mode": "img2img", "seed": 3, "init_image": init_uri + ".missing"},
    ])


def test_process_local():
    assert process_local("memory://x/y") and process_local("MEMORY://x")
    assert not process_local("/tmp/x") and not process_local("s3://b/x") and not process_local(None)
    assert not process_local(b"memory://")


def test_memory_output_and_inputs_match_a_local_render(tiny_models, ray_session, tmp_path, memory_inputs):
    """Every row ends in the driver's memory filesystem, with the pixels of the same job rendered to disk."""
    init_uri = memory_inputs + "/init.png"
    over = {"limits": {"allowed_roots": [memory_inputs]}, "output": {"gallery": True}}
    out = "memory://kbt-out/job1"
    try:
        mem = kbatch.render(_df(init_uri), out, tiny_config(tiny_models, out, **over))
        assert mem.run.complete and (mem.run.rows_ok, mem.run.rows_failed, mem.run.images) == (2, 1, 2)
        df = mem.df.set_index("id")
        assert df.loc["t", "status"] == df.loc["i", "status"] == "ok"
        assert df.loc["bad", "status"] == "error" and "init_image" in df.loc["bad", "error"]
        fs = fsspec.filesystem("memory")
        assert fs.exists("/kbt-out/job1/_SUCCESS") and fs.exists("/kbt-out/job1/gallery.html")

        disk = kbatch.render(_df(init_uri), str(tmp_path / "disk"), tiny_config(tiny_models, tmp_path / "disk", **over))
        for rid in ("t", "i"):
            assert np.array_equal(np.asarray(mem.image(rid)), np.asarray(disk.image(rid))), rid
        assert list(mem.df.sort_values("id").sha256) == list(disk.df.sort_values("id").sha256)

        again = kbatch.render(_df(init_uri), out, tiny_config(tiny_models, out, **over))  # resume: nothing to do
        assert again.run.rows_skipped == 3 and again.run.images == 0 and len(again.df) == 3
    finally:
        fsspec.filesystem("memory").rm("/kbt-out", recursive=True)


def test_memory_embeddings_then_decoder(ray_session):
    """stage: prior writes embeddings to memory://; stage: decoder renders from them."""
    df = pd.DataFrame([{"id": f"r{i}", "prompt": f"prompt {i}", "seed": i} for i in range(3)])
    emb_uri, dec_uri = "memory://kbt-stages/emb", "memory://kbt-stages/dec"
    try:
        emb = kbatch.render(df, emb_uri, tiny_config(SIM, emb_uri, stage="prior"))
        assert emb.run.complete and emb.run.rows_ok == 3
        dec = kbatch.render(emb_uri, dec_uri, tiny_config(SIM, dec_uri, stage="decoder"))
        assert dec.run.complete and dec.run.images == 3 and set(dec.df.status) == {"ok"}
    finally:
        fsspec.filesystem("memory").rm("/kbt-stages", recursive=True)


def test_in_driver_call_delivers_results_and_errors(ray_session):
    from kbatch.models.actors import InDriver, Raised

    ray = ray_session
    ref = InDriver(lambda a, b: a + b).remote(ray.put(2), 3)
    assert ray.get(ref) == 5
    r1, r2 = InDriver(lambda: 1 / 0, num_returns=2).remote()
    got = ray.get(r1)
    assert isinstance(got, Raised) and "ZeroDivisionError" in got.message and isinstance(ray.get(r2), Raised)


def test_shards_the_driver_cannot_see_make_the_run_incomplete(ray_session, monkeypatch):
    """Writers that commit where the driver cannot look (here: writer actors writing memory:// into their own
    processes, as a local path written on another node would be) leave the run incomplete, not "complete"."""
    import kbatch.storage

    monkeypatch.setattr(kbatch.storage, "process_local", lambda uri: False)  # the old behaviour: writer actors
    out = "memory://kbt-unseen/job"
    df = pd.DataFrame([{"id": f"u{i}", "prompt": f"prompt {i}", "seed": i} for i in range(3)])
    try:
        res = kbatch.render(df, out, tiny_config(SIM, out))
        assert not res.run.complete and res.run.exit_code == 3
        fs = fsspec.filesystem("memory")
        assert not fs.exists("/kbt-unseen/job/_SUCCESS")
        job = json.loads(fs.cat("/kbt-unseen/job/_job.json"))
        # the writers do not see the run's lease where they write, so they commit nothing there (fenced)
        assert job["status"] == "incomplete" and "does not see the driver's output folder" in job["error"]
        from kbatch.run.status import format_summary, summarize

        text = format_summary(summarize(out))
        assert "status:   INCOMPLETE" in text
    finally:
        fsspec.filesystem("memory").rm("/kbt-unseen", recursive=True)
