"""Issue 26 items 1-3 and 5 (docs/quality.md): image embeddings, score heads, the gate before the decoder.

Heads are compared with LAION's improved-aesthetic-predictor written out here in torch; embeddings with
transformers' ``CLIPVisionModelWithProjection`` of the image files as read back; the gate's saving is counted in
decoder images (the simulated decoder's count, and a spy on the tiny decoder's pipeline call).
"""
import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import kbatch
from conftest import sim_models, tiny_config
from kbatch.config import ConfigError, from_dict


# ------------------------------------------------------------------------------------- the reference heads
class ReferenceMLP(nn.Module):
    """improved-aesthetic-predictor's MLP (simple_inference.py): Linear/Dropout, no activations."""

    def __init__(self, input_size, widths=(1024, 128, 64, 16)):
        super().__init__()
        a, b, c, d = widths
        self.layers = nn.Sequential(nn.Linear(input_size, a), nn.Dropout(0.2), nn.Linear(a, b), nn.Dropout(0.2),
                                    nn.Linear(b, c), nn.Dropout(0.1), nn.Linear(c, d), nn.Linear(d, 1))

    def forward(self, x):
        return self.layers(x)


def _reference_score(model, embeds):
    """LAION's use: the L2-normalized image embedding, float32, through the model in eval mode."""
    x = torch.from_numpy(np.asarray(embeds, np.float32))
    x = x / x.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        return model.eval()(x)[:, 0].numpy()


def _save_mlp(path, dim, seed, widths=(1024, 128, 64, 16), fmt="pth"):
    torch.manual_seed(seed)
    model = ReferenceMLP(dim, widths)
    for p in model.parameters():  # spread the scores: default init gives a narrow range
        nn.init.normal_(p, std=0.25)
    if fmt == "pth":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    return model


def _save_linear(path, dim, seed):
    torch.manual_seed(seed)
    model = nn.Linear(dim, 1)
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(path))
    return model


def test_heads_equal_the_reference_architecture(tmp_path):
    from kbatch.models.heads import HeadError, load_head

    emb = np.random.default_rng(1).standard_normal((64, 768)).astype(np.float32) * 3
    for fmt in ("pth", "safetensors"):
        ref = _save_mlp(tmp_path / f"mlp.{fmt}", 768, 0, fmt=fmt)
        head = load_head("aesthetic", str(tmp_path / f"mlp.{fmt}"))
        assert head.kind == "mlp" and head.in_dim == 768
        want = _reference_score(ref, emb)
        assert np.abs(want).max() > 1 and want.std() > 0.1  # scores that can tell a wrong head
        np.testing.assert_allclose(head(emb), want, atol=1e-4, rtol=0)
    lin = _save_linear(tmp_path / "lin.safetensors", 768, 2)
    head = load_head("lin", str(tmp_path / "lin.safetensors"))
    assert head.kind == "linear"
    with torch.no_grad():
        want = lin(torch.nn.functional.normalize(torch.from_numpy(emb), dim=-1))[:, 0].numpy()
    np.testing.assert_allclose(head(emb), want, atol=1e-4, rtol=0)
    torch.save({"fc1.weight": torch.zeros(4, 768), "fc2.weight": torch.zeros(1, 4)}, tmp_path / "other.pt")
    with pytest.raises(HeadError, match="neither LAION's improved-aesthetic-predictor"):
        load_head("x", str(tmp_path / "other.pt"))


def test_head_checks_before_any_model_loads(tmp_path, tiny_models, caplog):
    """A head that does not fit the prior's image encoder: ConfigError naming the field and the file, from
    the plan (no Ray, no model); a warning names an encoder that is not CLIP ViT-L/14."""
    from kbatch.models.heads import check_heads
    from kbatch.run.runner import Runner

    _save_mlp(tmp_path / "a768.pth", 768, 0)
    _save_linear(tmp_path / "l32.safetensors", 32, 0)  # the tiny CLIP's projection is 32 wide
    pq.write_table(pa.table({"id": ["a"], "prompt": ["x"]}), tmp_path / "m.parquet")
    cfg = from_dict(tiny_config(tiny_models, tmp_path / "out", manifest=str(tmp_path / "m.parquet"),
                                quality={"heads": {"aesthetic": str(tmp_path / "a768.pth")}}))
    with pytest.raises(ConfigError, match=r"quality.heads.aesthetic.*a768.pth.*768-wide.*32-wide"):
        Runner(cfg).plan()
    ok = from_dict(tiny_config(tiny_models, tmp_path / "out", quality={"heads": {"l": str(tmp_path / "l32.safetensors")}}))
    with caplog.at_level(logging.WARNING, logger="kbatch.models.heads"):
        assert list(check_heads(ok)) == ["l"]
    assert "is not OpenAI CLIP ViT-L/14" in caplog.text and "hidden_size 32" in caplog.text
    sim = from_dict(tiny_config(sim_models(), tmp_path / "o", quality={"heads": {"a": str(tmp_path / "a768.pth")}}))
    assert check_heads(sim)["a"].in_dim == 768  # the simulated prior's width
    with pytest.raises(ConfigError, match="quality.heads.a.*no such file"):
        check_heads(from_dict(tiny_config(sim_models(), tmp_path / "o", quality={"heads": {"a": str(tmp_path / "no.pt")}})))
    with pytest.raises(ConfigError, match="quality.gate.head"):
        from_dict({"quality": {"gate": {"head": "aesthetic", "min": 5}}})


def test_resume_refuses_another_gate_or_heads():
    from kbatch.output.job_file import ResumeError, check_config, fingerprint, meaning

    q = {"heads": {"a": "/h.pth"}, "gate": {"head": "a", "min": 5.0}, "image_embeddings": True}
    cfg = from_dict({"quality": q})
    prev = {"fingerprint": fingerprint(cfg), "meaning": meaning(cfg), "output": "out"}
    check_config(prev, from_dict({"quality": {**q, "gate": {"head": "a", "min": 5}}}))  # the same gate
    for other in ({**q, "gate": {"head": "a", "min": 6.0}}, {**q, "gate": None}, {**q, "image_embeddings": False},
                  {**q, "heads": {"a": "/other.pth"}, "gate": {"head": "a", "min": 5.0}}):
        with pytest.raises(ResumeError, match="quality"):
            check_config(prev, from_dict({"quality": other}))
    assert "quality" not in meaning(from_dict({}))  # off: the fingerprint of older outputs


# --------------------------------------------------------------------------- the gate, simulated (no Ray)
def _rows(n_rows, num_images, k, height=64):
    from kbatch.schema.rows import Row, derive_seed

    return [Row(id=f"r{i}", prompt=f"prompt {i}", seed=derive_seed(0, f"r{i}"), num_images=num_images[i % len(num_images)],
                height=height, width=height, candidates=k) for i in range(n_rows)]


def test_gate_prunes_candidates_before_the_simulated_decoder(tmp_path):
    from kbatch.models.heads import load_head
    from kbatch.models.scoring import QualitySpec, sim_score
    from kbatch.models.sim import SimDecoder, SimPrior, sim_image, sim_image_embedding

    _save_linear(tmp_path / "lin.safetensors", 768, 3)
    head = load_head("lin", str(tmp_path / "lin.safetensors"))
    rows = _rows(24, [1, 2], 3)
    priors = SimPrior()(rows)
    predicted = [head(p.image_embeds).reshape(3, r.num_images) for r, p in zip(rows, priors)]
    gate = float(np.quantile(np.concatenate([p.ravel() for p in predicted]), 0.5))
    spec = QualitySpec(clip=True, embeddings=True, heads={"lin": head}, gate_head="lin", gate_min=gate)
    dec = SimDecoder(scores=spec)
    outs = dec(rows, priors)
    # a candidate is decoded (whole) when one of its images passes; the others never reach the decoder
    want_decoded = sum(r.num_images * int((p >= gate).any(axis=1).sum()) for r, p in zip(rows, predicted))
    assert 0 < want_decoded < sum(r.renders for r in rows) and dec.decoded == want_decoded
    n_filtered = n_kept = 0
    for r, p, o, pr in zip(rows, predicted, outs, priors):
        seeds = pr.candidate_seeds
        kept_idx = o.image_indices if o.image_indices is not None else list(range(r.num_images))
        assert sorted(kept_idx + [i for i, _ in o.filtered]) == list(range(r.num_images))
        for i, score in o.filtered:  # no candidate passes: the best predicted score recorded
            assert not (p[:, i] >= gate).any() and score == p[:, i].max()
            n_filtered += 1
        for j, i in enumerate(kept_idx):  # the best clip_score among the candidates that pass
            passing = np.flatnonzero(p[:, i] >= gate)
            finals = [sim_score(sim_image(seeds[c], i, 64, 64), r.prompt) for c in passing]
            c = passing[int(np.argmax(finals))]
            assert o.seeds[j] == seeds[c] and o.clip_scores[j] == max(finals)
            assert o.predicted_scores[j] == p[c, i] and o.gate == f"lin>={gate!r}"
            e = sim_image_embedding(sim_image(seeds[c], i, 64, 64), pr.image_embeds[c * r.num_images + i])
            np.testing.assert_array_equal(o.image_embeds[j], e)
            assert abs(o.head_scores["lin"][j] - head(e)[0]) < 1e-9
            n_kept += 1
    assert n_filtered and n_kept


# ---------------------------------------------------------------------- a simulated job: records, status
def _manifest(folder, rows, name="m.parquet"):
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), folder / name)
    return str(folder / name)


def test_sim_job_filtered_rows_status_resume_and_embeddings(ray_session, tmp_path):
    from kbatch.models.heads import load_head
    from kbatch.models.sim import sim_embeddings, sim_image
    from kbatch.output.image_embeddings import iter_shard_embeddings
    from kbatch.schema.rows import derive_seed
    from kbatch.output.job_file import ResumeError
    from kbatch.run.runner import Runner, run_job
    from kbatch.run.status import format_summary, summarize

    _save_linear(tmp_path / "lin.safetensors", 768, 4)
    rows = [{"id": f"r{i}", "prompt": f"p {i}", "num_images": 1 + i % 2} for i in range(16)]
    rows.append({"id": "bad", "prompt": "x", "height": 65})  # an error record too: every row ends somewhere
    man = _manifest(tmp_path, rows)
    head = load_head("lin", str(tmp_path / "lin.safetensors"))
    gate = float(np.median(np.concatenate([head(sim_embeddings(derive_seed(0, r["id"]), r["num_images"])[0])
                                           for r in rows[:-1]])))  # the simulated prior's embeddings
    q = {"image_embeddings": True, "heads": {"lin": str(tmp_path / "lin.safetensors")},
         "gate": {"head": "lin", "min": gate}}
    out = tmp_path / "out"
    cfg = tiny_config(sim_models(), out, manifest=man, quality=q, output={"format": "webdataset"})
    first = run_job(from_dict(cfg))
    res = kbatch.open_results(str(out))
    df = res.df
    assert set(df["status"]) == {"ok", "filtered", "error"}
    by_id = df.groupby("id")["status"].agg(set)
    assert len(by_id) == 17  # every row has records
    fil = df[df["status"] == "filtered"]
    assert (fil["predicted_score"] < gate).all() and (fil["gate"] == f"lin>={gate!r}").all()
    ok = df[df["status"] == "ok"]
    assert (ok["predicted_score"] >= gate).all() and ok["score_lin"].notna().all() and ok["clip_score"].isna().all()
    assert first.images == len(ok) and first.complete  # the run counts written images, not requested ones
    # embeddings: aligned with .df, the stand-in of each image as written; NaN rows elsewhere
    emb = res.embeddings
    assert emb.shape == (len(df), 768) and emb.dtype == np.float16
    assert np.isnan(emb[(df["status"] != "ok").to_numpy()]).all()
    for k in np.flatnonzero((df["status"] == "ok").to_numpy())[:6]:
        rec = df.iloc[k]
        img = np.asarray(res.image(rec["id"], int(rec["image_index"])).convert("RGB"))
        assert np.array_equal(img, sim_image(int(rec["seed"]), int(rec["image_index"]), 64, 64))
    got = [(t, e) for t, e in iter_shard_embeddings(str(out), columns=["id", "image_index", "status"])]
    assert sum(t.num_rows for t, _ in got) == len(df)
    np.testing.assert_array_equal(np.concatenate([e for _, e in got]), emb)
    assert (out / "img_emb").is_dir() and all(p.suffix == ".npy" for p in (out / "img_emb").iterdir())
    # kbatch status counts filtered rows apart, with the gate's correlation
    s = summarize(str(out))
    n_filtered_rows = sum(1 for v in by_id if v == {"filtered"})
    assert s["rows_filtered"] == n_filtered_rows > 0 and s["rows_failed"] == 1
    assert s["rows_ok"] + s["rows_filtered"] + s["rows_failed"] == 17 and s["images"] == len(ok)
    assert s["gate"]["images"] == len(ok) and s["gate"]["correlation"] > 0.3
    # the notebook gallery sorted by a head's score: the best three by score_lin, with its sort buttons
    inline = res.gallery(max_images=3, sort="best", by="score_lin").html
    best3 = ok.sort_values("score_lin", ascending=False)["score_lin"].head(3)
    assert all(f'data-score="{v:.4f}"' in inline for v in best3) and inline.count('class="card') == 3
    assert "lin, best first" in inline and f"lin {best3.iloc[0]:.3g}" in inline
    with pytest.raises(ValueError, match="score_nope.*score_lin"):
        res.gallery(sort="best", by="score_nope")
    # and so does the run's own result
    assert (first.rows_filtered, first.rows_failed, first.rows_ok) == (n_filtered_rows, 1, 16 - n_filtered_rows)
    assert f"filtered {n_filtered_rows}," in first.summary_line() and first.rows_missing == 0
    text = format_summary(s)
    assert f"filtered: {n_filtered_rows}" in text and "correlation" in text
    # --retry-failed renders the error row again, never a filtered one; a changed gate is refused
    plan = Runner(from_dict(cfg), retry_failed=True).plan()  # what a rerun would render (no Ray, no model)
    try:
        assert plan.scan.to_render == 1 and plan.scan.filtered == n_filtered_rows
    finally:
        plan.lease.release()
    with pytest.raises(ResumeError, match="quality.gate"):
        run_job(from_dict(tiny_config(sim_models(), out, manifest=man, output={"format": "webdataset"},
                                      quality={**q, "gate": {"head": "lin", "min": gate + 1}})))


# ------------------------------------------------------- tiny models: stage prior -> gated stage decoder
def test_tiny_split_stages_gate_embeddings_and_heads(tiny_models, ray_session, tmp_path):
    """The embeddings output carries what the gate needs; the decoding job gates on it (filtered rows),
    stores each image's embedding (transformers' CLIP of the file, cosine >= 0.9999) and its head score; the
    tiny decoder, called directly with the same gate, is handed only the candidates that pass."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from kbatch.models.decoder import DecoderPredictor
    from kbatch.models.heads import load_head
    from kbatch.models.scoring import ClipScorer, QualitySpec
    from kbatch.output.embeddings import read_prior_outputs
    from kbatch.run.runner import run_job
    from kbatch.schema.rows import Row

    ref = _save_mlp(tmp_path / "aes.safetensors", 32, 5, widths=(64, 16, 8, 4), fmt="safetensors")
    head = load_head("aes", str(tmp_path / "aes.safetensors"))
    rows = [{"id": f"t{i}", "prompt": f"a photo of thing {i}", "num_images": 1 + i % 2} for i in range(5)]
    from PIL import Image

    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    rows += [{"id": f"i{i}", "prompt": f"an oil painting {i}", "mode": "img2img", "init_image": "init.png",
              "strength": 0.6, "num_images": 1} for i in range(2)]  # a mode with inputs: gated with them
    man = _manifest(tmp_path, rows)
    heads = {"aes": str(tmp_path / "aes.safetensors")}
    emb = tmp_path / "emb"
    q = {"best_of": 2, "heads": heads, "gate": {"head": "aes", "min": 0.0}}
    assert run_job(from_dict(tiny_config(tiny_models, emb, manifest=man, stage="prior", quality=q))).exit_code == 0
    stored = [r for f in sorted((emb / "embeddings").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted(r["id"] for r in stored) == sorted(r["id"] for r in rows)
    pred = {r["id"]: head(np.asarray(r["image_embeds"], np.float32).reshape(-1, r["embed_dim"])).reshape(
        2, r["num_images"]) for r in stored}
    gate = float(np.median(np.concatenate([p.ravel() for p in pred.values()])))
    q = {**q, "gate": {"head": "aes", "min": gate}, "image_embeddings": True}
    out = tmp_path / "dec"
    assert run_job(from_dict(tiny_config(tiny_models, out, manifest=str(emb), stage="decoder", quality=q,
                                         limits={"allowed_roots": [str(tmp_path)]}))).exit_code == 0
    res = kbatch.open_results(str(out))
    df, embs = res.df, res.embeddings
    assert set(df["status"]) == {"ok", "filtered"} and len(df) == sum(r["num_images"] for r in rows)
    vision = CLIPVisionModelWithProjection.from_pretrained(tiny_models["prior"], subfolder="image_encoder").eval()
    processor = CLIPImageProcessor.from_pretrained(tiny_models["prior"], subfolder="image_processor")
    for k, rec in enumerate(df.to_dict("records")):
        p = pred[rec["id"]][:, int(rec["image_index"])]
        if rec["status"] == "filtered":  # no candidate of this image passes: never kept
            assert (p < gate).all() and rec["predicted_score"] == pytest.approx(p.max(), abs=1e-9)
            assert np.isnan(embs[k]).all()
            continue
        assert rec["predicted_score"] >= gate and rec["predicted_score"] in [pytest.approx(x, abs=1e-9) for x in p]
        with torch.no_grad():
            want = vision(**processor(images=res.image(rec["id"], int(rec["image_index"])).convert("RGB"),
                                      return_tensors="pt")).image_embeds[0].numpy()
        got = embs[k].astype(np.float32)
        assert got @ want / np.linalg.norm(got) / np.linalg.norm(want) >= 0.9999
        assert rec["score_aes"] == pytest.approx(float(_reference_score(ref, want[None])[0]), abs=1e-3)
    # the decoder itself: handed only the candidates that have an image passing the gate
    by_id = {r["id"]: r for r in stored}
    locs = [(str(f), i, r["id"]) for f in sorted((emb / "embeddings").glob("*.parquet"))
            for i, r in enumerate(pq.read_table(f, columns=["id"]).to_pylist())]
    priors = read_prior_outputs(locs)
    batch = [Row(id=pid, prompt=by_id[pid]["prompt"], seed=by_id[pid]["seed"], num_images=by_id[pid]["num_images"],
                 height=64, width=64, num_inference_steps=4, guidance_scale=4.0, candidates=2) for _, _, pid in locs]
    batch = [r for r in batch if r.num_images == 1 and r.id.startswith("t")]  # text2img: one decoder key
    priors = [p for p in priors if p.id in {r.id for r in batch}]
    dec = DecoderPredictor(tiny_models["decoder"], device="cpu", dtype="float32", threads=1)
    dec.scorer = ClipScorer(path=tiny_models["prior"])  # best_of 2: the kept candidate is chosen by clip_score
    dec.quality = QualitySpec(clip=True, heads={"aes": head}, gate_head="aes", gate_min=gate)
    handed = []
    real_call = dec._pipeline_call
    dec._pipeline_call = lambda lane, rows, *a: handed.append(sum(r.renders for r in rows)) or real_call(lane, rows, *a)
    outs = dec(batch, priors)
    want = sum(int((pred[r.id] >= gate).any(axis=1).sum()) for r in batch)
    assert handed == ([want] if want else []) and dec.decoded == want < 2 * len(batch) and want > 0
    for r, o in zip(batch, outs):
        if o.images.shape[0]:  # the same pixels as the job's kept image
            assert np.array_equal(o.images[0], np.asarray(res.image(r.id, 0).convert("RGB")))
        else:
            assert o.filtered == [(0, float(pred[r.id][:, 0].max()))]
