"""The validated request row: what every stage gets for one manifest row, its seed and fingerprints."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import pyarrow as pa

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Manifest columns and their arrow types (only id and prompt are required).
MIX_TYPE = pa.list_(pa.struct([("prompt", pa.string()), ("image", pa.binary()), ("image_uri", pa.string()),
                               ("weight", pa.float64())]))
MANIFEST_COLUMNS = {
    "id": pa.string(), "prompt": pa.string(), "negative_prompt": pa.string(), "mode": pa.string(),
    "seed": pa.int64(), "num_images": pa.int64(), "height": pa.int64(), "width": pa.int64(),
    "num_inference_steps": pa.int64(), "guidance_scale": pa.float64(), "prior_num_inference_steps": pa.int64(),
    "prior_guidance_scale": pa.float64(), "strength": pa.float64(), "init_image": None, "mask": None,
    "mix": MIX_TYPE,
}
PARAM_FIELDS = ("num_images", "height", "width", "num_inference_steps", "guidance_scale",
                "prior_num_inference_steps", "prior_guidance_scale", "strength")


@dataclass
class MixItem:
    weight: float
    prompt: str | None = None
    image: bytes | None = None  # encoded bytes (inline) ...
    image_uri: str | None = None  # ... or a URI, resolved and checked by kbatch.plan.input_images


@dataclass(slots=True)
class Row:
    """One validated render request with the job defaults applied."""

    id: str
    prompt: str
    mode: str = "text2img"
    negative_prompt: str | None = None
    seed: int = 0
    num_images: int = 1
    height: int = 512
    width: int = 512
    num_inference_steps: int = 50
    guidance_scale: float = 4.0
    prior_num_inference_steps: int = 25
    prior_guidance_scale: float = 4.0
    strength: float | None = None  # img2img only
    init_image: bytes | str | None = None  # bytes, or an absolute URI after resolution
    mask: bytes | str | None = None
    mix: list[MixItem] = field(default_factory=list)
    row_hash: str = ""  # fingerprint of everything that decides the pixels (resume checks it)
    # quality.best_of: seeds rendered per image (candidate_seeds); the job's, set by the planner; not part of
    # the fingerprint (which candidate is kept is decided by the scores, as recorded)
    candidates: int = 1

    @property
    def renders(self) -> int:
        """Images rendered for this row: ``num_images`` for each candidate seed (what a batch's size counts)."""
        return self.num_images * self.candidates

    def prior_key(self) -> tuple:
        """Rows with equal keys can share one prior forward pass."""
        if self.mode == "interpolate":
            return ("interpolate", self.id)  # one row per call (diffusers' interpolate API)
        return ("prior", self.negative_prompt is not None, self.num_images, self.prior_num_inference_steps,
                self.prior_guidance_scale)

    def decoder_key(self) -> tuple:
        """Rows with equal keys can share one decoder forward pass."""
        mode = "text2img" if self.mode == "interpolate" else self.mode
        return (mode, self.height, self.width, self.num_inference_steps, self.guidance_scale,
                self.strength if mode == "img2img" else None)

    def unet_shape(self) -> tuple:
        """What fixes the decoder UNet's input shapes, besides the batch size: which UNet (inpaint has its
        own; img2img shares text2img's), the latent size, and whether guidance doubles the batch."""
        return ("inpaint" if self.mode == "inpaint" else "base", self.height, self.width, self.guidance_scale > 1)

    def fingerprint(self) -> str:
        """sha256 of every field but ``row_hash`` (the same JSON as ``dataclasses.asdict`` gives, built
        without its deep copies: this runs once per manifest row)."""
        d = {name: getattr(self, name) for name in _ROW_FIELDS}
        d["mix"] = [{"weight": it.weight, "prompt": it.prompt, "image": it.image, "image_uri": it.image_uri}
                    for it in self.mix]
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=_jsonable).encode()).hexdigest()[:16]



_ROW_FIELDS = [f for f in Row.__dataclass_fields__ if f not in ("row_hash", "candidates")]


def raw_fingerprint(cells: dict) -> str:
    """Fingerprint of a manifest row as given (an invalid row has no ``Row``): a rerun renders a failed row
    again when this changes. Prefixed so it never equals a ``Row.fingerprint``."""
    blob = json.dumps(cells, sort_keys=True, default=_jsonable)
    return "r" + hashlib.sha256(blob.encode()).hexdigest()[:15]


def _jsonable(v):
    if isinstance(v, bytes):
        return "sha256:" + hashlib.sha256(v).hexdigest()
    return str(v)


def input_ref(v: bytes | str | None) -> str | None:
    """How an input image is named in metadata: its URI, or the sha256 of inline bytes."""
    if v is None:
        return None
    return _jsonable(v) if isinstance(v, bytes) else v


def derive_seed(job_seed: int, row_id: str) -> int:
    """Stable default seed of a row: independent of row order, batch and worker."""
    h = hashlib.sha256(f"{job_seed}:{row_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") & (2**63 - 1)


def candidate_seeds(seed: int, k: int) -> list[int]:
    """The seeds of a row's ``quality.best_of`` candidates: candidate 0 is the row's seed, candidate c > 0 the
    first 63 bits of sha256(f"{seed}:candidate:{c}") (stable: independent of batch, worker and k)."""
    out = [int(seed)]
    for c in range(1, k):
        h = hashlib.sha256(f"{seed}:candidate:{c}".encode()).digest()
        out.append(int.from_bytes(h[:8], "big") & (2**63 - 1))
    return out
