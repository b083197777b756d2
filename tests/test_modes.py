"""Issue 3: every Kandinsky 2.1 mode in one job, each row equal to plain diffusers for that row alone."""
import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

import kbatch

from conftest import assert_pixels_close, tiny_config
from reference import render_row

DEFAULTS = dict(height=64, width=64, num_inference_steps=4, guidance_scale=4.0, prior_num_inference_steps=3,
                prior_guidance_scale=4.0, num_images=1, negative_prompt=None, strength=0.5)


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    init = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    wide = rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255  # white = repaint the right half
    (folder / "init.png").write_bytes(_png(init))
    (folder / "mask.png").write_bytes(_png(mask))
    return {"folder": folder, "init": init, "wide": wide, "mask": mask}


def _mix(*items):
    return [{"prompt": None, "image": None, "image_uri": None, **it} for it in items]


def _rows(inputs):
    return [
        {"id": "t2i", "prompt": "a red fox", "mode": "text2img"},
        {"id": "t2i-2", "prompt": "a blue bird", "num_images": 2, "negative_prompt": "ugly"},
        {"id": "i2i-uri", "prompt": "a painting", "mode": "img2img", "init_image": "init.png", "strength": 0.6},
        {"id": "i2i-bytes", "prompt": "a photo", "mode": "img2img", "init_image": _png(inputs["wide"]),
         "width": 128, "num_images": 2, "strength": 0.75},
        {"id": "inpaint", "prompt": "a hat", "mode": "inpaint", "init_image": "init.png", "mask": "mask.png"},
        {"id": "inpaint-2", "prompt": "a flower", "mode": "inpaint", "init_image": _png(inputs["init"]),
         "mask": _png(inputs["mask"]), "num_images": 2, "negative_prompt": "dark"},
        {"id": "interp", "prompt": "a mix", "mode": "interpolate",
         "mix": _mix({"prompt": "a cat", "weight": 0.3}, {"image_uri": "init.png", "weight": 0.7})},
        {"id": "interp-neg", "prompt": "a mix", "mode": "interpolate", "negative_prompt": "blurry",
         "mix": _mix({"prompt": "a dog", "weight": 0.5}, {"prompt": "a tree", "weight": 0.5},
                     {"image": _png(inputs["wide"]), "weight": 0.25})},
        {"id": "interp-2", "prompt": "two", "mode": "interpolate", "num_images": 2,
         "mix": _mix({"prompt": "a cat", "weight": 0.5}, {"image_uri": "init.png", "weight": 0.5})},
    ]


@pytest.fixture(scope="module")
def job(tiny_models, ray_session, inputs, tmp_path_factory):
    import pyarrow.parquet as pq

    rows = _rows(inputs)
    folder = inputs["folder"]
    # two manifest files in one folder: URI rows (string columns) and inline-bytes rows (binary columns)
    uri_rows = [r for r in rows if not isinstance(r.get("init_image"), bytes)]
    byte_rows = [r for r in rows if isinstance(r.get("init_image"), bytes)]
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(uri_rows), preserve_index=False), folder / "a.parquet")
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(byte_rows), preserve_index=False), folder / "b.parquet")
    out = tmp_path_factory.mktemp("modes") / "out"
    cfg = tiny_config(tiny_models, out, manifest=str(folder / "*.parquet"),
                      resources={"decoder": {"batch_size": 3}, "prior": {"batch_size": 3}})
    from kbatch.config import from_dict
    from kbatch.run.runner import run_job

    result = run_job(from_dict(cfg))
    res = kbatch.open_results(str(out))
    res.run = result
    return res


def test_mixed_job_complete(job, inputs):
    assert job.run.exit_code == 0, job.df[job.df.status == "error"][["id", "error"]]
    df = job.df
    rows = _rows(inputs)
    assert sorted(df.id.unique()) == sorted(r["id"] for r in rows)
    assert len(df) == sum(r.get("num_images", 1) for r in rows)
    assert set(df[df.id == "i2i-bytes"].width) == {128}
    assert df[df.id == "inpaint"].model_decoder.iloc[0].endswith("inpaint")
    assert df[df.id == "t2i"].model_decoder.iloc[0].endswith("decoder")
    assert json.loads(df[df.id == "interp"]["mix"].iloc[0])[1]["image_uri"].endswith("init.png")
    assert (df.scheduler == "ddim").all()


@pytest.mark.parametrize("rid", ["t2i-2", "i2i-uri", "inpaint", "inpaint-2", "interp", "interp-neg"])
def test_mode_parity_with_diffusers(job, inputs, tiny_models, rid):
    row = next(r for r in _rows(inputs) if r["id"] == rid)
    full = {**DEFAULTS, **{k: v for k, v in row.items() if v is not None}}
    full["seed"] = int(job.df[job.df.id == rid]["seed"].iloc[0])
    init = mask = mix_images = None
    if "init_image" in row:
        src = row["init_image"]
        init = Image.open(io.BytesIO(src)) if isinstance(src, bytes) else Image.open(inputs["folder"] / src)
        init = init.convert("RGB")
    if "mask" in row:
        src = row["mask"]
        mask = (Image.open(io.BytesIO(src)) if isinstance(src, bytes) else Image.open(inputs["folder"] / src)).convert("L")
    if "mix" in row:
        mix_images = [None if it["image"] is None and it["image_uri"] is None else
                      Image.open(io.BytesIO(it["image"]) if it["image"] else inputs["folder"] / it["image_uri"]).convert("RGB")
                      for it in row["mix"]]
    ref = render_row(tiny_models, full, init_image=init, mask=mask, mix_images=mix_images)
    for i in range(full["num_images"]):
        assert_pixels_close(np.asarray(job.image(rid, i)), ref[i], f"{rid}[{i}]")


def test_img2img_at_a_non_square_size(job, inputs):
    """diffusers' img2img swaps height and width (fails off-square); kbatch renders the requested size."""
    imgs = [np.asarray(job.image("i2i-bytes", i)) for i in range(2)]
    assert imgs[0].shape == (64, 128, 3) and not np.array_equal(imgs[0], imgs[1])


def test_mask_convention_is_diffusers(job, inputs, tiny_models):
    """White = repaint (diffusers >= 0.19): kbatch hands the mask over as given, never inverted.
    (Random weights can't show 'kept' pixels; the inverted mask is a different image, ours is not it.)"""
    row = {**DEFAULTS, "id": "inpaint", "prompt": "a hat", "mode": "inpaint",
           "seed": int(job.df[job.df.id == "inpaint"]["seed"].iloc[0])}
    init = Image.fromarray(inputs["init"])
    inverted = render_row(tiny_models, row, init_image=init, mask=Image.fromarray(255 - inputs["mask"]))
    as_given = render_row(tiny_models, row, init_image=init, mask=Image.fromarray(inputs["mask"]))
    got = np.asarray(job.image("inpaint", 0))
    assert_pixels_close(got, as_given[0], "mask as given")
    assert np.abs(got.astype(int) - inverted[0]).mean() > 5


def test_interpolate_many_images_each_get_their_own_embedding(job):
    a, b = np.asarray(job.image("interp-2", 0)), np.asarray(job.image("interp-2", 1))
    assert a.shape == b.shape == (64, 64, 3) and not np.array_equal(a, b)


def test_scheduler_switch_changes_output_and_is_recorded(tiny_models, ray_session, tmp_path):
    """Each scheduler through the predictors (no cluster) equals plain diffusers with that scheduler; one whole
    job shows that models.scheduler reaches the decoder actors and the records."""
    from kbatch.models.decoder import DecoderPredictor
    from kbatch.models.prior import PriorPredictor
    from kbatch.schema.rows import Row

    row = {**DEFAULTS, "id": "s", "prompt": "a lighthouse", "seed": 3}
    krow = Row(**{k: v for k, v in row.items() if k != "strength"})
    prior = PriorPredictor(tiny_models["prior"], device="cpu", dtype="float32")
    outs = {}
    for name in ("ddim", "ddpm", "dpm++"):
        dec = DecoderPredictor(tiny_models["decoder"], device="cpu", dtype="float32", scheduler=name)
        outs[name] = dec([krow], prior([krow]))[0].images[0]
        assert_pixels_close(outs[name], render_row(tiny_models, row, scheduler=name)[0], name)
    assert not np.array_equal(outs["ddim"], outs["ddpm"]) and not np.array_equal(outs["ddim"], outs["dpm++"])
    cfg = tiny_config(tiny_models, tmp_path / "job", models={"scheduler": "dpm++"})
    res = kbatch.render(pd.DataFrame([{"id": "s", "prompt": "a lighthouse", "seed": 3}]), str(tmp_path / "job"), cfg)
    assert list(res.df.scheduler) == ["dpm++"]
    assert_pixels_close(np.asarray(res.image("s")), outs["dpm++"], "dpm++ job")
