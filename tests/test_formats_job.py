"""Issue "Outputs and the people who use them": whole jobs in every output format / image encoding.

The same manifest is rendered as files+png (the reference), webdataset+png and parquet+jpeg with the
simulated models (docs/clusters.md, simulated models: the real actors, writers and commit protocol; stand-in pixels, a smooth gradient
per image; loading torch in every job's actor would triple this file's time). ``open_results``
reads each back: the same pixels for png (exactly), close for jpeg; webdataset tars hold ``KEY.png`` +
``KEY.json`` with dot-free keys; every committed shard has ``stats/<shard>.json`` whose counts add up to the
records. WebP (lossy and lossless) round trips are covered without Ray in test_writer.py and, through the
gallery, in test_gallery_browser.py.
"""
import io
import json
import os
import tarfile

import numpy as np
import pandas as pd
import pytest

import kbatch
from kbatch.config import deep_merge
from kbatch.run.status import summarize

from conftest import sim_models, tiny_config

ROWS = [
    {"id": "fox", "prompt": "a red fox in the snow"},
    {"id": "v1.2", "prompt": "a lighthouse at dusk", "num_images": 2},  # a dot in the id
    {"id": "ramen", "prompt": "a bowl of ramen", "negative_prompt": "blurry"},
    {"id": "ship", "prompt": "a sailing ship", "seed": 11},
    {"id": "bad", "prompt": "not a multiple of 64", "height": 100},  # one error record
]
IDS_OK = ["fox", "v1.2", "ramen", "ship"]
N_IMAGES = 5
EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}
CASES = [("webdataset", "png"), ("parquet", "jpeg")]


def _frame():
    df = pd.DataFrame(ROWS)
    for col in ("num_images", "seed", "height"):
        df[col] = df[col].astype("Int64")
    return df


def _render(out, fmt, image_format):
    # (tiny_config's second argument is the output path, so the output section is merged here)
    # colocated: one actor process per job instead of two (the layout is not what this file tests)
    cfg = deep_merge(tiny_config(sim_models(), out, retries={"max_failed_rows": 1},
                                 resources={"colocate": True, "decoder": {"batch_size": 2}}),
                     {"output": {"format": fmt, "image_format": image_format, "rows_per_shard": 3}})
    return kbatch.render(_frame(), str(out), cfg)


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    out = {("files", "png"): _render(root / "files-png", "files", "png")}
    for fmt, enc in CASES:
        out[(fmt, enc)] = _render(root / f"{fmt}-{enc}", fmt, enc)
    return out


def _luma(a):
    return a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114


def _pixels(res, rid, k):
    img = res.image(rid, k)
    assert img.size == (64, 64) and img.mode == "RGB", (rid, k, img.size, img.mode)
    return np.asarray(img, dtype=np.int16)


@pytest.mark.parametrize("case", [("files", "png")] + CASES, ids=lambda c: "-".join(c))
def test_job_reads_back(runs, case):
    fmt, enc = case
    res = runs[case]
    assert res.run.complete and res.run.exit_code == 0, res.run.summary_line()
    df = res.df
    assert len(df) == N_IMAGES + 1
    ok = df[df.status == "ok"]
    assert sorted(ok.id.unique()) == sorted(IDS_OK)
    assert set(ok.image_format) == {enc}
    bad = df[df.id == "bad"]
    assert list(bad.status) == ["error"] and "height" in bad.error.iloc[0] and "100" in bad.error.iloc[0]
    assert not ok.key.str.contains(r"[./]").any(), "keys have no dots or slashes"
    # reopening from the URI (a fresh reader, any format) gives the same records
    again = kbatch.open_results(res.root)
    assert sorted(zip(again.df.id, again.df.image_index)) == sorted(zip(df.id, df.image_index))
    s = summarize(res.root)
    assert s["complete"] and s["rows_ok"] == 4 and s["rows_failed"] == 1 and s["images"] == N_IMAGES
    # the layout of each format
    files = {os.path.relpath(os.path.join(d, f), res.root) for d, _, fs in os.walk(res.root) for f in fs}
    if fmt == "files":
        assert {p for p in files if p.startswith("images/")} == set(ok.path)
        assert all(p.endswith("." + EXT[enc]) for p in ok.path)
    elif fmt == "webdataset":
        assert not any(p.startswith(("images/", "data/")) for p in files)
        assert any(p.startswith("tars/") and p.endswith(".tar") for p in files)
    else:
        assert not any(p.startswith(("images/", "tars/")) for p in files)
        assert any(p.startswith("data/") and p.endswith(".parquet") for p in files)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_same_pixels_as_files_png(runs, case):
    ref, res = runs[("files", "png")], runs[case]
    lossless = case[1] == "png"
    for rid in IDS_OK:
        for k in range(2 if rid == "v1.2" else 1):
            a, b = _pixels(ref, rid, k), _pixels(res, rid, k)
            what = f"{case} {rid}[{k}]"
            if lossless:
                assert np.array_equal(a, b), f"{what}: png must be bit-exact"
                continue
            # (jpeg at quality >= 90 is 4:4:4; lossy codecs on pixel noise, their worst case, are in
            # test_writer.py)
            dy = np.abs(_luma(a) - _luma(b))
            assert dy.mean() < 8, f"{what}: luma mean diff {dy.mean():.2f}"
            assert dy.mean() < np.abs(_luma(a) - _luma(_pixels(ref, "ship" if rid == "fox" else "fox", 0))).mean() / 3
            if case[1] == "jpeg":
                d = np.abs(a - b)
                assert d.mean() < 4 and np.percentile(d, 99) < 24, \
                    f"{what}: mean diff {d.mean():.2f}, p99 {np.percentile(d, 99)}"
    # sha256 of the same png bytes agree across formats; different encodings differ
    key = ["id", "image_index"]
    m = ref.df[ref.df.status == "ok"].merge(res.df[res.df.status == "ok"], on=key, suffixes=("_a", "_b"))
    assert len(m) == N_IMAGES
    assert (m.sha256_a == m.sha256_b).all() == lossless


@pytest.mark.parametrize("enc", ["png"])
def test_webdataset_members(runs, enc):
    res = runs[("webdataset", enc)]
    ok = res.df[res.df.status == "ok"]
    seen = {}
    for tar_path in sorted((p for p in os.listdir(os.path.join(res.root, "tars")) if p.endswith(".tar"))):
        with tarfile.open(os.path.join(res.root, "tars", tar_path)) as tar:
            names = tar.getnames()
            for n in names:
                stem, ext = n.rsplit(".", 1)
                assert "." not in stem and "/" not in stem, f"member {n!r}: key with a dot"
                assert ext in (EXT[enc], "json"), n
                if ext == "json":
                    meta = json.loads(tar.extractfile(n).read())
                    assert meta["key"] == stem and meta["status"] == "ok"
                    assert f"{stem}.{EXT[enc]}" in names, f"{n} without its image"
                    seen[stem] = meta
                else:
                    data = tar.extractfile(n).read()
                    from PIL import Image

                    assert Image.open(io.BytesIO(data)).format == {"png": "PNG", "webp": "WEBP"}[enc]
    assert sorted(seen) == sorted(ok.key)
    for key, meta in seen.items():
        rec = ok[ok.key == key].iloc[0]
        assert meta["id"] == rec.id and meta["image_index"] == rec.image_index and meta["sha256"] == rec.sha256
    assert seen["v1~2__1"]["id"] == "v1.2"


@pytest.mark.parametrize("case", [("files", "png")] + CASES, ids=lambda c: "-".join(c))
def test_stats_per_shard(runs, case):
    res = runs[case]
    df = res.df
    shards = sorted(df.shard.unique())
    stats_dir = os.path.join(res.root, "stats")
    assert sorted(f[:-5].split("~")[0] for f in os.listdir(stats_dir)) == shards  # <shard>~<attempt>.json
    totals = {"rows": 0, "images": 0, "errors": 0}
    for shard in shards:
        with open(os.path.join(res.root, "_commits", f"{shard}.json")) as fh:
            stats_file = next(f for f in json.load(fh)["files"] if f.startswith("stats/"))  # the committed one
        with open(os.path.join(res.root, stats_file)) as fh:
            st = json.load(fh)
        part = df[df.shard == shard]
        assert st["shard"] == shard
        assert st["rows"] == part.id.nunique()
        assert st["images"] == int((part.status == "ok").sum())
        assert st["errors"] == int((part.status == "error").sum())
        assert st["bytes"] > 0 and st["seconds"] >= 0
        for k in totals:
            totals[k] += st[k]
    assert totals == {"rows": 5, "images": N_IMAGES, "errors": 1}
    assert len(shards) >= 2, "rows_per_shard=3 splits the job"
