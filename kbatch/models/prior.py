"""The prior stage: text (or a weighted mix of texts and images) -> CLIP image-embedding pairs.

``PriorPredictor`` loads once in ``__init__`` and maps a batch of rows in ``__call__``; it runs the
diffusers ``KandinskyPriorPipeline`` itself and needs no Ray, so tests call it directly.

Determinism: every row gets its own ``torch.Generator("cpu").manual_seed(row.seed)``. The pipeline draws a
list of generators element by element in batch order; giving each batch element its row's generator makes
each generator see exactly the draws it would see for that row alone (the prior appends negative prompts
after the positives, so the list is the positives' generators twice). The generator's state after the
prior travels with the embeddings, as ``KandinskyCombinedPipeline`` hands its one generator to the decoder.
"""
from __future__ import annotations


import numpy as np
import torch

from kbatch.models.lanes import Lanes, clone_pipeline
from kbatch.models.loading import Placement, load_prior, placement
from kbatch.schema.payloads import PriorOutput
from kbatch.schema.rows import Row


class PriorPredictor:
    def __init__(self, model: str, *, device: str = "auto", dtype: str = "float32", scheduler: str = "unclip",
                 offload: bool = False, threads: int = 0, revision: str | None = None, concurrency: int = 1,
                 storage_options: dict | None = None, cache_dir: str | None = None):
        """``concurrency``: batches that may run at once from different threads (``kbatch.models.lanes``); each
        uses ``threads`` torch threads. ``storage_options`` / ``cache_dir``: for a model URL
        (``kbatch.models.store.stage_model``)."""
        self.place: Placement = placement(device, dtype, threads)
        self.pipe = load_prior(model, self.place, scheduler=scheduler, offload=offload, revision=revision,
                               storage_options=storage_options, cache_dir=cache_dir)
        self.lanes = Lanes(concurrency, lambda i: self.pipe if i == 0 else clone_pipeline(self.pipe))

    @property
    def worker(self) -> str:
        return self.place.worker

    @torch.inference_mode()
    def __call__(self, rows: list[Row], inputs: list[dict | None] | None = None) -> list[PriorOutput]:
        """Rows must share ``Row.prior_key()``. ``inputs[i]["mix_images"]`` holds decoded mix images."""
        if not rows:
            return []
        with self.lanes.take() as pipe:
            return self._run(pipe, rows, inputs)

    def _run(self, pipe, rows: list[Row], inputs) -> list[PriorOutput]:
        if rows[0].mode == "interpolate":
            return [self._interpolate(pipe, r, (inputs or [None])[i]) for i, r in enumerate(rows)]
        key = rows[0].prior_key()
        if any(r.prior_key() != key for r in rows):
            raise ValueError(f"prior batch mixes keys: {sorted({r.prior_key() for r in rows})}")
        gens = [torch.Generator("cpu").manual_seed(r.seed) for r in rows]
        n = rows[0].num_images
        per_image = [g for g in gens for _ in range(n)]
        has_neg = rows[0].negative_prompt is not None
        out = pipe(
            prompt=[r.prompt for r in rows],
            negative_prompt=[r.negative_prompt for r in rows] if has_neg else None,
            num_images_per_prompt=n,
            num_inference_steps=rows[0].prior_num_inference_steps,
            guidance_scale=rows[0].prior_guidance_scale,
            generator=per_image * 2 if has_neg else per_image,
            output_type="pt",
        )
        emb, neg = _np(out.image_embeds), _np(out.negative_image_embeds)
        return [PriorOutput(r.id, emb[i * n:(i + 1) * n], neg[i * n:(i + 1) * n], _state(gens[i]), self.worker)
                for i, r in enumerate(rows)]

    def _interpolate(self, pipe, row: Row, inputs: dict | None) -> PriorOutput:
        """``KandinskyPriorPipeline.interpolate`` for one row.

        diffusers sums the embeddings of all ``num_images`` into one when ``num_images_per_prompt > 1``
        (image_embeds [1, D] but negative [n, D]). For n > 1 kbatch mixes per image instead: image i gets
        sum_k weight_k * embedding_k,i, with the generator drawn in the same order as ``interpolate``.
        """
        g = torch.Generator("cpu").manual_seed(row.seed)
        images = (inputs or {}).get("mix_images") or [None] * len(row.mix)
        conds = [item.prompt if item.prompt is not None else images[k] for k, item in enumerate(row.mix)]
        if any(c is None for c in conds):
            raise ValueError(f"mix: row {row.id!r} has an image item without a loaded image")
        weights = [item.weight for item in row.mix]
        n = row.num_images
        kw = dict(num_inference_steps=row.prior_num_inference_steps, guidance_scale=row.prior_guidance_scale,
                  negative_prior_prompt=row.negative_prompt)
        if n == 1:
            out = pipe.interpolate(conds, weights, num_images_per_prompt=1, generator=g, **kw)
            return PriorOutput(row.id, _np(out.image_embeds), _np(out.negative_image_embeds), _state(g), self.worker)
        device = pipe._execution_device
        parts = []
        for cond, w in zip(conds, weights):
            if isinstance(cond, str):
                e = pipe(cond, num_inference_steps=kw["num_inference_steps"], num_images_per_prompt=n,
                         generator=g, negative_prompt=row.negative_prompt,
                         guidance_scale=kw["guidance_scale"]).image_embeds
            else:
                px = pipe.image_processor(cond, return_tensors="pt").pixel_values[0].unsqueeze(0)
                px = px.to(dtype=pipe.image_encoder.dtype, device=device)
                e = pipe.image_encoder(px)["image_embeds"].expand(n, -1)
            parts.append(e * w)
        emb = torch.stack(parts).sum(dim=0)
        zero = pipe("", num_inference_steps=kw["num_inference_steps"], num_images_per_prompt=n, generator=g,
                         negative_prompt=row.negative_prompt, guidance_scale=kw["guidance_scale"])
        return PriorOutput(row.id, _np(emb), _np(zero.negative_image_embeds), _state(g), self.worker)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _state(g: torch.Generator) -> bytes:
    return g.get_state().numpy().tobytes()


def generator_from_state(state: bytes) -> torch.Generator:
    g = torch.Generator("cpu")
    g.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return g
