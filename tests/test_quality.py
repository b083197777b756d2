"""Issue 21 (docs/quality.md): clip_score of every image, best-of-k candidates, and the readers that show them.

The scores are recomputed here the way a user would, with transformers alone: the prior folder's
``image_encoder`` / ``image_processor`` on the image file as read back, and its ``text_encoder`` /
``tokenizer`` on the prompt. Kept best-of images are rendered again with plain diffusers from their record's
seed (docs/manifest.md, reproducing an image).
"""
import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import kbatch
from conftest import assert_pixels_close, sim_models, tiny_config
from kbatch.config import ConfigError, from_dict
from kbatch.schema.rows import candidate_seeds, derive_seed
from reference import render_row

STEPS = dict(height=64, width=64, num_inference_steps=4, guidance_scale=4.0, prior_num_inference_steps=3,
             prior_guidance_scale=4.0, negative_prompt=None, strength=0.5)


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _mix(*items):
    return [{"prompt": None, "image": None, "image_uri": None, **it} for it in items]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quality-inputs")
    rng = np.random.default_rng(7)
    init = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    (folder / "init.png").write_bytes(_png(init))
    (folder / "mask.png").write_bytes(_png(mask))
    return folder


def _manifest(folder, rows, name="m.parquet"):
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), folder / name)
    return str(folder / name)


ROWS = [
    {"id": "t2i", "prompt": "a red fox in the snow", "mode": "text2img", "num_images": 2},
    {"id": "i2i", "prompt": "an oil painting", "mode": "img2img", "init_image": "init.png", "strength": 0.6,
     "num_images": 1},
    {"id": "inp", "prompt": "a straw hat", "mode": "inpaint", "init_image": "init.png", "mask": "mask.png",
     "num_images": 1},
    {"id": "mix", "prompt": "a cat and a tree", "mode": "interpolate",
     "mix": _mix({"prompt": "a cat", "weight": 0.4}, {"image_uri": "init.png", "weight": 0.6}), "num_images": 1},
]


# ------------------------------------------------------------------------------------------- the reference
@pytest.fixture(scope="module")
def clip(tiny_models):
    """transformers alone: (score(PIL image, prompt)) with the prior folder's encoders."""
    from transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                              CLIPVisionModelWithProjection)

    folder = tiny_models["prior"]
    vision = CLIPVisionModelWithProjection.from_pretrained(folder, subfolder="image_encoder").eval()
    processor = CLIPImageProcessor.from_pretrained(folder, subfolder="image_processor")
    text = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")

    @torch.no_grad()
    def score(image, prompt):
        i = vision(**processor(images=image, return_tensors="pt")).image_embeds
        t = text(**tokenizer([prompt], padding=True, return_tensors="pt")).text_embeds
        return 100 * torch.nn.functional.cosine_similarity(i, t).item()

    return score


def _check_scores(res, clip, rows=None):
    """Every ok record's clip_score equals transformers' score of its image file and prompt."""
    df = res.df[res.df["status"] == "ok"]
    assert len(df) and df["clip_score"].notna().all()
    for rec in df.to_dict("records"):
        want = clip(res.image(rec["id"], int(rec["image_index"])).convert("RGB"), rec["prompt"])
        assert abs(rec["clip_score"] - want) < 0.05, (rec["id"], rec["image_index"], rec["clip_score"], want)
    return df


# --------------------------------------------------------------------------- every mode, best_of 3, files/png
@pytest.fixture(scope="module")
def best_of_job(tiny_models, ray_session, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "out"
    cfg = tiny_config(tiny_models, out, manifest=_manifest(inputs, ROWS), quality={"best_of": 3},
                      output={"gallery": True})
    from kbatch.run.runner import run_job

    result = run_job(from_dict(cfg))
    assert result.exit_code == 0, result
    return kbatch.open_results(str(out)), out


def test_clip_score_every_mode_equals_transformers(best_of_job, clip):
    res, _ = best_of_job
    df = _check_scores(res, clip)
    assert sorted(df["mode"].unique()) == ["img2img", "inpaint", "interpolate", "text2img"]
    assert str(df["clip_score"].dtype) == "float64"


def test_best_of_keeps_the_argmax_and_only_it(best_of_job):
    res, out = best_of_job
    df = res.df[res.df["status"] == "ok"]
    assert len(df) == 5  # 2 + 1 + 1 + 1 kept images
    files = sorted(p.name for p in (out / "images").rglob("*.png"))
    assert len(files) == 5, files  # only kept images are written
    kept_other = 0
    for rec in df.to_dict("records"):
        seeds, scores = list(rec["candidate_seeds"]), list(rec["candidate_scores"])
        assert seeds == candidate_seeds(derive_seed(0, rec["id"]), 3) and len(scores) == 3
        best = int(np.argmax(scores))
        assert rec["clip_score"] == scores[best] and rec["seed"] == seeds[best]
        kept_other += best != 0
    assert kept_other, "some image kept a candidate other than 0 (else the test tells nothing)"
    # the two images of one row choose independently, each among its own image index
    t2i = df[df["id"] == "t2i"].sort_values("image_index")
    assert [len(s) for s in t2i["candidate_scores"]] == [3, 3]
    assert list(t2i["candidate_scores"].iloc[0]) != list(t2i["candidate_scores"].iloc[1])


def test_kept_image_is_diffusers_with_its_recorded_seed(best_of_job, tiny_models, inputs):
    res, _ = best_of_job
    df = res.df[res.df["status"] == "ok"]
    init = Image.open(inputs / "init.png").convert("RGB")
    mask = Image.open(inputs / "mask.png")
    by_id = {r["id"]: r for r in ROWS}
    for rec in df.to_dict("records"):
        row = {**STEPS, "num_images": 1, **by_id[rec["id"]], "seed": int(rec["seed"])}
        ref = render_row(tiny_models, row, init_image=init, mask=mask, mix_images=[None, init])
        got = np.asarray(res.image(rec["id"], int(rec["image_index"])).convert("RGB"))
        assert_pixels_close(got, ref[int(rec["image_index"])], f"{rec['id']}#{rec['image_index']}")


def test_status_shows_score_quantiles(best_of_job):
    from kbatch.run.status import format_summary, summarize

    res, out = best_of_job
    s = summarize(str(out))
    cs = s["clip_score"]
    scores = res.df["clip_score"].dropna().to_numpy()
    assert cs["images"] == 5 and cs["min"] == round(scores.min(), 4) and cs["max"] == round(scores.max(), 4)
    assert cs["quantiles"]["p50"] == round(float(np.quantile(scores, 0.5)), 4)
    q = list(cs["quantiles"].values())
    assert q == sorted(q)
    text = format_summary(s)
    assert "clip_score: 5 scored images" in text and "p50" in text


def test_gallery_shows_scores_inputs_and_sorts(best_of_job):
    res, out = best_of_job
    page = (out / "gallery.html").read_text()
    df = res.df[res.df["status"] == "ok"]
    for v in df["clip_score"]:
        assert f'data-score="{v:.4f}"' in page and f"clip {v:.2f}" in page
    assert "clip score, best first" in page and "clip score, worst first" in page
    assert page.count('class="card wide"') == 2  # img2img and inpaint: the init image beside the output
    assert page.count('alt="init"') == 2 and page.count('alt="mask"') == 1
    # inline (Jupyter): the worst first over the whole output
    inline = res.gallery(max_images=2, sort="worst").html
    worst = df.sort_values("clip_score")["clip_score"].head(2)
    assert all(f'data-score="{v:.4f}"' in inline for v in worst) and inline.count('class="card') == 2


# ------------------------------------------------------------------------ webdataset/jpeg, colocated stages
def test_jpeg_scores_the_image_as_written(tiny_models, ray_session, inputs, tmp_path, clip):
    rows = [{"id": "a", "prompt": "a blue bird", "num_images": 2},
            {"id": "b", "prompt": "a straw hat", "mode": "inpaint", "init_image": "init.png", "mask": "mask.png",
             "num_images": 1}]
    out = tmp_path / "jpeg"
    cfg = tiny_config(tiny_models, out, manifest=_manifest(inputs, rows, "jpeg.parquet"),
                      quality={"clip_score": True},
                      output={"format": "webdataset", "image_format": "jpeg", "quality": 60},
                      resources={"colocate": True})
    from kbatch.run.runner import run_job

    assert run_job(from_dict(cfg)).exit_code == 0
    res = kbatch.open_results(str(out))
    df = _check_scores(res, clip)
    assert df["candidate_seeds"].isna().all() and df["candidate_scores"].isna().all()
    assert (df["seed"] == [derive_seed(0, i) for i in df["id"]]).all()


# ----------------------------------------------------------------------- stage prior -> stage decoder, parquet
def test_split_stages_carry_what_scoring_needs(tiny_models, ray_session, inputs, tmp_path, clip):
    from kbatch.run.runner import run_job

    rows = [{"id": "s1", "prompt": "a lighthouse", "num_images": 2}, {"id": "s2", "prompt": "a teapot"}]
    emb = tmp_path / "emb"
    cfg = tiny_config(tiny_models, emb, manifest=_manifest(inputs, rows, "split.parquet"), stage="prior",
                      quality={"best_of": 2})
    assert run_job(from_dict(cfg)).exit_code == 0
    stored = pq.read_table(next((emb / "embeddings").glob("*.parquet"))).to_pylist()
    assert all(len(r["candidate_states"]) == 2 and len(r["text_embeds"]) > 0 for r in stored)
    out = tmp_path / "dec"
    cfg = tiny_config(tiny_models, out, manifest=str(emb), stage="decoder", quality={"best_of": 2},
                      output={"format": "parquet", "image_format": "webp", "quality": 90})
    assert run_job(from_dict(cfg)).exit_code == 0
    res = kbatch.open_results(str(out))
    df = _check_scores(res, clip)
    assert len(df) == 3
    for rec in df.to_dict("records"):
        assert rec["seed"] == list(rec["candidate_seeds"])[int(np.argmax(rec["candidate_scores"]))]
    # a decoding job whose best_of differs from the embeddings' fails those rows, naming the key
    out2 = tmp_path / "dec2"
    cfg = tiny_config(tiny_models, out2, manifest=str(emb), stage="decoder", quality={"best_of": 3})
    run_job(from_dict(cfg))
    errs = kbatch.open_results(str(out2)).df
    assert (errs["status"] == "error").all() and errs["error"].str.contains("quality.best_of").all()


# ------------------------------------------------------------------------------- no Ray: the pieces
def test_config_quality_keys():
    assert from_dict({}).quality.best_of == 1 and not from_dict({}).quality.scores
    assert from_dict({"quality": {"best_of": 4}}).quality.scores  # best_of > 1 scores
    assert from_dict({"quality": {"best_of": 16, "clip_score": True}}).quality.best_of == 16
    for bad in (0, 17, -1):
        with pytest.raises(ConfigError, match=rf"'quality.best_of' must be in \[1, 16\].*got {bad}"):
            from_dict({"quality": {"best_of": bad}})
    with pytest.raises(ConfigError, match="'quality.best_of' must be int, got 'many'"):
        from_dict({"quality": {"best_of": "many"}})
    with pytest.raises(ConfigError, match="'quality.clip_score' must be bool"):
        from_dict({"quality": {"clip_score": "maybe"}})
    with pytest.raises(ConfigError, match="unknown config key 'quality.top_k'"):
        from_dict({"quality": {"top_k": 2}})


def test_candidate_seeds_are_stable():
    s = candidate_seeds(1234, 4)
    assert s[0] == 1234 and len(set(s)) == 4 and all(0 <= x < 2**63 for x in s)
    assert candidate_seeds(1234, 2) == s[:2]  # a candidate's seed does not depend on k


def test_text_embedding_beside_the_prior_and_in_the_decoder_agree(tiny_models):
    """The prior's text pass (sent with the embeddings) and the decoder's own (embeddings without it) give
    the same scores; the prior's pipeline output is unchanged by it."""
    from kbatch.models.decoder import DecoderPredictor
    from kbatch.models.prior import PriorPredictor
    from kbatch.models.scoring import ClipScorer
    from kbatch.schema.rows import Row

    rows = [Row("x", "a red fox", seed=3, num_images=2, **{k: v for k, v in STEPS.items() if k != "strength"})]
    with_text = PriorPredictor(tiny_models["prior"], device="cpu", clip_text=True)(rows)
    without = PriorPredictor(tiny_models["prior"], device="cpu")(rows)
    assert without[0].text_embeds is None and with_text[0].text_embeds.shape == (32,)
    np.testing.assert_array_equal(with_text[0].image_embeds, without[0].image_embeds)
    dec = DecoderPredictor(tiny_models["decoder"], device="cpu", scorer=ClipScorer(path=tiny_models["prior"]))
    a, b = dec(rows, with_text)[0], dec(rows, without)[0]
    np.testing.assert_allclose(a.clip_scores, b.clip_scores, atol=1e-4)
    np.testing.assert_array_equal(a.images, b.images)


def test_batches_count_candidates():
    """A batch's size counts every candidate's images: best_of 3 rows of 1 image fill a 4-image batch alone."""
    from kbatch.plan.planner import chunk, images
    from kbatch.schema.rows import Row

    rows = [Row(f"r{i}", "p", candidates=3) for i in range(3)]
    assert images(rows) == 9 and [len(b) for b in chunk(rows, Row.prior_key, 4)] == [1, 1, 1]
    rows = [Row(f"r{i}", "p") for i in range(3)]
    assert images(rows) == 3 and [len(b) for b in chunk(rows, Row.prior_key, 4)] == [3]
    assert Row("a", "p", candidates=3).fingerprint() == Row("a", "p").fingerprint()  # resume: same row


def test_resume_refuses_other_quality_settings():
    """Scores and best_of decide which image is kept and what its record holds: an output is not resumed
    with other settings; with scores off the fingerprint is what it was before quality existed."""
    from kbatch.output.job_file import ResumeError, check_config, fingerprint, meaning

    off, best3 = from_dict({}), from_dict({"quality": {"best_of": 3}})
    assert "quality" not in meaning(off)
    prev = {"fingerprint": fingerprint(best3), "meaning": meaning(best3), "output": "out"}
    check_config(prev, from_dict({"quality": {"best_of": 3, "clip_score": True}}))  # the same job
    for other in (off, from_dict({"quality": {"best_of": 2}}), from_dict({"quality": {"clip_score": True}})):
        with pytest.raises(ResumeError, match="quality"):
            check_config(prev, other)


def test_half_precision_models_score_with_float32_weights(tiny_models):
    """A bfloat16 prior (float16 on a GPU) was rounded when loaded: its scorer loads the folder's encoders in
    float32 instead of widening the rounded weights, so the scores are the float32 ones."""
    from kbatch.models.prior import PriorPredictor
    from kbatch.models.scoring import ClipScorer

    half = PriorPredictor(tiny_models["prior"], device="cpu", dtype="bfloat16", clip_text=True)
    assert half.pipe.text_encoder.dtype == torch.bfloat16
    want = ClipScorer(path=tiny_models["prior"])
    prompts = ["a red fox", "a blue bird"]
    np.testing.assert_allclose(half.scorer.text_embeds(prompts), want.text_embeds(prompts), atol=1e-6)
    img = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    got = ClipScorer(pipe=half.pipe, path=half.scorer.path).image_embeds(img)
    np.testing.assert_allclose(got, want.image_embeds(img), atol=1e-6)
    rounded = ClipScorer(pipe=half.pipe).text_embeds(prompts)  # widened bfloat16 weights: not the same
    assert np.abs(rounded - want.text_embeds(prompts)).max() > 1e-4


def test_as_written_decodes_lossy_formats():
    from kbatch.models.scoring import as_written, lossless

    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert lossless("png", 95) and lossless("webp", 100) and not lossless("jpeg", 100) and not lossless("webp", 90)
    np.testing.assert_array_equal(np.asarray(as_written(img, "png", 95)), img)
    np.testing.assert_array_equal(np.asarray(as_written(img, "webp", 100)), img)
    jpeg = np.asarray(as_written(img, "jpeg", 80))
    assert jpeg.shape == img.shape and not np.array_equal(jpeg, img)


def test_score_summary_none_without_scores(tmp_path):
    from kbatch.output.writer import OutputSpec, write_shard
    from kbatch.run.status import format_summary, score_summary, summarize

    img = np.zeros((8, 8, 3), np.uint8)
    write_shard(OutputSpec(str(tmp_path)), "s0", [{"id": "a", "image_index": 0, "status": "ok"}], [img])
    assert score_summary(str(tmp_path)) is None
    assert "clip_score" not in format_summary(summarize(str(tmp_path)))


# --------------------------------------------------------------------------------------- simulated models
def test_sim_models_deterministic_stand_in_scores(ray_session, tmp_path):
    from kbatch.models.scoring import sim_score
    from kbatch.models.sim import sim_image
    from kbatch.run.runner import run_job

    rows = [{"id": f"r{i}", "prompt": f"prompt {i}", "num_images": 1 + i % 2} for i in range(4)]
    out = tmp_path / "sim"
    cfg = tiny_config(sim_models(), out, manifest=_manifest(tmp_path, rows), quality={"best_of": 3},
                      output={"format": "parquet"})
    assert run_job(from_dict(cfg)).exit_code == 0
    a = kbatch.open_results(str(out)).df
    assert len(a) == 6 and (a["model_decoder"] == "sim").all()
    # a function of (pixels, prompt) only: the same numbers computed here, without the job
    for rec in a.to_dict("records"):
        i = int(rec["image_index"])
        seeds = candidate_seeds(derive_seed(0, rec["id"]), 3)
        want = [sim_score(sim_image(s, i, 64, 64), rec["prompt"]) for s in seeds]
        assert list(rec["candidate_scores"]) == want and list(rec["candidate_seeds"]) == seeds
        assert rec["seed"] == seeds[int(np.argmax(want))] and rec["clip_score"] == max(want)


# ------------------------------------------------------------------------------- the gallery in a browser
SORT_SCRIPT = """
<script id="kbatch-check">
window.addEventListener('load', () => {
  const order = () => [...document.querySelectorAll('.kbatch-gallery .card')].map(c => {
      const r = c.getBoundingClientRect(); return {y: r.top, x: r.left, s: c.dataset.score};
    }).sort((a, b) => (a.y - b.y) || (a.x - b.x)).map(c => c.s === undefined ? null : Number(c.s));
  const res = {as: order()};
  document.querySelector('label[for$="-best"]').click(); res.best = order();
  document.querySelector('label[for$="-worst"]').click(); res.worst = order();
  res.inputs = [...document.querySelectorAll('.inputs img')].map(i => [i.alt, i.naturalWidth]);
  const pre = document.createElement('pre'); pre.id = 'kbatch-result'; pre.textContent = JSON.stringify(res);
  document.body.appendChild(pre);
});
</script>
"""


def test_gallery_sorts_by_score_in_a_browser(tmp_path):
    """Headless Chromium: the sort buttons put the cards in score order (best first, worst first; unscored
    last), with no script in the page; an img2img card's init image decodes beside the output."""
    import html as _html
    import json
    import os
    import re

    from test_gallery_browser import CHROMIUM, MISSING, WINDOW, _run_chromium

    if CHROMIUM is None:
        if os.environ.get("CI", "").strip().lower() in ("true", "1"):
            pytest.fail(f"{MISSING}, and CI requires it", pytrace=False)
        pytest.skip(MISSING)
    from kbatch.output.gallery import write_gallery
    from kbatch.output.writer import OutputSpec, write_shard

    rng = np.random.default_rng(1)
    init = tmp_path / "init.png"
    init.write_bytes(_png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    scores = [21.5, 33.25, None, 12.0, 27.75]
    records = [{"id": f"r{k}", "image_index": 0, "status": "ok", "prompt": f"p{k}", "seed": k, "clip_score": s,
                "mode": "img2img" if k == 1 else "text2img", "init_image": str(init) if k == 1 else None}
               for k, s in enumerate(scores)]
    root = tmp_path / "out"
    write_shard(OutputSpec(str(root)), "s0", records, [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                                                         for _ in records])
    page = write_gallery(str(root), thumb=96)["html"]
    text = open(page, encoding="utf-8").read()
    assert "<script" not in text
    check = root / "_sort_check.html"
    check.write_text(text.replace("</body>", SORT_SCRIPT + "</body>"), encoding="utf-8")
    p = _run_chromium(tmp_path, *WINDOW, "--virtual-time-budget=10000", "--dump-dom", check.as_uri())
    got = json.loads(_html.unescape(re.search(r'<pre id="kbatch-result">(.*?)</pre>', p.stdout, re.S).group(1)))
    shown = [round(v, 2) if v is not None else None for v in got["as"]]
    assert sorted(shown, key=str) == sorted(scores, key=str)
    assert got["best"] == [33.25, 27.75, 21.5, 12.0, None]
    assert got["worst"] == [12.0, 21.5, 27.75, 33.25, None]
    assert got["inputs"] == [["init", 48]]
