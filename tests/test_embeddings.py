"""Issue 3: prior embeddings as data. prior-only job -> decode job == one job doing both."""
import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import kbatch
from kbatch.config import from_dict
from kbatch.run.runner import run_job

from conftest import assert_pixels_close, tiny_config


def test_embeddings_round_trip(tiny_models, ray_session, tmp_path):
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    (tmp_path / "init.png").write_bytes(buf.getvalue())
    mix = [{"prompt": "a cat", "image": None, "image_uri": None, "weight": 0.6},
           {"prompt": None, "image": None, "image_uri": "init.png", "weight": 0.4}]
    rows = pd.DataFrame([
        {"id": "a", "prompt": "a red fox", "negative_prompt": "ugly", "num_images": 2},
        {"id": "b", "prompt": "a boat", "height": 128},
        {"id": "c", "prompt": "a painting", "mode": "img2img", "init_image": "init.png", "strength": 0.6},
        {"id": "d", "prompt": "a mix", "mode": "interpolate", "mix": mix},
    ])
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), tmp_path / "m.parquet")
    manifest = str(tmp_path / "m.parquet")

    def job(out, **over):
        cfg = from_dict(tiny_config(tiny_models, tmp_path / out, **{"manifest": manifest, **over}))
        result = run_job(cfg)
        assert result.exit_code == 0, result
        return kbatch.open_results(str(tmp_path / out))

    both = job("both")
    emb = job("emb", stage="prior")
    assert (emb.df.image_format == "embeddings").all() and sorted(emb.df.id.unique()) == list("abcd")
    assert (tmp_path / "emb" / "_SUCCESS").exists()
    # the init image lives beside the prior job's manifest, outside the embeddings output: the decoding job
    # reads it only because its own limits allow that folder (docs/faults.md)
    dec = job("dec", stage="decoder", manifest=str(tmp_path / "emb"), limits={"allowed_roots": [str(tmp_path)]})
    assert sorted(dec.df.id.unique()) == list("abcd") and len(dec.df) == len(both.df) == 5
    assert set(dec.df[dec.df.id == "d"]["mode"]) == {"interpolate"}
    for rid, n in [("a", 2), ("b", 1), ("c", 1), ("d", 1)]:
        for i in range(n):
            assert_pixels_close(np.asarray(dec.image(rid, i)), np.asarray(both.image(rid, i)), f"{rid}[{i}]")
    # decoder settings can change on fixed embeddings; without limits.allowed_roots the decoding job reads
    # inputs only under the embeddings output (not under the root the prior job's _job.json names)
    cfg = from_dict(tiny_config(tiny_models, tmp_path / "more", manifest=str(tmp_path / "emb"), stage="decoder",
                                defaults={"num_inference_steps": 6}))
    assert run_job(cfg).exit_code == 1
    more = kbatch.open_results(str(tmp_path / "more"))
    (err,) = more.df[more.df.id == "c"].error
    assert "init_image" in err and "outside the allowed roots" in err and str(tmp_path / "emb") in err, err
    assert set(more.df[more.df.status == "ok"].num_inference_steps) == {6}
    assert not np.array_equal(np.asarray(more.image("b")), np.asarray(both.image("b")))
