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


@dataclass
class DecoderOutput:
    id: str
    images: np.ndarray  # (num_images, H, W, 3) uint8
    prior_worker: str
    decoder_worker: str
    seconds: float  # wall seconds of the batch, per image
    dtype: str = ""  # the dtype the decoder really ran in (float16 falls back to float32 on CPU)
    row: Row | None = None  # the request (set by the worker): the writer makes the record from it
