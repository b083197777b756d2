"""What quality scores cost: the prior + decoder predictors in this process, scores off vs on vs best_of.

    python bench/quality.py                  # tiny models, 32 rows, 64x64, decoder 10 steps, 2 rounds
    python bench/quality.py --size 256       # larger images: the scorer's preprocessing grows with them
    python bench/quality.py --device cuda --models DIR   # a GPU and full-size folders (random weights ok)

Per variant: kept images per second (what the user gets), rendered images per second (candidates included)
and the seconds spent in the scorer (vision encoder + image preprocessing + as-written encoding), measured
by timing ``ClipScorer.scores`` calls. Variants run interleaved (A, B, C, A, B, C) so that load on a shared
machine hits them alike. The full-size FLOP estimate is printed beside it (docs/quality.md).
"""
from __future__ import annotations

import argparse
import time

import _common  # noqa: F401 - kbatch importable from the working tree

VARIANTS = {  # name: (clip_score, best_of)
    "off": (False, 1),
    "clip_score": (True, 1),
    "clip_score-jpeg": (True, 1),
    "best_of_2": (True, 2),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="/tmp/kbatch-bench-models")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", action="append")
    a = ap.parse_args()

    import os

    from kbatch.models.decoder import DecoderPredictor
    from kbatch.models.prior import PriorPredictor
    from kbatch.models.scoring import ClipScorer
    from kbatch.models.tiny import write_tiny_models
    from kbatch.schema.rows import Row

    models = ({k: os.path.join(a.models, k) for k in ("prior", "decoder")} if os.path.isdir(
        os.path.join(a.models, "prior")) else write_tiny_models(a.models))
    kw = dict(device=a.device, dtype=a.dtype, threads=a.threads)
    prior_plain = PriorPredictor(models["prior"], **kw)
    prior_text = PriorPredictor(models["prior"], clip_text=True, **kw)
    prior_text.pipe = prior_plain.pipe  # one set of weights
    decoder = DecoderPredictor(models["decoder"], **kw)
    scorers = {"png": ClipScorer(path=models["prior"], device=decoder.place.device),
               "jpeg": ClipScorer(path=models["prior"], device=decoder.place.device, image_format="jpeg", quality=95)}
    for s in scorers.values():
        s.vision()
        s.text()
    spent = {"score": 0.0}

    def timed(obj, method):
        inner = getattr(obj, method)

        def wrapper(*args):
            t0 = time.perf_counter()
            try:
                return inner(*args)
            finally:
                spent["score"] += time.perf_counter() - t0
        setattr(obj, method, wrapper)

    for s in scorers.values():
        timed(s, "scores")
    timed(prior_text.scorer, "text_embeds")  # the prompt's text pass beside the prior's
    from _common import prompts

    texts = prompts(a.rows)
    names = a.variant or list(VARIANTS)
    results: dict[str, list] = {n: [] for n in names}
    for rnd in range(a.rounds):
        for name in names:
            clip, k = VARIANTS[name]
            rows = [Row(f"r{i}", t, seed=1000 + i, height=a.size, width=a.size, num_inference_steps=a.steps,
                        prior_num_inference_steps=5, candidates=k) for i, t in enumerate(texts)]
            decoder.scorer = (scorers["jpeg"] if name.endswith("jpeg") else scorers["png"]) if clip else None
            prior = prior_text if clip else prior_plain
            spent["score"] = 0.0
            t0 = time.perf_counter()
            kept = 0
            for b in range(0, len(rows), a.batch):
                batch = rows[b:b + a.batch]
                outs = decoder(batch, prior(batch))
                kept += sum(len(o.images) for o in outs)
            dt = time.perf_counter() - t0
            results[name].append((kept / dt, kept * k / dt, spent["score"], dt))
            print(f"round {rnd} {name:16s} {kept / dt:7.2f} kept img/s  {kept * k / dt:7.2f} rendered img/s  "
                  f"scorer {spent['score']:.2f} s of {dt:.2f} s  (load {os.getloadavg()[0]:.2f})", flush=True)
    base = sum(r[0] for r in results.get("off", [(float("nan"),)])) / max(1, len(results.get("off", [])))
    print(f"\n| variant | kept img/s | rendered img/s | scorer share of wall | vs off |\n|---|---|---|---|---|")
    for name, rs in results.items():
        kept = sum(r[0] for r in rs) / len(rs)
        rend = sum(r[1] for r in rs) / len(rs)
        share = sum(r[2] for r in rs) / sum(r[3] for r in rs)
        print(f"| {name} | {kept:.2f} | {rend:.2f} | {share:.1%} | {kept / base:.3f} |")
    print(f"\n{a.rows} rows, {a.size}x{a.size}, decoder {a.steps} steps, prior 5, batch {a.batch}, device {a.device}, "
          f"{a.threads} torch thread(s), {a.rounds} rounds")
    vit_l = 2 * 303e6 * 257 + 4 * 24 * 257 ** 2 * 1024  # ViT-L/14 at 224 px: matmuls + attention
    print(f"full size: CLIP ViT-L/14 image pass {vit_l / 1e9:.0f} GFLOP vs ~86 TFLOP per decoded image (50 steps "
          f"x 1.72 TFLOP, NOTES.md): {vit_l / 86e12:.2%} of the FLOPs")


if __name__ == "__main__":
    main()
