"""Score heads over the L2-normalized CLIP image embedding (docs/quality.md): each image's ``score_<NAME>``,
and the gate's score of the prior's predicted embedding.

A head is LAION's improved-aesthetic-predictor MLP (``layers.0/2/4/6/7``: Linear 768 -> 1024 -> 128 -> 64 ->
16 -> 1, Dropout between the first four and no activation; any widths that chain) or a single linear layer
(one ``weight`` [1, D] or [D] and one ``bias``), loaded from safetensors or a torch state dict (``.pth`` /
``.pt`` / ``.bin``, read with ``weights_only``). Heads run in numpy (float64 over the float32 weights): no torch,
so simulated stages use them as they are, and a head is ~1 MFLOP an image.

``check_heads`` runs when a job plans, before any model loads: every head is loaded, its input width compared
with the projection size of the prior's image encoder (``image_encoder/config.json``), and a warning names the
encoder when it is not OpenAI's CLIP ViT-L/14 (what LAION's heads were trained on).
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass

import numpy as np

from kbatch.config import SIM, ConfigError, JobConfig

log = logging.getLogger(__name__)

MLP_LAYERS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")  # improved-aesthetic-predictor
SIM_EMBED_DIM = 768  # the simulated prior's embedding width (kbatch.models.sim.EMBED_DIM)
# OpenAI CLIP ViT-L/14 (224 px) as transformers' CLIPVisionConfig writes it: what LAION's heads expect
VIT_L14 = {"hidden_size": 1024, "num_hidden_layers": 24, "patch_size": 14, "image_size": 224, "projection_dim": 768}


class HeadError(ValueError):
    """A head file that is not a head kbatch can run (names the file and what is wrong)."""


def normalized(embeds) -> np.ndarray:
    """Rows L2-normalized (float64), as LAION's predictor is fed."""
    a = np.asarray(embeds, np.float64)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


@dataclass
class Head:
    """One score head: linear layers applied in turn (no activations), over normalized embeddings."""

    name: str
    path: str
    kind: str  # "mlp" (improved-aesthetic-predictor) | "linear"
    layers: list  # [(weight [out, in] float64, bias [out] float64)]

    @property
    def in_dim(self) -> int:
        return int(self.layers[0][0].shape[1])

    def __call__(self, embeds) -> np.ndarray:
        """(N,) float64 scores of (N, D) raw embeddings (normalized here)."""
        x = normalized(np.atleast_2d(embeds))
        for w, b in self.layers:
            x = x @ w.T + b
        return x[:, 0]


def _tensors(data: bytes, path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load

        return {k: np.asarray(v) for k, v in load(data).items()}
    import torch

    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # a Lightning checkpoint
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise HeadError(f"head {path!r} is a torch {type(obj).__name__}, not a state dict")
    return {str(k): v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def parse_head(name: str, path: str, tensors: dict[str, np.ndarray]) -> Head:
    """The head in ``tensors``: the improved-aesthetic-predictor layout, or one linear layer."""
    t = {k[len("model."):] if k.startswith("model.") else k: np.asarray(v, np.float64) for k, v in tensors.items()}
    if all(f"{p}.weight" in t for p in MLP_LAYERS):
        layers = [(t[f"{p}.weight"], t.get(f"{p}.bias")) for p in MLP_LAYERS]
        extra = sorted(set(t) - {f"{p}.{s}" for p in MLP_LAYERS for s in ("weight", "bias")})
        if extra:
            raise HeadError(f"head {path!r} has the improved-aesthetic-predictor layers and also {extra[:5]}")
        kind = "mlp"
    else:
        ws = [k for k in t if k == "weight" or k.endswith(".weight")]
        bs = [k for k in t if k == "bias" or k.endswith(".bias")]
        if len(ws) != 1 or len(bs) > 1 or len(t) != len(ws) + len(bs):
            raise HeadError(f"head {path!r} is neither LAION's improved-aesthetic-predictor (layers "
                            f"{', '.join(MLP_LAYERS)}) nor one linear layer (weight, bias); its tensors: "
                            f"{sorted(t)[:8]}")
        w = t[ws[0]]
        layers = [(w.reshape(1, -1) if w.ndim == 1 else w, t[bs[0]] if bs else None)]
        kind = "linear"
    out = []
    for i, (w, b) in enumerate(layers):
        b = np.zeros(w.shape[0]) if b is None else b.reshape(-1)
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise HeadError(f"head {path!r}: layer {i} has weight {w.shape} and bias {b.shape}")
        if i and w.shape[1] != out[-1][0].shape[0]:
            raise HeadError(f"head {path!r}: layer {i} takes {w.shape[1]} inputs but layer {i - 1} gives "
                            f"{out[-1][0].shape[0]}")
        out.append((w, b))
    if out[-1][0].shape[0] != 1:
        raise HeadError(f"head {path!r} gives {out[-1][0].shape[0]} outputs; a score head gives 1")
    return Head(name, path, kind, out)


def load_head(name: str, path: str, storage_options: dict | None = None) -> Head:
    """Read and parse one head (local path or fsspec URL)."""
    import fsspec

    with fsspec.open(path, "rb", **(storage_options or {})) as fh:
        data = fh.read()
    return parse_head(name, path, _tensors(data, path))


def load_heads(heads: dict[str, str], storage_options: dict | None = None) -> dict[str, Head]:
    return {name: load_head(name, path, storage_options) for name, path in heads.items()}


def encoder_config(prior: str, storage_options: dict | None = None, revision: str | None = None) -> dict | None:
    """The prior's ``image_encoder/config.json`` (None when it cannot be read from here)."""
    from kbatch.models.store import model_kind

    rel = "image_encoder/config.json"
    try:
        kind = model_kind(prior)
        if kind == "local":
            import os

            folder = os.path.abspath(os.path.expanduser(prior.split("://", 1)[-1]))
            with open(os.path.join(folder, rel), "rb") as fh:
                return json.loads(fh.read())
        if kind == "hub":
            from huggingface_hub import hf_hub_download

            with open(hf_hub_download(prior, rel, revision=revision), "rb") as fh:
                return json.loads(fh.read())
        import fsspec

        with fsspec.open(f"{prior.rstrip('/')}/{rel}", "rb", **(storage_options or {})) as fh:
            return json.loads(fh.read())
    except Exception as e:  # noqa: BLE001 - checked again when the decoder loads the encoder
        log.warning("quality.heads: cannot read %s of models.prior %r (%s: %s); head widths are checked when "
                    "the encoder loads", rel, prior, type(e).__name__, e)
        return None


def describe_encoder(conf: dict) -> str:
    return ", ".join(f"{k} {conf.get(k)}" for k in VIT_L14)


def check_heads(cfg: JobConfig, storage_options: dict | None = None) -> dict[str, Head]:
    """Before any model loads: every ``quality.heads`` head loads and fits the prior's image encoder
    (ConfigError naming the field and the value); a warning when the encoder is not CLIP ViT-L/14."""
    q = cfg.quality
    if not q.heads:
        return {}
    heads = {}
    for name, path in q.heads.items():
        try:
            heads[name] = load_head(name, path, storage_options)
        except FileNotFoundError:
            raise ConfigError(f"config key 'quality.heads.{name}' is {path!r}: no such file") from None
        except Exception as e:  # noqa: BLE001 - unreadable, not a head
            raise ConfigError(f"config key 'quality.heads.{name}' is {path!r}: not a head kbatch can run "
                              f"({type(e).__name__}: {e})") from None
    prior = cfg.models.prior
    if prior == SIM:
        dim, conf = SIM_EMBED_DIM, None
    else:
        conf = encoder_config(prior, storage_options, cfg.models.revision)
        dim = None if conf is None else conf.get("projection_dim")
    for name, h in heads.items():
        if dim is not None and h.in_dim != int(dim):
            raise ConfigError(f"config key 'quality.heads.{name}' is {h.path!r}: the head takes {h.in_dim}-wide "
                              f"embeddings but the image encoder of models.prior {prior!r} gives {dim}-wide ones "
                              "(a head is trained on one CLIP)")
    if conf is not None and any(conf.get(k) != v for k, v in VIT_L14.items()):
        log.warning("quality.heads: the image encoder of models.prior %r (%s) is not OpenAI CLIP ViT-L/14 "
                    "(%s), which LAION's heads were trained on: their scores may mean nothing here",
                    prior, describe_encoder(conf), describe_encoder(VIT_L14))
    return heads


def gate_label(head: str, minimum: float) -> str:
    """The gate as records name it: ``aesthetic>=6.0``."""
    return f"{head}>={float(minimum)!r}"
