"""Issue 18 item 3, one card near its limit, checked on CPU: uint8 made on the device equals the old host
path bit for bit; the ``models.compile: auto`` rule; the refusals of a compiled job that would recompile
mid-run; the compile set-up (channels_last, MoVQ compiled, inductor cache); PNG compression is lossless."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from kbatch.models.decoder import DecoderPredictor, to_uint8
from kbatch.models.prior import PriorPredictor
from kbatch.schema.rows import Row


def _host_uint8(raw: torch.Tensor) -> np.ndarray:
    """What kbatch did before: diffusers' ``output_type="np"`` (denormalize, clamp, to host, permute, float)
    then ``(x * 255).round().astype(uint8)`` on the host."""
    x = (raw * 0.5 + 0.5).clamp(0, 1)
    x = x.cpu().permute(0, 2, 3, 1).float().numpy()
    return (np.asarray(x) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_to_uint8_is_the_host_arithmetic_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    raw = (torch.randn(3, 3, 32, 40, generator=g) * 0.7).to(dtype)  # some beyond [-1, 1]: clamped
    # values whose x255 falls on .5 (round half to even) and just around it
    edge = torch.tensor([(2 * k + 1) / 510 * 2 - 1 for k in range(255)], dtype=torch.float32).to(dtype)
    raw[0, 0, 0, :] = edge[:40]
    raw[1, 1, :, 0] = edge[40:72]
    got, want = to_uint8(raw), _host_uint8(raw)
    assert got.dtype == np.uint8 and got.shape == (3, 32, 40, 3)
    assert np.array_equal(got, want)
    # the test can fail: truncating instead of rounding differs on these values
    x = (raw * 0.5 + 0.5).clamp(0, 1).float().permute(0, 2, 3, 1).numpy()
    assert not np.array_equal((x * 255).astype(np.uint8), want)


# ------------------------------------------------------------------------------------------ the decoder

P = dict(height=64, width=64, num_inference_steps=3, guidance_scale=4.0, prior_num_inference_steps=2,
         prior_guidance_scale=4.0)


@pytest.fixture(scope="module")
def predictors(tiny_models):
    prior = PriorPredictor(tiny_models["prior"], device="cpu", dtype="float32", threads=1)
    dec = DecoderPredictor(tiny_models["decoder"], tiny_models["inpaint"], device="cpu", dtype="float32",
                           threads=1)
    return prior, dec


def _inputs():
    rng = np.random.default_rng(1)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    return {"init_image": init, "mask": Image.fromarray(mask), "mix_images": []}


CASES = {
    "text2img": [Row("a", "a red fox", seed=1, **P), Row("b", "a blue bird", seed=2, num_images=2, **P)],
    "text2img-unguided": [Row("u", "a lamp", seed=5, **{**P, "guidance_scale": 1.0})],
    "img2img": [Row("i", "a painting", mode="img2img", seed=3, strength=0.6, **P),
                Row("j", "a photo", mode="img2img", seed=4, strength=0.6, num_images=2, **P)],
    "inpaint": [Row("p", "a hat", mode="inpaint", seed=6, **P), Row("q", "a cup", mode="inpaint", seed=7, **P)],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("pad_to", [0, 5])
def test_decoder_images_equal_the_np_path(predictors, case, pad_to):
    """The images kbatch returns (MoVQ output converted where it was made) equal, bit for bit, what diffusers'
    ``output_type="np"`` and the host-side conversion give for the same call; padded calls too."""
    prior, dec = predictors
    rows = CASES[case]
    inputs = [_inputs() if r.mode != "text2img" else None for r in rows]
    priors = [prior([r], [i])[0] for r, i in zip(rows, inputs)]  # prior batches share num_images
    dec.pad_to = pad_to
    try:
        out = dec(rows, priors, inputs)
        with dec.lanes.take() as lane:
            np_images, real = dec._pipeline_call(lane, rows, priors, inputs, "np")
    finally:
        dec.pad_to = 0
    want = (np.asarray(np_images[:real]) * 255).round().astype(np.uint8)
    got = np.concatenate([o.images for o in out])
    assert got.dtype == np.uint8 and got.shape == want.shape == (sum(r.num_images for r in rows), 64, 64, 3)
    assert np.array_equal(got, want), f"{case}: {(got != want).sum()} values differ"
    assert got.std() > 0  # not a constant image
