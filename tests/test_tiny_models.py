"""Tests for kbatch.models.tiny: tiny offline Kandinsky 2.1 folders that load like the real hub models."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from kbatch.models.tiny import COMPONENTS, TINY_EMBED_DIM, tiny_models_complete, write_tiny_models

STEPS = dict(num_inference_steps=10, prior_num_inference_steps=5)


def _digests(folder: str | Path) -> dict[str, str]:
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _quiet():
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    _quiet()
    root = tmp_path_factory.mktemp("tiny_kandinsky")
    paths = write_tiny_models(root)
    assert paths == {name: str(root / name) for name in COMPONENTS}
    return root


@pytest.fixture(scope="module")
def pipes(tiny_root):
    from diffusers import KandinskyInpaintPipeline, KandinskyPipeline, KandinskyPriorPipeline

    prior = KandinskyPriorPipeline.from_pretrained(tiny_root / "prior", use_safetensors=True)
    decoder = KandinskyPipeline.from_pretrained(tiny_root / "decoder", use_safetensors=True)
    inpaint = KandinskyInpaintPipeline.from_pretrained(tiny_root / "inpaint", use_safetensors=True)
    for pipe in (prior, decoder, inpaint):
        pipe.set_progress_bar_config(disable=True)
    return prior, decoder, inpaint


def _combined_kwargs(prior, decoder, unet=None) -> dict:
    return dict(
        text_encoder=decoder.text_encoder,
        tokenizer=decoder.tokenizer,
        unet=unet if unet is not None else decoder.unet,
        scheduler=decoder.scheduler,
        movq=decoder.movq,
        prior_prior=prior.prior,
        prior_image_encoder=prior.image_encoder,
        prior_text_encoder=prior.text_encoder,
        prior_tokenizer=prior.tokenizer,
        prior_scheduler=prior.scheduler,
        prior_image_processor=prior.image_processor,
    )


@pytest.fixture(scope="module")
def combined(pipes):
    from diffusers import KandinskyCombinedPipeline

    prior, decoder, _ = pipes
    pipe = KandinskyCombinedPipeline(**_combined_kwargs(prior, decoder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _rgb(seed: int = 0, size: int = 64) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def test_folders_are_complete_and_safetensors_only(tiny_root):
    assert tiny_models_complete(tiny_root)
    for name in COMPONENTS:
        folder = tiny_root / name
        assert (folder / "model_index.json").is_file()
        files = [p for p in folder.rglob("*") if p.is_file()]
        weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}]
        assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    # no staging / trash folders left behind
    assert sorted(p.name for p in tiny_root.iterdir() if p.is_dir()) == sorted(COMPONENTS)
    expected = {
        "prior": {"prior", "image_encoder", "text_encoder", "tokenizer", "scheduler", "image_processor"},
        "decoder": {"text_encoder", "tokenizer", "unet", "scheduler", "ddpm_scheduler", "movq"},
        "inpaint": {"text_encoder", "tokenizer", "unet", "scheduler", "ddpm_scheduler", "movq"},
    }
    for name, subs in expected.items():
        assert {p.name for p in (tiny_root / name).iterdir() if p.is_dir()} == subs


def test_two_builds_are_byte_identical(tiny_root, tmp_path):
    other = write_tiny_models(tmp_path / "again")
    for name in COMPONENTS:
        a, b = _digests(tiny_root / name), _digests(other[name])
        assert a.keys() == b.keys()
        assert a == b, [k for k in a if a[k] != b[k]]


def test_build_in_other_process_is_byte_identical(tiny_root, tmp_path):
    """Another interpreter (other hash seed, other Rust hash-map seeds) writes the same bytes."""
    import subprocess
    import sys

    out = tmp_path / "subprocess"
    code = "import sys; from kbatch.models.tiny import write_tiny_models; write_tiny_models(sys.argv[1])"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=repo, timeout=300)
    for name in COMPONENTS:
        assert _digests(tiny_root / name) == _digests(out / name), name


def test_inpaint_shares_decoder_components(tiny_root):
    for sub in ("text_encoder", "tokenizer", "movq", "scheduler"):
        assert _digests(tiny_root / "decoder" / sub) == _digests(tiny_root / "inpaint" / sub), sub
    assert _digests(tiny_root / "decoder" / "unet") != _digests(tiny_root / "inpaint" / "unet")


def test_existing_complete_folders_are_left_untouched(tiny_root):
    before = {p: p.stat().st_mtime_ns for p in tiny_root.rglob("*") if p.is_file()}
    paths = write_tiny_models(tiny_root)
    assert paths == {name: str(tiny_root / name) for name in COMPONENTS}
    after = {p: p.stat().st_mtime_ns for p in tiny_root.rglob("*") if p.is_file()}
    assert before == after


def test_incomplete_or_overwrite_rebuilds(tmp_path):
    root = tmp_path / "models"
    (root / "decoder").mkdir(parents=True)
    (root / "decoder" / "junk.txt").write_text("half written")
    paths = write_tiny_models(root)
    assert tiny_models_complete(root)
    assert not (root / "decoder" / "junk.txt").exists()
    first = _digests(paths["prior"])
    marker = Path(paths["prior"]) / "marker.txt"
    marker.write_text("x")
    write_tiny_models(root, overwrite=True)
    assert not marker.exists()
    assert _digests(paths["prior"]) == first
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(COMPONENTS)


# --------------------------------------------------------------------------------------------------
# Loading and configs
# --------------------------------------------------------------------------------------------------


def test_component_types_and_configs(pipes):
    from diffusers import DDIMScheduler, PriorTransformer, UNet2DConditionModel, UnCLIPScheduler, VQModel
    from diffusers.pipelines.kandinsky.text_encoder import MultilingualCLIP
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    prior, decoder, inpaint = pipes
    assert isinstance(prior.prior, PriorTransformer)
    assert isinstance(prior.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(prior.image_encoder, CLIPVisionModelWithProjection)
    assert isinstance(prior.scheduler, UnCLIPScheduler)
    for pipe in (decoder, inpaint):
        assert isinstance(pipe.text_encoder, MultilingualCLIP)
        assert isinstance(pipe.unet, UNet2DConditionModel)
        assert isinstance(pipe.scheduler, DDIMScheduler)
        assert isinstance(pipe.movq, VQModel)

    d = TINY_EMBED_DIM
    assert d % 16 == 0
    assert prior.prior.config.embedding_dim == d
    assert prior.image_encoder.config.projection_dim == d
    assert prior.text_encoder.config.projection_dim == d
    assert prior.text_encoder.config.hidden_size == prior.prior.config.embedding_dim
    assert prior.image_encoder.config.image_size == 32 and prior.image_encoder.config.patch_size == 8
    assert prior.image_processor.crop_size == {"height": 32, "width": 32}
    assert prior.prior.config.num_embeddings == 77 and prior.prior.config.additional_embeddings == 4

    for pipe, in_channels in ((decoder, 4), (inpaint, 9)):
        unet = pipe.unet.config
        assert unet.in_channels == in_channels
        assert unet.out_channels == 8
        assert unet.cross_attention_dim == d
        assert unet.addition_embed_type == "text_image"
        assert unet.encoder_hid_dim_type == "text_image_proj"
        assert unet.encoder_hid_dim == pipe.text_encoder.config.transformerDimensions == 32
        assert pipe.text_encoder.config.numDims == d
        assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
        assert pipe.text_encoder.config.pad_token_id == 1
        movq = pipe.movq.config
        assert movq.norm_type == "spatial" and movq.latent_channels == 4 and movq.vq_embed_dim == 4
        assert 2 ** (len(movq.block_out_channels) - 1) == 4
        assert movq.down_block_types[-1] == "AttnDownEncoderBlock2D"
        assert movq.up_block_types[0] == "AttnUpDecoderBlock2D"

    ddim = decoder.scheduler.config
    assert (ddim.beta_schedule, ddim.beta_start, ddim.beta_end) == ("linear", 0.00085, 0.012)
    assert (ddim.clip_sample, ddim.set_alpha_to_one, ddim.steps_offset) == (False, False, 1)
    assert ddim.prediction_type == "epsilon" and ddim.num_train_timesteps == 1000
    unclip = prior.scheduler.config
    assert (unclip.variance_type, unclip.prediction_type) == ("fixed_small_log", "sample")
    assert unclip.clip_sample is True and unclip.clip_sample_range == 10.0


def test_tokenizers(pipes):
    from kbatch.models.tiny import _build_clip_tokenizer, _build_xlmr_tokenizer

    prior, decoder, inpaint = pipes
    clip = prior.tokenizer
    ids = clip("a red cat").input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    inner = ids[1:-1]
    assert len(set(inner)) > 2
    assert clip.unk_token_id not in inner
    assert clip.model_max_length == 77
    # like the real CLIP vocab, <|endoftext|> has the highest id (legacy eos pooling uses argmax)
    assert clip.eos_token_id == len(clip) - 1 == prior.text_encoder.config.vocab_size - 1
    assert 500 <= len(clip) <= 1000
    # saved + reloaded tokenizer == freshly built one
    assert _build_clip_tokenizer()("a red cat on the moon").input_ids == clip("a red cat on the moon").input_ids

    xlmr = decoder.tokenizer
    assert xlmr.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert (xlmr.bos_token_id, xlmr.pad_token_id, xlmr.eos_token_id, xlmr.unk_token_id) == (0, 1, 2, 3)
    assert xlmr.mask_token_id == len(xlmr) - 1
    x_ids = xlmr("a red cat").input_ids
    assert x_ids[0] == 0 and x_ids[-1] == 2 and 3 not in x_ids and len(set(x_ids[1:-1])) > 2
    assert xlmr("A Red Cat, 42!").input_ids.count(3) == 0
    assert _build_xlmr_tokenizer()("a red cat").input_ids == x_ids
    assert inpaint.tokenizer("a red cat").input_ids == x_ids


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def test_prior_image_embeds(pipes):
    prior = pipes[0]
    out = prior("a red cat", num_images_per_prompt=2, num_inference_steps=5, generator=_gen(0))
    assert tuple(out.image_embeds.shape) == (2, TINY_EMBED_DIM)
    assert tuple(out.negative_image_embeds.shape) == (2, TINY_EMBED_DIM)
    assert torch.isfinite(out.image_embeds).all()
    other = prior("a blue dog", num_images_per_prompt=2, num_inference_steps=5, generator=_gen(0))
    assert not torch.equal(out.image_embeds, other.image_embeds)


def test_prior_interpolate(pipes):
    prior = pipes[0]
    out = prior.interpolate(["a red cat", _rgb(3)], [0.3, 0.7], num_inference_steps=5, generator=_gen(0))
    assert tuple(out.image_embeds.shape) == (1, TINY_EMBED_DIM)
    assert tuple(out.negative_image_embeds.shape) == (1, TINY_EMBED_DIM)
    assert torch.isfinite(out.image_embeds).all()


def test_combined_text2img_deterministic(combined):
    def run(seed):
        return combined("a red cat", height=64, width=64, output_type="np", generator=_gen(seed), **STEPS).images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, 64, 64, 3)
    assert a.dtype == np.float32 and np.isfinite(a).all()
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_combined_img2img(pipes):
    from diffusers import KandinskyImg2ImgCombinedPipeline

    prior, decoder, _ = pipes
    pipe = KandinskyImg2ImgCombinedPipeline(**_combined_kwargs(prior, decoder))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a red cat", image=_rgb(1), strength=0.6, height=64, width=64, output_type="np", generator=_gen(0), **STEPS
    ).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_combined_inpaint(pipes):
    from diffusers import KandinskyInpaintCombinedPipeline

    prior, decoder, inpaint = pipes
    # decoder components are shared; only the 9-channel UNet comes from the inpaint folder
    pipe = KandinskyInpaintCombinedPipeline(**_combined_kwargs(prior, decoder, unet=inpaint.unet))
    pipe.set_progress_bar_config(disable=True)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255  # white = repaint
    out = pipe(
        "a red cat",
        image=_rgb(2),
        mask_image=PIL.Image.fromarray(mask),
        height=64,
        width=64,
        output_type="np",
        generator=_gen(0),
        **STEPS,
    ).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_cli(tmp_path, capsys):
    from kbatch.models.tiny import _main

    root = tmp_path / "cli"
    assert _main([str(root)]) == 0
    assert tiny_models_complete(root)
    assert str(root / "prior") in capsys.readouterr().out
    assert os.path.isdir(root / "inpaint" / "unet")
