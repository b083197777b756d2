"""What the gate saves and what embeddings and heads cost (docs/quality.md), in this process, no Ray.

    python bench/gate.py                      # simulated stages, 400 rows, gate at the 30th percentile
    python bench/gate.py --rows 800 --best-of 2 --decoder-seconds 0.02

1. Gate: the simulated prior and decoder (``models.*: sim``: the decoder sleeps ``--decoder-seconds`` per image it
   is handed), with a random linear head over the 768-wide embeddings and ``quality.gate`` at the given
   percentile of the predicted scores, against the same rows without a gate. Decoder seconds are the wall time
   of the decoder calls; "equal output": every image the gated run keeps is the ungated run's image of that
   row and index (same pixels, same final score), and the ungated images whose prediction passes are all kept.
   Variants alternate (off, gate, off, gate) so that load on a shared machine hits both alike.
2. Overhead per image on this CPU: the heads (numpy, float64: the LAION MLP 768-1024-128-64-16-1 and a linear
   head), the float16 embedding file of a shard, and (tiny models) the CLIP vision pass kbatch already makes
   for clip_score; the full-size vision pass on an H200 is estimated from FLOPs.
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np

import _common  # noqa: F401 - kbatch importable from the working tree

VIT_L14_GFLOP = 162.0  # CLIP ViT-L/14 image pass at 224 px (docs/quality.md)
H200_FP32_TFLOPS = 67.0  # without tensor cores (docs/quality.md)
H200_TF32_TFLOPS = 495.0  # dense TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32)
MLP = (768, 1024, 128, 64, 16, 1)


def _linear_head(dim: int, seed: int):
    from kbatch.models.heads import parse_head

    rng = np.random.default_rng(seed)
    return parse_head("lin", "bench", {"weight": rng.standard_normal((1, dim)).astype(np.float32),
                                       "bias": np.zeros(1, np.float32)})


def _mlp_head(seed: int):
    from kbatch.models.heads import MLP_LAYERS, parse_head

    rng = np.random.default_rng(seed)
    t = {}
    for p, (i, o) in zip(MLP_LAYERS, zip(MLP[:-1], MLP[1:])):
        t[f"{p}.weight"] = (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)
        t[f"{p}.bias"] = np.zeros(o, np.float32)
    return parse_head("aesthetic", "bench", t)


def gate_saving(a) -> dict:
    from kbatch.models.scoring import QualitySpec
    from kbatch.models.sim import SimDecoder, SimPrior
    from kbatch.schema.rows import Row, derive_seed

    rows = [Row(id=f"r{i}", prompt=f"prompt {i}", seed=derive_seed(0, f"r{i}"), height=64, width=64,
                candidates=a.best_of) for i in range(a.rows)]
    priors = SimPrior()(rows)
    head = _linear_head(768, 7)
    predicted = np.concatenate([head(p.image_embeds) for p in priors])
    gate = float(np.quantile(predicted, a.percentile / 100))
    specs = {"off": QualitySpec(clip=a.best_of > 1, heads={"lin": head}),
             "gate": QualitySpec(clip=a.best_of > 1, heads={"lin": head}, gate_head="lin", gate_min=gate)}
    seconds = {k: 0.0 for k in specs}
    decoded = {}
    outs = {}
    for _ in range(a.repeats):
        for name, spec in specs.items():
            dec = SimDecoder(a.decoder_seconds, scores=spec)
            t0 = time.perf_counter()
            got = []
            for at in range(0, len(rows), a.batch):
                got += dec(rows[at:at + a.batch], priors[at:at + a.batch])
            seconds[name] += time.perf_counter() - t0
            decoded[name], outs[name] = dec.decoded, got
    # equal output: what the gate keeps is the ungated run's image, and every passing prediction is kept
    kept_gate = kept_off_passing = same = 0
    for r, off, g, p in zip(rows, outs["off"], outs["gate"], priors):
        pred = head(p.image_embeds).reshape(a.best_of, r.num_images)
        passing = np.flatnonzero((pred >= gate).any(axis=0))
        kept_off_passing += len(passing)
        idx = g.image_indices if g.image_indices is not None else list(range(r.num_images))
        for j, i in enumerate(idx):
            kept_gate += 1
            if a.best_of == 1:  # one candidate: the gated image is the ungated one
                same += bool(np.array_equal(g.images[j], off.images[i]))
    return {"rows": a.rows, "best_of": a.best_of, "decoder_seconds_per_image": a.decoder_seconds,
            "gate_percentile": a.percentile, "rejected_fraction": round(float((predicted < gate).mean()), 4),
            "images_decoded": decoded, "decoder_seconds": {k: round(v / a.repeats, 3) for k, v in seconds.items()},
            "saved_fraction": round(1 - seconds["gate"] / seconds["off"], 4),
            "kept_with_gate": kept_gate, "ungated_images_whose_prediction_passes": kept_off_passing,
            "identical_to_ungated": same if a.best_of == 1 else None}


def _timeit(fn, n: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / n


def overhead(a) -> dict:
    from kbatch.output.image_embeddings import _npy

    rng = np.random.default_rng(0)
    out = {}
    mlp, lin = _mlp_head(1), _linear_head(768, 2)
    for batch in (8, 64):
        e = rng.standard_normal((batch, 768)).astype(np.float32)
        out[f"mlp_head_ms_per_image_batch{batch}"] = round(1e3 * _timeit(lambda: mlp(e), batch), 4)
        out[f"linear_head_ms_per_image_batch{batch}"] = round(1e3 * _timeit(lambda: lin(e), batch), 4)
    shard = rng.standard_normal((256, 768)).astype(np.float32)
    out["npy_float16_ms_per_image"] = round(1e3 * _timeit(lambda: _npy(shard.astype(np.float16)), 256), 4)
    out["npy_bytes_per_image"] = 768 * 2
    flops = 2 * sum(i * o for i, o in zip(MLP[:-1], MLP[1:]))
    out["mlp_head_mflop_per_image"] = round(flops / 1e6, 3)
    out["h200_vision_ms_fp32_est"] = round(VIT_L14_GFLOP / H200_FP32_TFLOPS, 2)
    out["h200_vision_ms_tf32_est"] = round(VIT_L14_GFLOP / H200_TF32_TFLOPS, 2)
    out["h200_mlp_head_us_fp32_est"] = round(1e6 * flops / (H200_FP32_TFLOPS * 1e12), 4)
    if a.tiny:
        import os

        from kbatch.models.scoring import ClipScorer
        from kbatch.models.tiny import write_tiny_models

        models = ({k: os.path.join(a.models, k) for k in ("prior", "decoder")}
                  if os.path.isdir(os.path.join(a.models, "prior")) else write_tiny_models(a.models))
        import torch

        torch.set_num_threads(1)
        scorer = ClipScorer(path=models["prior"])
        scorer.vision()
        imgs = rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
        out["tiny_vision_ms_per_image_64px"] = round(1e3 * _timeit(lambda: scorer.image_embeds(imgs), 8), 3)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--best-of", type=int, default=1)
    ap.add_argument("--decoder-seconds", type=float, default=0.01)
    ap.add_argument("--percentile", type=float, default=30.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="also time the tiny CLIP vision pass")
    ap.add_argument("--models", default="/tmp/kbatch-bench-models")
    a = ap.parse_args()
    import json

    print(json.dumps({"gate": gate_saving(a), "overhead": overhead(a)}, indent=1))


if __name__ == "__main__":
    main()
