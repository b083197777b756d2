"""Stage result types, torch-free: writer actors (and, for ``memory://`` outputs, the driver) unpickle them
without importing torch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kbatch.schema.rows import Row


@dataclass
class PriorOutput:
    id: str
    image_embeds: np.ndarray  # (num_images, D) float32
    negative_image_embeds: np.ndarray  # (num_images, D) float32
    generator_state: bytes  # torch.Generator("cpu") state after the prior
    prior_worker: str
    # quality.best_of k > 1: the embeddings are (k * num_images, D), candidate-major, and every candidate's
    # seed and generator state after the prior (candidate 0's state is ``generator_state``)
    candidate_seeds: list[int] | None = None
    candidate_states: list[bytes] | None = None
    text_embeds: np.ndarray | None = None  # quality scores: (P,) float32 CLIP text embedding of the prompt

    @property
    def states(self) -> list[bytes]:
        """The generator state of every candidate (one without best_of)."""
        return list(self.candidate_states) if self.candidate_states else [self.generator_state]


@dataclass
class DecoderOutput:
    id: str
    images: np.ndarray  # (num_images, H, W, 3) uint8
    prior_worker: str
    decoder_worker: str
    seconds: float  # wall seconds of the batch, per image
    dtype: str = ""  # the dtype the decoder really ran in (float16 falls back to float32 on CPU)
    row: Row | None = None  # the request (set by the worker): the writer makes the record from it
    # quality scores, per kept image (kbatch.models.scoring): clip_score, the seed of the candidate kept
    # (the row's seed without best_of), and with best_of every candidate's seed and, per image, score
    clip_scores: list[float] | None = None
    seeds: list[int] | None = None
    candidate_seeds: list[int] | None = None
    candidate_scores: list[list[float]] | None = None
    # toward a training set (docs/quality.md): each kept image's CLIP image embedding (n_kept, D) float32, the
    # heads' scores {name: [per kept image]}, and with a gate its predicted score, the gate ("aesthetic>=6.0")
    # and the image indices it filtered [(image_index, best predicted score)]; ``image_indices``: each kept
    # image's index when not all of 0..num_images-1 are kept
    image_embeds: np.ndarray | None = None
    head_scores: dict[str, list[float]] | None = None
    predicted_scores: list[float] | None = None
    gate: str | None = None
    filtered: list[tuple[int, float]] | None = None
    image_indices: list[int] | None = None
