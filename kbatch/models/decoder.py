"""The decoder stage: image-embedding pairs (+ init image / mask) -> uint8 images.

``DecoderPredictor`` loads once and maps a batch in ``__call__`` with the diffusers pipelines themselves
(``KandinskyPipeline``, ``KandinskyImg2ImgPipeline`` sharing its modules, ``KandinskyInpaintPipeline`` loaded
at start when the job has inpaint rows, sharing the decoder's text encoder and MoVQ when their files are
equal). Rows in one call share ``Row.decoder_key()`` (mode, size, steps, guidance, strength).
Each image is its own batch element with its row's generator (restored from the state the prior left), so
a row's pixels do not depend on which rows share its batch.

The pipelines return the MoVQ output as a tensor on the device (``output_type="pt"``), and ``to_uint8``
converts it there with the arithmetic of diffusers' ``output_type="np"`` path: only uint8 crosses to the
host (a quarter of fp16's bytes, an eighth of float32's), and the host thread no longer spends ~18 ms per
512x512 image on permute / float / x255 / round while the GPU waits.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from kbatch.models.lanes import Lanes, clone_pipeline
from kbatch.models.loading import Placement, dtype_name, load_decoder, load_inpaint, placement
from kbatch.schema.payloads import DecoderOutput, PriorOutput
from kbatch.models.prior import generator_from_state
from kbatch.models.scoring import (QualitySpec, candidate_count, cosine_scores, keep_best, plan_gate,
                                   predicted_clip_scores, prune, row_text_embeds)
from kbatch.schema.rows import Row


def to_uint8(images: torch.Tensor):
    """MoVQ output (N, 3, H, W) in [-1, 1], on its device -> (N, H, W, 3) uint8 numpy on the host.

    Bit for bit what kbatch got from diffusers' ``output_type="np"`` path followed by
    ``(x * 255).round().astype(uint8)``: ``x * 0.5 + 0.5`` and ``clamp(0, 1)`` in the model's dtype, then
    float32, x255, round half to even (torch and numpy round alike), uint8. All of it runs where the tensor
    is; only the uint8 image is copied to the host."""
    x = (images * 0.5 + 0.5).clamp(0, 1)
    x = x.float().mul_(255).round_().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


class _Img2ImgProcessor:
    """The img2img pipeline's image processor, with two fixes.

    * diffusers' KandinskyImg2ImgPipeline calls ``image_processor.preprocess(image, width, height)`` against
      the signature ``(image, height, width)``: square sizes are unaffected, other sizes fail with a latents
      shape error. This passes the two back in the right order, so img2img works at any size and equals
      diffusers wherever diffusers works.
    * With ``output_type="pt"`` the text2img and inpaint pipelines return the MoVQ output as it is, while
      img2img's ``postprocess`` denormalizes it; here it too returns it as it is, so ``to_uint8`` does the
      same arithmetic for every mode."""

    def __init__(self, processor):
        self._processor = processor

    def preprocess(self, image, width, height, **kw):
        return self._processor.preprocess(image, height=height, width=width, **kw)

    def postprocess(self, image, output_type="pil", **kw):
        if output_type == "pt":
            return image
        return self._processor.postprocess(image, output_type, **kw)

    def __getattr__(self, name):
        return getattr(self._processor, name)


class _Lane:
    """One lane's pipelines (``kbatch.models.lanes``): text2img, and img2img / inpaint made on first use."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.img2img = None
        self.inpaint = None


class DecoderPredictor:
    def __init__(self, model: str, inpaint_model: str | None = None, *, device: str = "auto",
                 dtype: str = "float32", scheduler: str = "ddim", offload: bool = False, threads: int = 0,
                 channels_last: bool = True, compile: bool = False, revision: str | None = None,
                 pad_to: int = 0, concurrency: int = 1,
                 storage_options: dict | None = None, cache_dir: str | None = None, scorer=None):
        """``pad_to``: fill every call up to this many images with throw-away copies of its last image, so
        that a compiled UNet sees one batch size per shape (a key's last, partial batch would otherwise
        recompile it: minutes on full-size models). The padding never changes the real images.
        ``concurrency``: batches that may run at once from different threads (``kbatch.models.lanes``), sharing
        the weights; each uses ``threads`` torch threads.
        ``inpaint_model``: given when the job has inpaint rows; loaded here, at actor start, so that a bad
        inpaint model fails the start with one clear error instead of every inpaint row.
        ``storage_options`` / ``cache_dir``: for model URLs (``kbatch.models.store.stage_model``)."""
        self.place: Placement = placement(device, dtype, threads)
        self.pad_to = pad_to
        self.warmup_by_shape: dict[str, float] = {}  # filled by warmup()
        self._opts = dict(scheduler=scheduler, offload=offload, channels_last=channels_last, compile=compile,
                          revision=revision, storage_options=storage_options, cache_dir=cache_dir)
        self.pipe = load_decoder(model, self.place, **self._opts)
        self.lanes = Lanes(concurrency, lambda i: _Lane(self.pipe if i == 0 else clone_pipeline(self.pipe)))
        self.inpaint_model = inpaint_model
        self.scorer = scorer  # quality: a kbatch.models.scoring.ClipScorer scores (and picks) what is decoded
        self.quality: QualitySpec | None = None  # what is measured (the actor sets it; see ``measures``)
        self.decoded = 0  # images decoded (candidates included): the gate's saving, counted
        self._count_lock = threading.Lock()
        # one copy shared by the lanes (each lane clones its scheduler and tokenizer on first use)
        self._inpaint = load_inpaint(inpaint_model, self.pipe, self.place, **self._opts) if inpaint_model else None

    @property
    def worker(self) -> str:
        return self.place.worker

    def _img2img(self, lane: _Lane):
        if lane.img2img is None:
            from diffusers import KandinskyImg2ImgPipeline

            lane.img2img = KandinskyImg2ImgPipeline(**lane.pipe.components)
            lane.img2img.image_processor = _Img2ImgProcessor(lane.img2img.image_processor)
            lane.img2img.set_progress_bar_config(disable=True)
        return lane.img2img

    def _inpaint_pipe(self, lane: _Lane):
        if lane.inpaint is None:
            if self._inpaint is None:
                raise ValueError("mode: 'inpaint' rows need models.inpaint")
            lane.inpaint = self._inpaint if lane is self.lanes.all[0] else clone_pipeline(self._inpaint)
        return lane.inpaint

    @torch.inference_mode()
    def warmup(self, shapes) -> float:
        """One throw-away call per ``Row.unet_shape()`` at the padded batch size and one step, so that a
        compiled UNet compiles each shape before the first real batch (tens of seconds per shape for the
        full-size UNet). Real batches of those shapes then reuse the graphs. Returns the seconds spent."""
        import time

        from PIL import Image

        t0 = time.perf_counter()
        n = max(1, self.pad_to)
        dim = self.pipe.unet.config.cross_attention_dim  # = the prior's image-embedding size
        emb = torch.zeros(n, dim, device=self.place.device, dtype=self.place.dtype)
        self.warmup_by_shape = {}  # "base 512x512 cfg" -> seconds of its first (compiling) call
        with self.lanes.take() as lane:
            for unet, height, width, guided in sorted(set(shapes)):
                t_shape = time.perf_counter()
                kw = dict(prompt=[""] * n, image_embeds=emb, negative_image_embeds=emb, height=height, width=width,
                          num_inference_steps=1, guidance_scale=4.0 if guided else 1.0, output_type="pt",
                          generator=[torch.Generator("cpu").manual_seed(0) for _ in range(n)])
                if unet == "inpaint":
                    image = Image.new("RGB", (width, height), (127, 127, 127))
                    mask = Image.new("L", (width, height), 255)
                    out = self._inpaint_pipe(lane)(image=[image] * n, mask_image=[mask] * n, **kw).images
                else:
                    out = lane.pipe(**kw).images
                to_uint8(out)  # the path real batches take; its copy to the host waits for the device
                key = f"{unet} {height}x{width}{' cfg' if guided else ''}"
                self.warmup_by_shape[key] = round(time.perf_counter() - t_shape, 3)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def __call__(self, rows: list[Row], priors: list[PriorOutput], inputs: list[dict | None] | None = None
                 ) -> list[DecoderOutput]:
        if not rows:
            return []
        with self.lanes.take() as lane:
            return self._run(lane, rows, priors, inputs)

    @property
    def measures(self) -> QualitySpec:
        """What is measured of each image (``quality``, set by the actor; else clip_score with a scorer)."""
        return self.quality if self.quality is not None else QualitySpec(clip=self.scorer is not None)

    def _run(self, lane: _Lane, rows: list[Row], priors: list[PriorOutput], inputs) -> list[DecoderOutput]:
        import time

        t0 = time.perf_counter()
        q = self.measures
        plans, drows, dpriors, dinputs = None, rows, priors, inputs
        if q.gate_head is not None:  # the prior's predicted embeddings scored: gated candidates never decoded
            if q.gate_head == "clip_score":
                predicted = predicted_clip_scores(self.scorer, rows, priors)
            else:
                predicted = [q.heads[q.gate_head](p.image_embeds) for p in priors]
            plans = plan_gate(rows, priors, predicted, q.gate_min)
            drows, dpriors = prune(rows, priors, plans)
            if inputs is not None:
                decoded = {r.id for r in drows}
                dinputs = [inp for r, inp in zip(rows, inputs) if r.id in decoded]
        if drows:
            raw, real = self._pipeline_call(lane, drows, dpriors, dinputs, "pt")
            images = to_uint8(raw[:real])
        else:
            images = np.zeros((0, rows[0].height, rows[0].width, 3), np.uint8)
        with self._count_lock:
            self.decoded += len(images)
        per_image = (time.perf_counter() - t0) / max(1, len(images))
        dtype = dtype_name(self.place.dtype)
        scores, embeds = self._measure(drows, dpriors, images)
        return keep_best(rows, priors, images, scores,
                         lambda r, p, kept: DecoderOutput(r.id, kept, p.prior_worker, self.worker, per_image, dtype),
                         plans=plans, embeds=embeds, heads=q.head_scores(embeds), gate=q.gate_label)

    def _measure(self, rows: list[Row], priors: list[PriorOutput], images):
        """quality: (the clip_score, the CLIP image embedding) of every decoded image (candidates included),
        each None when the job does not need it. One vision pass serves both and the heads."""
        q = self.measures
        if self.scorer is None or not q.embeds:
            return None, None
        embeds = self.scorer.image_embeds(images) if len(images) else None
        if not q.clip or embeds is None:
            return None, embeds
        texts = row_text_embeds(self.scorer, rows, priors)
        per_image = [t for r, p, t in zip(rows, priors, texts) for _ in range(r.num_images * len(p.states))]
        return cosine_scores(embeds, np.stack(per_image)), embeds

    def _pipeline_call(self, lane: _Lane, rows: list[Row], priors: list[PriorOutput], inputs, output_type: str):
        """The diffusers call for a batch (padded to ``pad_to``): (its ``.images``, the number of real images,
        which come first). ``output_type="pt"``: the MoVQ output on the device, for ``to_uint8``; tests call
        it with ``"np"`` to compare with diffusers' own host-side conversion."""
        key = rows[0].decoder_key()
        if any(r.decoder_key() != key for r in rows):
            raise ValueError(f"decoder batch mixes keys: {sorted({r.decoder_key() for r in rows}, key=str)}")
        inputs = inputs or [None] * len(rows)
        prompts, gens, inits, masks = [], [], [], []
        for r, p, inp in zip(rows, priors, inputs):
            n = r.num_images * candidate_count(r, p)  # quality.best_of: every candidate, candidate-major
            for state in p.states:  # one generator per candidate, drawn from by each of its images
                gens += [generator_from_state(state)] * r.num_images
            prompts += [r.prompt] * n
            if r.mode in ("img2img", "inpaint"):
                inits += [inp["init_image"]] * n
            if r.mode == "inpaint":
                masks += [inp["mask"]] * n
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
                  output_type=output_type)
        if r0.mode == "img2img":
            images = self._img2img(lane)(image=inits, strength=r0.strength, **kw).images
        elif r0.mode == "inpaint":
            images = self._inpaint_pipe(lane)(image=inits, mask_image=masks, **kw).images
        else:  # text2img, interpolate
            images = lane.pipe(**kw).images
        return images, real
