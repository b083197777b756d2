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

import dataclasses

import numpy as np
import torch

from kbatch.models.lanes import Lanes, clone_pipeline
from kbatch.models.loading import Placement, load_prior, placement
from kbatch.models.scoring import ClipScorer
from kbatch.models.store import stage_model
from kbatch.schema.payloads import PriorOutput
from kbatch.schema.rows import Row, candidate_seeds


class PriorPredictor:
    def __init__(self, model: str, *, device: str = "auto", dtype: str = "float32", scheduler: str = "unclip",
                 offload: bool = False, threads: int = 0, revision: str | None = None, concurrency: int = 1,
                 storage_options: dict | None = None, cache_dir: str | None = None, clip_text: bool = False):
        """``concurrency``: batches that may run at once from different threads (``kbatch.models.lanes``); each
        uses ``threads`` torch threads. ``storage_options`` / ``cache_dir``: for a model URL
        (``kbatch.models.store.stage_model``). ``clip_text``: every output carries its prompt's CLIP text
        embedding (``quality`` scores, ``kbatch.models.scoring``)."""
        self.place: Placement = placement(device, dtype, threads)
        self.pipe = load_prior(model, self.place, scheduler=scheduler, offload=offload, revision=revision,
                               storage_options=storage_options, cache_dir=cache_dir)
        self.lanes = Lanes(concurrency, lambda i: self.pipe if i == 0 else clone_pipeline(self.pipe))
        self.scorer = None
        if clip_text:  # float32 encoders: the pipeline's own, or (float16 / bfloat16 pipeline) the folder's
            path = None if self.place.dtype == torch.float32 else stage_model(model, storage_options, cache_dir,
                                                                               revision)
            self.scorer = ClipScorer(pipe=self.pipe, path=path, device=self.place.device)

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
            return self._with_text(rows, [self._interpolate_candidates(pipe, r, (inputs or [None])[i])
                                          for i, r in enumerate(rows)])
        key = rows[0].prior_key()
        if any(r.prior_key() != key for r in rows):
            raise ValueError(f"prior batch mixes keys: {sorted({r.prior_key() for r in rows})}")
        # quality.best_of: each candidate seed of a row is one more prompt of the batch (candidate-major)
        cands = [(r, s) for r in rows for s in candidate_seeds(r.seed, r.candidates)]
        gens = [torch.Generator("cpu").manual_seed(s) for _, s in cands]
        n = rows[0].num_images
        per_image = [g for g in gens for _ in range(n)]
        has_neg = rows[0].negative_prompt is not None
        out = pipe(
            prompt=[r.prompt for r, _ in cands],
            negative_prompt=[r.negative_prompt for r, _ in cands] if has_neg else None,
            num_images_per_prompt=n,
            num_inference_steps=rows[0].prior_num_inference_steps,
            guidance_scale=rows[0].prior_guidance_scale,
            generator=per_image * 2 if has_neg else per_image,
            output_type="pt",
        )
        emb, neg = _np(out.image_embeds), _np(out.negative_image_embeds)
        outs, at = [], 0
        for r in rows:
            k = r.candidates
            outs.append(_with_candidates(
                PriorOutput(r.id, emb[at * n:(at + k) * n], neg[at * n:(at + k) * n], _state(gens[at]), self.worker),
                [s for _, s in cands[at:at + k]], [_state(g) for g in gens[at:at + k]]))
            at += k
        return self._with_text(rows, outs)

    def _with_text(self, rows: list[Row], outs: list[PriorOutput]) -> list[PriorOutput]:
        """quality scores: each row's prompt embedding, once per row, beside the pipeline's own text pass."""
        if self.scorer is not None:
            for o, t in zip(outs, self.scorer.text_embeds([r.prompt for r in rows])):
                o.text_embeds = t
        return outs

    def _interpolate_candidates(self, pipe, row: Row, inputs: dict | None) -> PriorOutput:
        """``_interpolate`` once per candidate seed (quality.best_of), stacked candidate-major."""
        if row.candidates == 1:
            return self._interpolate(pipe, row, inputs)
        seeds = candidate_seeds(row.seed, row.candidates)
        parts = [self._interpolate(pipe, dataclasses.replace(row, seed=s), inputs) for s in seeds]
        merged = PriorOutput(row.id, np.concatenate([p.image_embeds for p in parts]),
                             np.concatenate([p.negative_image_embeds for p in parts]), parts[0].generator_state,
                             self.worker)
        return _with_candidates(merged, seeds, [p.generator_state for p in parts])

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


def _with_candidates(out: PriorOutput, seeds: list[int], states: list[bytes]) -> PriorOutput:
    if len(seeds) > 1:
        out.candidate_seeds, out.candidate_states = list(seeds), list(states)
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _state(g: torch.Generator) -> bytes:
    return g.get_state().numpy().tobytes()


def generator_from_state(state: bytes) -> torch.Generator:
    g = torch.Generator("cpu")
    g.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return g
