"""Plain diffusers, one row at a time: what docs/manifest.md, reproducing an image promises kbatch images equal."""
import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=4)
def pipes(prior_dir, decoder_dir, inpaint_dir, scheduler="ddim"):
    from diffusers import (KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline,
                           KandinskyInpaintCombinedPipeline, KandinskyInpaintPipeline, KandinskyPipeline,
                           KandinskyPriorPipeline)

    from kbatch.models.schedulers import DECODER_SCHEDULERS, make_scheduler

    prior = KandinskyPriorPipeline.from_pretrained(prior_dir, use_safetensors=True)
    dec = KandinskyPipeline.from_pretrained(decoder_dir, use_safetensors=True)
    inp = KandinskyInpaintPipeline.from_pretrained(inpaint_dir, use_safetensors=True)
    sched = make_scheduler(scheduler, dec.scheduler, DECODER_SCHEDULERS)
    p = dict(prior_prior=prior.prior, prior_image_encoder=prior.image_encoder, prior_text_encoder=prior.text_encoder,
             prior_tokenizer=prior.tokenizer, prior_scheduler=prior.scheduler,
             prior_image_processor=prior.image_processor)
    d = dict(text_encoder=dec.text_encoder, tokenizer=dec.tokenizer, unet=dec.unet, scheduler=sched, movq=dec.movq)
    i = dict(text_encoder=inp.text_encoder, tokenizer=inp.tokenizer, unet=inp.unet,
             scheduler=make_scheduler(scheduler, inp.scheduler, DECODER_SCHEDULERS), movq=inp.movq)
    out = {"prior": prior, "decoder": KandinskyPipeline(**d),
           "text2img": KandinskyCombinedPipeline(**d, **p), "img2img": KandinskyImg2ImgCombinedPipeline(**d, **p),
           "inpaint": KandinskyInpaintCombinedPipeline(**i, **p)}
    for v in out.values():
        v.set_progress_bar_config(disable=True)
    return out


def to_uint8(images):
    return (np.asarray(images) * 255).round().astype(np.uint8)


@torch.inference_mode()
def render_row(models, row: dict, scheduler="ddim", init_image=None, mask=None, mix_images=None):
    """Images (n, H, W, 3) uint8 of one row dict (all params present), as docs/manifest.md, reproducing an image spells the call."""
    ps = pipes(models["prior"], models["decoder"], models["inpaint"], scheduler)
    g = torch.Generator("cpu").manual_seed(row["seed"])
    common = dict(height=row["height"], width=row["width"], num_inference_steps=row["num_inference_steps"],
                  guidance_scale=row["guidance_scale"], generator=g, output_type="np")
    mode = row.get("mode", "text2img")
    if mode == "interpolate":
        conds = [it["prompt"] if it.get("prompt") is not None else mix_images[k] for k, it in enumerate(row["mix"])]
        out = ps["prior"].interpolate(conds, [it["weight"] for it in row["mix"]],
                                      num_inference_steps=row["prior_num_inference_steps"],
                                      guidance_scale=row["prior_guidance_scale"], generator=g,
                                      negative_prior_prompt=row.get("negative_prompt"))
        return to_uint8(ps["decoder"](row["prompt"], out.image_embeds, out.negative_image_embeds, **common).images)
    kw = dict(prompt=row["prompt"], negative_prompt=row.get("negative_prompt"),
              num_images_per_prompt=row["num_images"], prior_num_inference_steps=row["prior_num_inference_steps"],
              prior_guidance_scale=row["prior_guidance_scale"], **common)
    if mode == "img2img":
        return to_uint8(ps["img2img"](image=init_image, strength=row["strength"], **kw).images)
    if mode == "inpaint":
        return to_uint8(ps["inpaint"](image=init_image, mask_image=mask, **kw).images)
    return to_uint8(ps["text2img"](**kw).images)
