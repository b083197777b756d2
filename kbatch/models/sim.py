"""Simulated models (docs/clusters.md, simulated models): ``models.prior: sim``, ``models.decoder: sim`` (inpaint rows included).

For capacity planning and scale tests. Everything around the stage bodies is the real code path: Ray actors
and their placement, batching, backpressure, retries, the object store between the stages, writers, the
commit protocol, resume. Only the body of a stage call is a stand-in: it loads no weights, imports no torch,
sleeps ``models.sim.<stage>_seconds_per_image`` per image, and returns data of the real shapes:

* the prior: embedding pairs of the real width (768) drawn from the row's seed;
* the decoder: checks that it was handed exactly those embeddings for each row (so the plumbing between
  the stages is tested, not assumed), then returns images that are a deterministic function of
  (seed, image_index, height, width): a smooth two-colour gradient, cheap to make and to encode.

Records name the models ``sim``. The pixels mean nothing; use the tiny models (``kbatch models tiny``) to test
what the pixels are.
"""
from __future__ import annotations

import functools
import hashlib
import os
import time

import numpy as np

from kbatch.schema.payloads import DecoderOutput, PriorOutput
from kbatch.schema.rows import Row, candidate_seeds

EMBED_DIM = 768  # Kandinsky 2.1's CLIP image-embedding width
_SIM_STATE = b"sim:"  # prefix of the stand-in "generator state": the seed as 8 bytes


def sim_embeddings(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The (image, negative) embedding pairs the simulated prior gives a row: a function of its seed (a
    ramp whose offset comes from the seed, one per image, plus unit normal noise drawn from the seed, so that
    heads and gates over them spread; cheap, so that the simulation measures kbatch)."""
    base = (seed % 1_000_003) / 1_000_003
    noise = np.random.default_rng(seed).standard_normal((n, EMBED_DIM), dtype=np.float32)
    emb = base + np.arange(n, dtype=np.float32)[:, None] + _RAMP + noise
    return emb, -emb


def sim_image_embedding(image: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The stand-in CLIP image embedding of a simulated image: its predicted embedding's direction plus half
    as long a direction drawn from a hash of the pixels (so a head's score of the image follows its score of
    the prediction, not exactly: correlation ~0.9 for a random linear head)."""
    u = np.asarray(predicted, np.float64)
    u = u / np.linalg.norm(u)
    seed = int.from_bytes(hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8).digest(), "big")
    v = np.random.default_rng(seed).standard_normal(u.shape[-1])
    return (u + 0.5 * v / np.linalg.norm(v)).astype(np.float32)


def sim_predicted_clip_score(predicted: np.ndarray, prompt: str) -> float:
    """A clip_score gate's stand-in score of a simulated predicted embedding: in [10, 40), a hash of the
    embedding and the prompt (like ``scoring.sim_score`` of the pixels; the number means nothing)."""
    h = hashlib.blake2b(np.ascontiguousarray(predicted, np.float32).tobytes(), digest_size=8)
    h.update(b"\0" + (prompt or "").encode())
    return 10.0 + 30.0 * int.from_bytes(h.digest(), "big") / 2**64


_RAMP = np.linspace(0.0, 1.0, EMBED_DIM, dtype=np.float32)[None, :]


def sim_image(seed: int, image_index: int, height: int, width: int) -> np.ndarray:
    """uint8 (height, width, 3): a diagonal gradient between two colours drawn from (seed, image_index)."""
    c = hashlib.blake2b(f"{seed}:{image_index}".encode(), digest_size=6).digest()
    c0, c1 = np.frombuffer(c[:3], np.uint8).astype(np.float32), np.frombuffer(c[3:], np.uint8).astype(np.float32)
    t = np.linspace(0.0, 1.0, height + width - 1, dtype=np.float32)[:, None]
    palette = (c0 + (c1 - c0) * t).round().astype(np.uint8)  # one colour per diagonal
    return np.take(palette, _diagonals(height, width), axis=0)


@functools.lru_cache(maxsize=16)
def _diagonals(height: int, width: int) -> np.ndarray:
    return np.add.outer(np.arange(height), np.arange(width))


def worker_label(kind: str = "sim") -> str:
    """Where a stage body runs, like ``models.placement``: ``node:<id8>/gpu:<ids>(sim)/pid:<pid>``."""
    node, gpus = "local", []
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()[:8]
            gpus = [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # pragma: no cover - outside Ray
        pass
    where = f"gpu:{','.join(gpus)}({kind})" if gpus else kind
    return f"node:{node}/{where}/pid:{os.getpid()}"


class SimPrior:
    """Stands in for ``PriorPredictor``: same call, same output type."""

    def __init__(self, seconds_per_image: float = 0.0, load_seconds: float = 0.0):
        time.sleep(load_seconds)
        self.seconds_per_image = seconds_per_image
        self.worker = worker_label()

    def __call__(self, rows: list[Row], inputs=None) -> list[PriorOutput]:
        time.sleep(self.seconds_per_image * sum(r.num_images for r in rows))
        out = []
        for r in rows:
            seeds = candidate_seeds(r.seed, r.candidates)  # quality.best_of: candidate-major, like the real prior
            emb, neg = _candidate_embeddings(seeds, r.num_images)
            states = [_SIM_STATE + s.to_bytes(8, "big") for s in seeds]
            o = PriorOutput(r.id, emb, neg, states[0], self.worker)
            if len(seeds) > 1:
                o.candidate_seeds, o.candidate_states = seeds, states
            out.append(o)
        return out


def _candidate_embeddings(seeds: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
    if len(seeds) == 1:
        return sim_embeddings(seeds[0], n)
    parts = [sim_embeddings(s, n) for s in seeds]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class SimDecoder:
    """Stands in for ``DecoderPredictor`` (every mode, inpaint included)."""

    def __init__(self, seconds_per_image: float = 0.0, load_seconds: float = 0.0, scores=False):
        """``scores``: a ``scoring.QualitySpec`` (or True: clip_score only): stand-in clip_scores
        (``scoring.sim_score``), image embeddings (``sim_image_embedding``), the heads over them, and the gate
        over the predicted embeddings, like the real decoder."""
        from kbatch.models.scoring import QualitySpec

        time.sleep(load_seconds)
        self.seconds_per_image = seconds_per_image
        self.worker = worker_label()
        self.quality = scores if isinstance(scores, QualitySpec) else QualitySpec(clip=bool(scores))
        self.decoded = 0  # images decoded (candidates included) by this process: the gate's saving, counted

    @property
    def scores(self) -> bool:
        return self.quality.clip

    def __call__(self, rows: list[Row], priors: list[PriorOutput], inputs=None) -> list[DecoderOutput]:
        from kbatch.models.scoring import candidate_count, keep_best, plan_gate, prune, sim_score

        t0 = time.perf_counter()
        q = self.quality
        for r, p in zip(rows, priors):
            _check_prior(r, p)
            candidate_count(r, p)
        plans = None
        if q.gate_head is not None:  # scored before decoding: gated candidates are never made
            if q.gate_head == "clip_score":
                predicted = [np.array([sim_predicted_clip_score(e, r.prompt) for e in p.image_embeds])
                             for r, p in zip(rows, priors)]
            else:
                predicted = [q.heads[q.gate_head](p.image_embeds) for p in priors]
            plans = plan_gate(rows, priors, predicted, q.gate_min)
            drows, dpriors = prune(rows, priors, plans)
        else:
            drows, dpriors = rows, priors
        # every decoded candidate's images, candidate-major per row (quality.best_of), like the real decoder
        made = [(r, sim_image(s, i, r.height, r.width)) for r, p in zip(drows, dpriors)
                for s in (p.candidate_seeds or [r.seed]) for i in range(r.num_images)]
        self.decoded += len(made)
        time.sleep(self.seconds_per_image * len(made))
        per_image = (time.perf_counter() - t0) / max(1, len(made))
        images = np.stack([im for _, im in made]) if made else np.zeros((0, 1, 1, 3), np.uint8)
        scores = np.array([sim_score(im, r.prompt) for r, im in made]) if q.clip else None
        embeds = None
        if q.embeds:
            dim = priors[0].image_embeds.shape[-1] if priors else EMBED_DIM
            pred = np.concatenate([p.image_embeds for p in dpriors]) if dpriors else np.zeros((0, dim))
            embeds = np.array([sim_image_embedding(im, e) for (_, im), e in zip(made, pred)],
                              np.float32).reshape(len(made), dim)
        return keep_best(rows, priors, images, scores,
                         lambda r, p, kept: DecoderOutput(r.id, kept, p.prior_worker, self.worker, per_image, "sim"),
                         plans=plans, embeds=embeds, heads=q.head_scores(embeds), gate=q.gate_label)


def _check_prior(row: Row, prior: PriorOutput) -> None:
    """The embeddings handed to the decoder for ``row`` are the ones the prior made for it."""
    if prior.id != row.id:
        raise ValueError(f"decoder got the embeddings of row {prior.id!r} for row {row.id!r}")
    if prior.generator_state.startswith(_SIM_STATE):  # made by SimPrior: check the values too
        emb, neg = _candidate_embeddings(candidate_seeds(row.seed, row.candidates), row.num_images)
        if not (np.array_equal(prior.image_embeds, emb) and np.array_equal(prior.negative_image_embeds, neg)):
            raise ValueError(f"row {row.id!r}: the embeddings the decoder got are not the ones the prior made")
