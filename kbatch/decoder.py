"""The decoder stage: image-embedding pairs (+ init image / mask) -> uint8 images.

``DecoderPredictor`` loads once and maps a batch in ``__call__`` with the diffusers pipelines themselves
(``KandinskyPipeline``, ``KandinskyImg2ImgPipeline`` sharing its modules, ``KandinskyInpaintPipeline``
loaded on first use). Rows in one call share ``Row.decoder_key()`` (mode, size, steps, guidance, strength).
Each image is its own batch element with its row's generator (restored from the state the prior left), so
a row's pixels do not depend on which rows share its batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .models import Placement, dtype_name, load_decoder, load_inpaint, placement
from .outputs import DecoderOutput, PriorOutput
from .prior import generator_from_state
from .schema import Row


@dataclass
class DecoderFaults:
    """Fault injection for tests and drills (config ``faults``)."""

    crash_once_file: str | None = None
    crash_on_prompt: str | None = None

    def maybe_crash(self, rows: list[Row]):
        if self.crash_on_prompt is not None and any(r.prompt == self.crash_on_prompt for r in rows):
            os._exit(1)
        if self.crash_once_file and not os.path.exists(self.crash_once_file):
            with open(self.crash_once_file, "w") as fh:
                fh.write("crashed\n")
            os._exit(1)


class _HeightWidthFix:
    """diffusers' KandinskyImg2ImgPipeline calls ``image_processor.preprocess(image, width, height)`` against
    the signature ``(image, height, width)``: square sizes are unaffected, other sizes fail with a latents
    shape error. This passes the two back in the right order, so img2img works at any size and equals
    diffusers wherever diffusers works."""

    def __init__(self, processor):
        self._processor = processor

    def preprocess(self, image, width, height, **kw):
        return self._processor.preprocess(image, height=height, width=width, **kw)

    def __getattr__(self, name):
        return getattr(self._processor, name)


class DecoderPredictor:
    def __init__(self, model: str, inpaint_model: str | None = None, *, device: str = "auto",
                 dtype: str = "float32", scheduler: str = "ddim", offload: bool = False, threads: int = 0,
                 channels_last: bool = True, compile: bool = False, revision: str | None = None,
                 faults: DecoderFaults | None = None, pad_to: int = 0):
        """``pad_to``: fill every call up to this many images with throw-away copies of its last image, so
        that a compiled UNet sees one batch size per shape (a key's last, partial batch would otherwise
        recompile it: minutes on full-size models). The padding never changes the real images."""
        self.place: Placement = placement(device, dtype, threads)
        self.pad_to = pad_to
        self._opts = dict(scheduler=scheduler, offload=offload, channels_last=channels_last, compile=compile,
                          revision=revision)
        self.pipe = load_decoder(model, self.place, **self._opts)
        self.inpaint_model = inpaint_model
        self._img2img = None
        self._inpaint = None
        self.faults = faults or DecoderFaults()

    @property
    def worker(self) -> str:
        return self.place.worker

    def img2img(self):
        if self._img2img is None:
            from diffusers import KandinskyImg2ImgPipeline

            self._img2img = KandinskyImg2ImgPipeline(**self.pipe.components)
            self._img2img.image_processor = _HeightWidthFix(self._img2img.image_processor)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    def inpaint(self):
        if self._inpaint is None:
            if not self.inpaint_model:
                raise ValueError("mode: 'inpaint' rows need models.inpaint")
            self._inpaint = load_inpaint(self.inpaint_model, self.pipe, self.place, **self._opts)
        return self._inpaint

    @torch.inference_mode()
    def __call__(self, rows: list[Row], priors: list[PriorOutput], inputs: list[dict | None] | None = None
                 ) -> list[DecoderOutput]:
        import time

        if not rows:
            return []
        self.faults.maybe_crash(rows)
        key = rows[0].decoder_key()
        if any(r.decoder_key() != key for r in rows):
            raise ValueError(f"decoder batch mixes keys: {sorted({r.decoder_key() for r in rows}, key=str)}")
        t0 = time.perf_counter()
        inputs = inputs or [None] * len(rows)
        prompts, gens, inits, masks = [], [], [], []
        for r, p, inp in zip(rows, priors, inputs):
            g = generator_from_state(p.generator_state)
            prompts += [r.prompt] * r.num_images
            gens += [g] * r.num_images
            if r.mode in ("img2img", "inpaint"):
                inits += [inp["init_image"]] * r.num_images
            if r.mode == "inpaint":
                masks += [inp["mask"]] * r.num_images
        dtype, device = self.place.dtype, self.place.device
        emb = np.concatenate([p.image_embeds for p in priors])
        neg = np.concatenate([p.negative_image_embeds for p in priors])
        real = len(prompts)
        if self.pad_to > real:
            extra = self.pad_to - real
            prompts += prompts[-1:] * extra
            gens += [torch.Generator("cpu").manual_seed(0) for _ in range(extra)]
            inits += inits[-1:] * extra
            masks += masks[-1:] * extra
            emb = np.concatenate([emb] + [emb[-1:]] * extra)
            neg = np.concatenate([neg] + [neg[-1:]] * extra)
        emb = torch.from_numpy(emb).to(device, dtype)
        neg = torch.from_numpy(neg).to(device, dtype)
        r0 = rows[0]
        kw = dict(prompt=prompts, image_embeds=emb, negative_image_embeds=neg, height=r0.height, width=r0.width,
                  num_inference_steps=r0.num_inference_steps, guidance_scale=r0.guidance_scale, generator=gens,
                  output_type="np")
        if r0.mode == "img2img":
            images = self.img2img()(image=inits, strength=r0.strength, **kw).images
        elif r0.mode == "inpaint":
            images = self.inpaint()(image=inits, mask_image=masks, **kw).images
        else:  # text2img, interpolate
            images = self.pipe(**kw).images
        images = (np.asarray(images[:real]) * 255).round().astype(np.uint8)
        per_image = (time.perf_counter() - t0) / len(images)
        out, k = [], 0
        for r, p in zip(rows, priors):
            out.append(DecoderOutput(r.id, images[k:k + r.num_images], p.prior_worker, self.worker, per_image,
                                     dtype_name(self.place.dtype)))
            k += r.num_images
        return out
