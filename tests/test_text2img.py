"""Issue 2: text2img rows through the whole Ray pipeline equal plain diffusers, row by row."""
import numpy as np
import pandas as pd
import pytest

import kbatch
from kbatch.schema.rows import Row

from conftest import assert_pixels_close, tiny_config
from reference import render_row

ROWS = [
    {"id": "plain", "prompt": "a red fox in the snow"},
    {"id": "neg", "prompt": "a lighthouse at dusk", "negative_prompt": "blurry"},
    {"id": "two", "prompt": "a bowl of ramen", "num_images": 2},
    {"id": "two.neg", "prompt": "a robot reading", "negative_prompt": "dark", "num_images": 2},
    {"id": "wide", "prompt": "a city street", "width": 128, "seed": 7},
    {"id": "wide-2", "prompt": "sunflowers", "width": 128, "guidance_scale": 1.0},
    {"id": "steps", "prompt": "a sailing ship", "num_inference_steps": 6, "prior_guidance_scale": 1.0},
]
DEFAULTS = dict(height=64, width=64, num_inference_steps=4, guidance_scale=4.0, prior_num_inference_steps=3,
                prior_guidance_scale=4.0, num_images=1, negative_prompt=None)


def _frame(rows):
    df = pd.DataFrame(rows)
    for col in ("num_images", "width", "seed", "num_inference_steps"):
        if col in df:
            df[col] = df[col].astype("Int64")
    return df


@pytest.fixture(scope="module")
def job(tiny_models, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i")
    res = kbatch.render(_frame(ROWS), str(out / "a"), tiny_config(tiny_models, out / "a"))
    return res


def test_every_row_rendered(job):
    assert job.run.exit_code == 0 and job.run.complete
    df = job.df
    assert sorted(df["id"].unique()) == sorted(r["id"] for r in ROWS)
    assert (df["status"] == "ok").all()
    assert len(df) == sum(r.get("num_images", 1) for r in ROWS)
    assert set(df[df.id == "wide"]["width"]) == {128}
    assert set(df[df.id == "steps"]["num_inference_steps"]) == {6}
    assert df["sha256"].str.len().eq(64).all()
    assert df["prior_worker"].notna().all() and df["decoder_worker"].notna().all()


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_parity_with_diffusers(job, tiny_models, row):
    full = {**DEFAULTS, **row}
    full["seed"] = int(job.df[job.df.id == row["id"]]["seed"].iloc[0])
    if "seed" in row:
        assert full["seed"] == row["seed"]
    ref = render_row(tiny_models, full)
    for i in range(full["num_images"]):
        got = np.asarray(job.image(row["id"], i))
        assert_pixels_close(got, ref[i], f"{row['id']}[{i}]")
    # different seeds and prompts give different images (the comparison above is not vacuous)
    assert not np.array_equal(ref[0], render_row(tiny_models, {**full, "seed": full["seed"] + 1})[0])


def test_same_pixels_whatever_the_batch(job, tiny_models, tmp_path):
    """The job's batches of 4 on one decoder vs batches of 8 on two decoders, rows in reverse order: the same
    pixels."""
    over = {"resources": {"prior": {"batch_size": 8}, "decoder": {"batch_size": 8, "replicas": 2}}}
    res = kbatch.render(_frame(ROWS[::-1]), str(tmp_path / "b"), tiny_config(tiny_models, tmp_path / "b", **over))
    for r in ROWS:  # (batch 1 vs a batch: test_predictors_batch_invariant_without_ray)
        for i in range(r.get("num_images", 1)):
            assert_pixels_close(np.asarray(res.image(r["id"], i)), np.asarray(job.image(r["id"], i)), r["id"])
    assert res.df["decoder_worker"].nunique() >= 1


def test_colocated_stages_same_pixels(job, tiny_models, tmp_path):
    """resources.colocate: each decoder process runs the prior too; the pixels don't change. Shards go
    through two writer actors."""
    over = {"resources": {"colocate": True, "writers": 2, "decoder": {"replicas": 2, "batch_size": 2}},
            "output": {"rows_per_shard": 2}}
    res = kbatch.render(_frame(ROWS), str(tmp_path / "co"), tiny_config(tiny_models, tmp_path / "co", **over))
    assert res.run.exit_code == 0 and len(res.df) == len(job.df)
    for r in ROWS:
        for i in range(r.get("num_images", 1)):
            assert_pixels_close(np.asarray(res.image(r["id"], i)), np.asarray(job.image(r["id"], i)), r["id"])
    # the prior ran in the decoder processes (a row's two stages may still land on different replicas)
    assert set(res.df["prior_worker"]) <= set(res.df["decoder_worker"])
    # a shard flushes at >= 2 rows and a decoder batch adds <= 2: each shard holds <= 3 of the 7 rows
    assert res.df["shard"].nunique() >= 3
    # without colocate the stages run in different processes
    assert set(job.df["prior_worker"]).isdisjoint(set(job.df["decoder_worker"]))


def test_predictors_batch_invariant_without_ray(tiny_models):
    """The pure stage classes: a batch of rows equals each row alone (no cluster needed)."""
    from kbatch.models.decoder import DecoderPredictor
    from kbatch.models.prior import PriorPredictor

    prior = PriorPredictor(tiny_models["prior"], device="cpu", dtype="float32")
    dec = DecoderPredictor(tiny_models["decoder"], device="cpu", dtype="float32")
    rows = [Row(id=f"r{i}", prompt=p, seed=i, num_images=2, height=64, width=64, num_inference_steps=3,
                prior_num_inference_steps=2, negative_prompt="ugly") for i, p in enumerate(["a cat", "a dog", "x"])]
    batch = dec(rows, prior(rows))
    for r, b in zip(rows, batch):
        alone = dec([r], prior([r]))[0]
        assert b.images.shape == (2, 64, 64, 3)
        assert_pixels_close(b.images, alone.images, r.id)


def test_precision_choices_on_cpu(tiny_models):
    """bfloat16 runs on CPU workers; float16 falls back to float32 there (CPU half kernels are slow/missing)."""
    import torch

    from kbatch.models.decoder import DecoderPredictor
    from kbatch.models.prior import PriorPredictor

    row = Row(id="p", prompt="a cat", seed=1, height=64, width=64, num_inference_steps=3, prior_num_inference_steps=2)
    out = {}
    for dtype in ("float32", "bfloat16", "float16"):
        prior = PriorPredictor(tiny_models["prior"], device="cpu", dtype=dtype)
        dec = DecoderPredictor(tiny_models["decoder"], device="cpu", dtype=dtype)
        assert dec.pipe.unet.dtype == {"bfloat16": torch.bfloat16}.get(dtype, torch.float32)
        out[dtype] = dec([row], prior([row]))[0].images
    assert np.array_equal(out["float16"], out["float32"])
    assert out["bfloat16"].shape == (1, 64, 64, 3) and not np.array_equal(out["bfloat16"], out["float32"])


def test_padding_for_compiled_unet_keeps_images(tiny_models):
    """models.compile pads each decoder call to the batch size (one compiled shape); the real images
    stay the same, for text2img and for img2img (whose init images are padded too)."""
    from PIL import Image

    from kbatch.models.decoder import DecoderPredictor
    from kbatch.models.prior import PriorPredictor

    prior = PriorPredictor(tiny_models["prior"], device="cpu", dtype="float32")
    plain = DecoderPredictor(tiny_models["decoder"], device="cpu", dtype="float32")
    padded = DecoderPredictor(tiny_models["decoder"], device="cpu", dtype="float32", pad_to=6)
    base = dict(height=64, width=64, num_inference_steps=3, prior_num_inference_steps=2)
    t2i = [Row(id="a", prompt="a cat", seed=1, num_images=2, **base), Row(id="b", prompt="a dog", seed=2, **base)]
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    i2i = [Row(id="c", prompt="a boat", seed=3, mode="img2img", strength=0.6, **base)]
    for rows, inputs in ((t2i, None), (i2i, [{"init_image": init}])):
        priors = [prior([r])[0] for r in rows]  # num_images 2 and 1: different prior keys
        want, got = plain(rows, priors, inputs), padded(rows, priors, inputs)
        for w, g in zip(want, got):
            assert g.images.shape == w.images.shape
            assert_pixels_close(g.images, w.images, w.id)


def test_warmup_compiles_the_shapes_real_batches_use(tiny_models):
    """models.compile: the decoder's warm-up runs each Row.unet_shape() bucket at the padded batch size, so
    real batches of those shapes reuse its graphs. Checked with dynamo's eager backend (tracing and guards
    as on a GPU, no code generation) on the tiny UNet; a shape that was not warmed up does add a graph."""
    import torch
    from torch._dynamo.utils import counters

    from kbatch.models.decoder import DecoderPredictor
    from kbatch.models.prior import PriorPredictor

    torch._dynamo.reset()
    prior = PriorPredictor(tiny_models["prior"], device="cpu", dtype="float32")
    from PIL import Image

    dec = DecoderPredictor(tiny_models["decoder"], tiny_models["inpaint"], device="cpu", dtype="float32", pad_to=4)
    dec.pipe.unet.compile(backend="eager", dynamic=False)  # what models.compile does on a GPU, minus codegen
    dec._inpaint_pipe(dec.lanes.all[0]).unet.compile(backend="eager", dynamic=False)  # its own UNet

    def rows(n, **kw):
        return [Row(id=f"r{i}", prompt=f"a cat {i}", seed=i, num_inference_steps=2, prior_num_inference_steps=2,
                    **{"height": 64, "width": 64, **kw}) for i in range(n)]

    warm = [rows(3), rows(1, width=128), rows(2, guidance_scale=1.0), rows(2, mode="img2img", strength=0.5),
            rows(3, mode="inpaint")]
    shapes = {r.unet_shape() for b in warm for r in b}
    assert shapes == {("base", 64, 64, True), ("base", 64, 128, True), ("base", 64, 64, False),
                      ("inpaint", 64, 64, True)}
    assert dec.warmup(shapes) > 0
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 4
    init = {"init_image": Image.new("RGB", (64, 64), (200, 30, 30)), "mask": Image.new("L", (64, 64), 255)}
    for b in warm:  # partial batches, other step counts, img2img: padded to 4, the same graphs
        dec(b, prior(b), [init] * len(b))
    assert counters["stats"]["unique_graphs"] == graphs
    cold = rows(2, height=128, width=128)
    dec(cold, prior(cold))
    assert counters["stats"]["unique_graphs"] > graphs
    torch._dynamo.reset()
