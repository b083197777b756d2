"""Quality scores (docs/quality.md): the CLIP score of every image, and best-of-k selection.

``clip_score`` = 100 x cosine(CLIP image embedding of the image as written, CLIP text embedding of the row's
``prompt``), with the prior model folder's own ``image_encoder`` / ``image_processor`` and ``text_encoder`` /
``tokenizer`` (CLIP ViT-L/14 in Kandinsky 2.1): what transformers' ``CLIPVisionModelWithProjection`` and
``CLIPTextModelWithProjection`` give for that image file and prompt.

Where each half runs (docs/quality.md has the measurements):

* **text**: in the prior, once per row, with the prior pipeline's own tokenizer and text encoder, in a pass
  beside the pipeline's (the pipeline's own pass mixes in the negative prompts and returns nothing), tokenized
  as the pipeline tokenizes. The embedding (768 floats) travels with the image embeddings
  (``PriorOutput.text_embeds``) and is stored in embeddings outputs (``stage: prior``); a decoder that gets
  none (embeddings written without scores) computes it itself.
* **images**: in the decoder actor, where the images are: the prior folder's image encoder (loaded once per
  decoder replica; a colocated process reuses the prior's own) scores every image the moment it is
  decoded, and with ``best_of`` keeps the best candidate per image index, so only kept images go to the
  object store and the writer; nothing passes through the driver.
* **as written**: png, and webp at quality 100, are lossless: the uint8 pixels are what the file holds. jpeg
  and lossy webp are encoded exactly as the writer encodes them (``kbatch.output.writer.encode_image``, same
  settings, deterministic) and decoded again: the score is the score of the file a reader opens.
* The encoders run in float32 whatever ``models.dtype`` is (a float16 copy is made float32 once): the score is
  the float32 number a user computes, to ~1e-4.

best_of: the k candidates of a row are rendered in the same calls (the prior and the decoder expand a row to
k seeds: ``schema.rows.candidate_seeds``); per image index i the candidate with the highest score is kept
(the first on ties). Its image is image i of plain diffusers' call with that candidate's seed and the row's
``num_images``, so the record's ``seed`` is that seed (docs/manifest.md, reproducing an image).
"""
from __future__ import annotations

import copy
import hashlib
import io
import threading
from dataclasses import dataclass, field

import numpy as np

from kbatch.schema.payloads import DecoderOutput, PriorOutput
from kbatch.schema.rows import Row, candidate_seeds


def lossless(image_format: str, quality: int) -> bool:
    """Whether the written file holds exactly the uint8 pixels (``writer.encode_image``'s settings)."""
    return image_format == "png" or (image_format == "webp" and int(quality) >= 100)


def as_written(image: np.ndarray, image_format: str, quality: int):
    """The image a reader of the written file gets (PIL RGB): lossy formats encoded and decoded again."""
    from PIL import Image

    if lossless(image_format, quality):
        return Image.fromarray(np.ascontiguousarray(image))
    from kbatch.output.writer import encode_image

    return Image.open(io.BytesIO(encode_image(image, image_format, quality))).convert("RGB")


def cosine_scores(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """100 x cosine of matching rows (float64)."""
    a = np.asarray(image_embeds, np.float64)
    b = np.asarray(text_embeds, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 100.0 * (a * b).sum(axis=-1)


def _float32(module, device):
    import torch

    if module.dtype != torch.float32:
        module = copy.deepcopy(module).to(device=device, dtype=torch.float32)
    return module.eval()


class ClipScorer:
    """The CLIP encoders of a prior folder, in float32 on ``device``; each half is made on first use, from
    the prior pipeline's own modules (``pipe``) or loaded from the folder (``path``)."""

    def __init__(self, *, pipe=None, path: str | None = None, device: str = "cpu", image_format: str = "png",
                 quality: int = 95):
        if pipe is None and path is None:
            raise ValueError("ClipScorer needs the prior pipeline or the prior model folder")
        self.pipe, self.path, self.device = pipe, path, device
        self.image_format, self.quality = image_format, quality
        self._vision = self._text = None
        self._lock = threading.Lock()  # lanes: one load

    # -- the two halves ---------------------------------------------------------------------------------
    def _use_pipe(self, name: str) -> bool:
        """The pipeline's own module when it is float32; a float16 / bfloat16 one was rounded when loaded, so
        the folder's weights are loaded in float32 instead (when the folder is known)."""
        import torch

        if self.pipe is None:
            return False
        return getattr(self.pipe, name).dtype == torch.float32 or self.path is None

    def vision(self):
        with self._lock:
            if self._vision is None:
                if self._use_pipe("image_encoder"):
                    enc, proc = _float32(self.pipe.image_encoder, self.device), self.pipe.image_processor
                else:
                    import torch
                    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

                    enc = CLIPVisionModelWithProjection.from_pretrained(
                        self.path, subfolder="image_encoder", torch_dtype=torch.float32, use_safetensors=True)
                    enc = enc.to(self.device).eval()
                    proc = CLIPImageProcessor.from_pretrained(self.path, subfolder="image_processor")
                self._vision = (enc, proc)
            return self._vision

    def text(self):
        with self._lock:
            if self._text is None:
                if self._use_pipe("text_encoder"):
                    enc, tok = _float32(self.pipe.text_encoder, self.device), self.pipe.tokenizer
                else:
                    import torch
                    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

                    enc = CLIPTextModelWithProjection.from_pretrained(
                        self.path, subfolder="text_encoder", torch_dtype=torch.float32, use_safetensors=True)
                    enc = enc.to(self.device).eval()
                    tok = CLIPTokenizer.from_pretrained(self.path, subfolder="tokenizer")
                self._text = (enc, tok)
            return self._text

    # -- embeddings -------------------------------------------------------------------------------------
    def text_embeds(self, prompts: list[str]) -> np.ndarray:
        """(len(prompts), P) float32; each distinct prompt encoded once, tokenized as the prior pipeline
        tokenizes (padded to the tokenizer's length, truncated)."""
        import torch

        enc, tok = self.text()
        unique = list(dict.fromkeys(prompts))
        with torch.inference_mode():
            ids = tok(unique, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt")
            out = enc(input_ids=ids.input_ids.to(self.device),
                      attention_mask=ids.attention_mask.to(self.device)).text_embeds
        out = out.float().cpu().numpy()
        at = {p: i for i, p in enumerate(unique)}
        return out[[at[p] for p in prompts]]

    def image_embeds(self, images) -> np.ndarray:
        """(N, P) float32 of uint8 HxWx3 images, as written (``as_written``)."""
        import torch

        enc, proc = self.vision()
        if len(images) > 1 and not lossless(self.image_format, self.quality):  # PIL's codecs release the GIL
            import concurrent.futures as cf

            with cf.ThreadPoolExecutor(max_workers=min(4, len(images))) as ex:
                pil = list(ex.map(lambda im: as_written(im, self.image_format, self.quality), images))
        else:
            pil = [as_written(im, self.image_format, self.quality) for im in images]
        with torch.inference_mode():
            px = proc(images=pil, return_tensors="pt").pixel_values.to(self.device, torch.float32)
            out = enc(pixel_values=px).image_embeds
        return out.float().cpu().numpy()

    def scores(self, images, text_embeds: np.ndarray) -> np.ndarray:
        """clip_score of each image against the matching row of ``text_embeds``."""
        return cosine_scores(self.image_embeds(images), text_embeds)


def sim_score(image: np.ndarray, prompt: str) -> float:
    """The simulated models' stand-in clip_score: a deterministic function of the pixels and the prompt, in
    [10, 40) (records name the models ``sim``; the number means nothing)."""
    h = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8)
    h.update(b"\0" + (prompt or "").encode())
    return 10.0 + 30.0 * int.from_bytes(h.digest(), "big") / 2**64


def row_text_embeds(scorer: ClipScorer, rows: list[Row], priors: list[PriorOutput]) -> list[np.ndarray]:
    """Each row's prompt embedding: from its prior output, or (embeddings stored without scores) made here."""
    missing = [r.prompt for r, p in zip(rows, priors) if p.text_embeds is None]
    made = iter(scorer.text_embeds(missing)) if missing else iter(())
    return [np.asarray(p.text_embeds, np.float32) if p.text_embeds is not None else next(made)
            for r, p in zip(rows, priors)]


def candidate_count(row: Row, prior: PriorOutput) -> int:
    """The candidates a prior output holds; the job's ``quality.best_of`` must agree (``stage: decoder``
    decodes the candidates its embeddings hold)."""
    k = len(prior.states)
    if k != row.candidates:
        raise ValueError(f"quality: row {row.id!r} has embeddings of {k} candidate(s) but quality.best_of is "
                         f"{row.candidates} (decode with the best_of the embeddings were made with)")
    return k


@dataclass
class QualitySpec:
    """What a decoder measures of every image (built from ``config.quality`` by the actors): clip_score, the
    image embedding (stored with ``image_embeddings``), the heads' scores, and the gate before decoding."""

    clip: bool = False  # clip_score (quality.scores)
    embeddings: bool = False  # quality.image_embeddings: each kept image's embedding goes to the writer
    heads: dict = field(default_factory=dict)  # name -> kbatch.models.heads.Head
    gate_head: str | None = None  # a heads name, "clip_score", or None
    gate_min: float = 0.0

    @classmethod
    def from_config(cls, cfg, storage_options: dict | None = None) -> "QualitySpec":
        from kbatch.models.heads import load_heads

        q = cfg.quality
        return cls(clip=q.scores, embeddings=q.image_embeddings,
                   heads=load_heads(q.heads, storage_options) if q.heads else {},
                   gate_head=q.gate_head, gate_min=q.gate_min or 0.0)

    @property
    def embeds(self) -> bool:
        """Whether each decoded image's CLIP image embedding is computed."""
        return self.clip or self.embeddings or bool(self.heads)

    @property
    def gate_label(self) -> str | None:
        from kbatch.models.heads import gate_label

        return None if self.gate_head is None else gate_label(self.gate_head, self.gate_min)

    def head_scores(self, embeds) -> dict[str, np.ndarray] | None:
        if not self.heads or embeds is None:
            return None
        return {name: h(embeds) for name, h in self.heads.items()}


@dataclass
class GatePlan:
    """A row's candidates before the decoder: each image's predicted score (k, n), which pass the gate, and
    the candidates decoded (those with an image that passes: a candidate's images share its generator, so a
    candidate is decoded whole, as plain diffusers would make it)."""

    predicted: np.ndarray  # (k, n) float64
    passes: np.ndarray  # (k, n) bool
    decoded: list[int]


def plan_gate(rows: list[Row], priors: list[PriorOutput], predicted: list[np.ndarray], minimum: float
              ) -> list[GatePlan]:
    """``predicted[j]``: the gate's score of each of row j's predicted embeddings (k * n, candidate-major)."""
    plans = []
    for r, p, s in zip(rows, priors, predicted):
        s = np.asarray(s, np.float64).reshape(len(p.states), r.num_images)
        passes = s >= minimum
        plans.append(GatePlan(s, passes, [int(c) for c in np.flatnonzero(passes.any(axis=1))]))
    return plans


def prune(rows: list[Row], priors: list[PriorOutput], plans: list[GatePlan]):
    """The rows and prior outputs the decoder gets: only the candidates a plan decodes (rows with none are
    left out; a row keeps its ``candidates`` count equal to what its prior output holds)."""
    import dataclasses

    out_rows, out_priors = [], []
    for r, p, plan in zip(rows, priors, plans):
        k, dec = len(p.states), plan.decoded
        if not dec:
            continue
        if len(dec) == k:
            out_rows.append(r)
            out_priors.append(p)
            continue
        n = r.num_images

        def pick(a):
            a = np.asarray(a)
            return a.reshape((k, n) + a.shape[1:])[dec].reshape((-1,) + a.shape[1:])

        states = [p.states[c] for c in dec]
        seeds = list(p.candidate_seeds or candidate_seeds(r.seed, k))
        q = dataclasses.replace(p, image_embeds=pick(p.image_embeds), negative_image_embeds=pick(
            p.negative_image_embeds), generator_state=states[0], candidate_seeds=[seeds[c] for c in dec],
            candidate_states=states)
        out_rows.append(dataclasses.replace(r, candidates=len(dec)))
        out_priors.append(q)
    return out_rows, out_priors


def predicted_clip_scores(scorer, rows: list[Row], priors: list[PriorOutput]) -> list[np.ndarray]:
    """A clip_score gate's scores: 100 x cosine(predicted image embedding, the prompt's text embedding)."""
    texts = row_text_embeds(scorer, rows, priors)
    return [cosine_scores(p.image_embeds, np.broadcast_to(t, p.image_embeds.shape)) for p, t in zip(priors, texts)]


def keep_best(rows: list[Row], priors: list[PriorOutput], images: np.ndarray, scores: np.ndarray | None,
              make, *, plans: list[GatePlan] | None = None, embeds: np.ndarray | None = None,
              heads: dict[str, np.ndarray] | None = None, gate: str | None = None) -> list[DecoderOutput]:
    """Per row (its decoded candidates' images, candidate-major, as decoded: every candidate without a gate,
    ``plans[j].decoded`` with one), the kept images and their fields; ``make(row, prior, kept_images)`` builds
    the row's DecoderOutput. Per image index the kept candidate is the best by clip_score among the decoded
    candidates that pass the gate (the first on ties; the only one without best_of); an image index none
    passes is filtered (``DecoderOutput.filtered``). ``scores``, ``embeds``, ``heads[name]``: one per decoded
    image, or None."""
    out, at = [], 0
    for j, (r, p) in enumerate(zip(rows, priors)):
        k, n = len(p.states), r.num_images
        plan = plans[j] if plans is not None else None
        dec = plan.decoded if plan is not None else list(range(k))
        m = len(dec)
        sl = slice(at, at + m * n)
        at += m * n
        block = images[sl] if m else np.zeros((0, r.height, r.width, 3), np.uint8)
        s = None if scores is None else np.asarray(scores[sl], np.float64).reshape(m, n)
        if k > 1 and s is None and m:
            raise ValueError(f"quality: row {r.id!r} has {k} candidates and no scores to choose by")
        elig = plan.passes[dec] if plan is not None else np.ones((m, n), bool)
        choice = []  # per image index: the kept decoded candidate (its place among the decoded), or -1
        for i in range(n):
            ok = np.flatnonzero(elig[:, i])
            choice.append(-1 if not len(ok) else int(ok[0] if s is None else ok[np.argmax(s[ok, i])]))
        kept = [i for i in range(n) if choice[i] >= 0]
        pos = [choice[i] * n + i for i in kept]  # places in the row's block
        o = make(r, p, block[pos] if kept else block[:0])
        if len(kept) != n:
            o.image_indices = kept
        if plan is not None:
            o.gate = gate
            o.predicted_scores = [float(plan.predicted[dec[choice[i]], i]) for i in kept]
            o.filtered = [(i, float(plan.predicted[:, i].max())) for i in range(n) if choice[i] < 0]
        if embeds is not None:
            o.image_embeds = np.asarray(embeds[sl], np.float32)[pos]
        if heads is not None:
            o.head_scores = {name: [float(v[sl][q]) for q in pos] for name, v in heads.items()}
        if s is not None and m:
            seeds = list(p.candidate_seeds or candidate_seeds(r.seed, k))
            o.clip_scores = [float(s[choice[i], i]) for i in kept]
            o.seeds = [int(seeds[dec[choice[i]]]) for i in kept]
            if k > 1:
                full = np.full((k, n), np.nan)
                full[dec] = s
                o.candidate_seeds = [int(x) for x in seeds]
                o.candidate_scores = [[None if x != x else float(x) for x in full[:, i]] for i in kept]
        out.append(o)
    return out


def record_fields(out: DecoderOutput, i: int) -> dict:
    """The quality fields of the record of ``out.images[i]`` (nothing when the job measures nothing); the
    image embedding rides along as ``_image_embedding`` (not a column: the writer stores it beside the
    metadata, ``kbatch.output.image_embeddings``)."""
    rec = {}
    if out.image_indices is not None:
        rec["image_index"] = out.image_indices[i]
    if out.clip_scores is not None:
        rec.update(clip_score=out.clip_scores[i], seed=out.seeds[i])
        if out.candidate_seeds is not None:
            rec["candidate_seeds"] = out.candidate_seeds
            rec["candidate_scores"] = out.candidate_scores[i]
    for name, v in (out.head_scores or {}).items():
        rec[f"score_{name}"] = v[i]
    if out.predicted_scores is not None:
        rec.update(predicted_score=out.predicted_scores[i], gate=out.gate)
    if out.image_embeds is not None:
        rec["_image_embedding"] = out.image_embeds[i]
    return rec


def filtered_fields(out: DecoderOutput) -> list[dict]:
    """The records' fields of a row's image indices the gate filtered (status ``filtered``: never decoded,
    or decoded as another image's candidate and below the gate)."""
    return [{"image_index": i, "status": "filtered", "error": None, "predicted_score": score, "gate": out.gate}
            for i, score in (out.filtered or [])]
