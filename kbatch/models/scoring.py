"""Quality scores (SPEC §10): the CLIP score of every image, and best-of-k selection.

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
``num_images``, so the record's ``seed`` is that seed (SPEC §4).
"""
from __future__ import annotations

import copy
import hashlib
import io
import threading

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


def keep_best(rows: list[Row], priors: list[PriorOutput], images: np.ndarray, scores: np.ndarray | None,
              make) -> list[DecoderOutput]:
    """Per row (its k x num_images images candidate-major, as decoded), the kept images and their score
    fields; ``make(row, prior, kept_images)`` builds the row's DecoderOutput. ``scores``: one per image,
    or None (no scoring: one candidate)."""
    out, at = [], 0
    for r, p in zip(rows, priors):
        k, n = len(p.states), r.num_images
        block = images[at:at + k * n]
        s = None if scores is None else np.asarray(scores[at:at + k * n], np.float64).reshape(k, n)
        at += k * n
        if k == 1:
            o = make(r, p, block)
            if s is not None:
                o.clip_scores = s[0].tolist()
                o.seeds = [int(r.seed)] * n
            out.append(o)
            continue
        if s is None:
            raise ValueError(f"quality: row {r.id!r} has {k} candidates and no scores to choose by")
        seeds = list(p.candidate_seeds or candidate_seeds(r.seed, k))
        best = s.argmax(axis=0)  # the first candidate on ties
        kept = block.reshape((k, n) + block.shape[1:])[best, np.arange(n)]
        o = make(r, p, kept)
        o.clip_scores = [float(s[b, i]) for i, b in enumerate(best)]
        o.seeds = [int(seeds[b]) for b in best]
        o.candidate_seeds = [int(x) for x in seeds]
        o.candidate_scores = [[float(x) for x in s[:, i]] for i in range(n)]
        out.append(o)
    return out


def record_fields(out: DecoderOutput, i: int) -> dict:
    """The score fields of image ``i``'s record (nothing when the job does not score)."""
    if out.clip_scores is None:
        return {}
    rec = {"clip_score": out.clip_scores[i], "seed": out.seeds[i]}
    if out.candidate_seeds is not None:
        rec["candidate_seeds"] = out.candidate_seeds
        rec["candidate_scores"] = out.candidate_scores[i]
    return rec
