"""Static gallery (gallery.html + contact_sheet.png) and the status summary."""
from __future__ import annotations

import json
import os
import urllib.parse
import uuid
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from kbatch import storage
from kbatch.output.gallery import write_gallery
from kbatch.output.results import open_results
from kbatch.schema.records import record_key
from kbatch.run.status import format_summary, summarize
from kbatch.output.writer import OutputSpec, write_shard

FORMATS = ["files", "webdataset", "parquet"]
EVIL = "<script>alert('x')</script> & \"quotes\""


def shard(ids, num_images=1, errors=None, seed=0, size=(24, 32)):
    rng = np.random.default_rng(seed)
    records, images = [], []
    for rid in ids:
        for k in range(num_images):
            records.append({"id": rid, "image_index": k, "status": "ok", "prompt": f"{EVIL} {rid}", "seed": 11 + k,
                            "mode": "text2img", "height": size[0], "width": size[1], "num_inference_steps": 4,
                            "guidance_scale": 4.0, "key": record_key(rid, k)})
            images.append(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    for rid, reason in (errors or {}).items():
        records.append({"id": rid, "image_index": -1, "status": "error", "error": reason, "prompt": EVIL})
        images.append(None)
    return records, images


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.refs = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src"))
        for k in ("href", "src"):
            if a.get(k):
                self.refs.append(a[k])


@pytest.mark.parametrize("fmt", FORMATS)
def test_gallery(tmp_path, fmt):
    root = str(tmp_path / "out")
    recs, imgs = shard(["a.1", "b", "c"], num_images=2,
                       errors={"bad": "height: <65> is not a multiple of 64", "bad2": "prompt: missing"})
    write_shard(OutputSpec(root, fmt, "png"), "s0", recs, imgs)
    out = write_gallery(root, max_images=5, thumb=16)
    assert out == {"html": os.path.join(root, "gallery.html"), "contact_sheet": os.path.join(root, "contact_sheet.png")}
    page = open(out["html"], encoding="utf-8").read()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<script" not in page.replace("&lt;script", "")
    assert "height: &lt;65&gt; is not a multiple of 64" in page and "bad2" in page
    p = _Links()
    p.feed(page)
    assert len(p.imgs) == 5
    assert all(src.startswith("data:image/") for src in p.imgs)
    relative = [r for r in p.refs if not r.startswith(("data:", "http:", "https:", "#"))]
    assert len(relative) >= 6  # 5 images + the contact sheet
    for ref in relative:
        assert os.path.isfile(os.path.join(root, urllib.parse.unquote(ref))), ref
    if fmt == "files":
        assert any(r.startswith("images/s0~") for r in relative)  # images/<shard>~<attempt>/
    else:
        assert sum(r.startswith("gallery/") for r in relative) == 5
    # the full-size copy is the image itself
    res = open_results(root)
    for ref in relative:
        if ref.startswith(("images/", "gallery/")):
            key = os.path.splitext(os.path.basename(urllib.parse.unquote(ref)))[0]
            rec = res.df[res.df.key == key].iloc[0]
            with open(os.path.join(root, urllib.parse.unquote(ref)), "rb") as fh:
                assert fh.read() == res.image_bytes(rec.id, int(rec.image_index))
    sheet = Image.open(out["contact_sheet"])
    assert sheet.format == "PNG" and sheet.width > 16 and sheet.height > 16
    assert not any(storage.TMP_MARK in f for _, _, fs in os.walk(root) for f in fs)


def test_gallery_empty_and_memory():
    root = f"memory://kbatch-gallery-{uuid.uuid4().hex}"
    out = write_gallery(root)
    fs, base = storage.get_fs(root)
    try:
        assert out["html"].startswith("memory://") and fs.exists(storage.join(base, "gallery.html"))
        page = fs.cat_file(storage.join(base, "gallery.html")).decode()
        assert "<img" not in page
        write_shard(OutputSpec(root, "parquet", "webp"), "s0", *shard(["q"]))
        write_gallery(root, thumb=8)
        page = fs.cat_file(storage.join(base, "gallery.html")).decode()
        assert page.count("<img") == 1 and fs.exists(storage.join(base, "gallery", "q__0.webp"))
        import io

        assert Image.open(io.BytesIO(fs.cat_file(storage.join(base, "contact_sheet.png")))).format == "PNG"
    finally:
        fs.rm(base, recursive=True)


def test_status_counts(tmp_path):
    root = str(tmp_path)
    storage.write_json_atomic(root, "_job.json", {"total_rows": 7, "run_id": "nightly-1", "started": "t0"})
    s = summarize(root)
    assert (s["rows_total"], s["rows_done"], s["rows_missing"], s["shards"], s["complete"]) == (7, 0, 7, 0, False)
    write_shard(OutputSpec(root, "files", "png"), "s0",
                *shard(["r0", "r1"], num_images=2, errors={"r2": "prompt: empty string ''"}))
    write_shard(OutputSpec(root, "webdataset", "png"), "s1", *shard(["r3"], errors={"r4": "bad thing happened"}))
    with pytest.raises(RuntimeError):
        write_shard(OutputSpec(root, "files", "png", fail_after_data=True), "s2", *shard(["r5", "r6"]))
    s = summarize(root)
    assert s["rows_total"] == 7 and s["rows_done"] == 5 and s["rows_ok"] == 3 and s["rows_failed"] == 2
    assert s["rows_missing"] == 2 and s["images"] == 5 and s["shards"] == 2
    assert s["failed_by_reason"] == {"prompt": 1, "bad thing happened": 1}
    assert s["uncommitted_shards"] == 1 and s["complete"] is False
    assert s["job"]["run_id"] == "nightly-1" and s["run_id"] == "nightly-1"
    json.dumps(s)  # plain values (the CLI may print it as JSON)
    text = format_summary(s)
    assert "5 done of 7" in text and "missing: 2" in text and "INCOMPLETE" in text and "prompt" in text
    assert "1 uncommitted" in text

    # the retry commits s2, but without the completion marker the run is not complete
    write_shard(OutputSpec(root, "files", "png"), "s2", *shard(["r5", "r6"]))
    s = summarize(root)
    assert s["rows_missing"] == 0 and s["uncommitted_shards"] == 0 and s["complete"] is False
    assert "_SUCCESS" in format_summary(s)
    storage.write_json_atomic(root, "_SUCCESS", {"finished": "t1"})  # a marker that names no run: not trusted
    assert summarize(root)["complete"] is False
    storage.write_json_atomic(root, "_SUCCESS", {"run_id": "nightly-1", "finished": "t1"})
    assert summarize(root)["complete"] is False  # _job.json does not say complete
    storage.write_json_atomic(root, "_job.json", {"total_rows": 7, "run_id": "nightly-1", "started": "t0",
                                                  "status": "complete"})
    s = summarize(root)
    assert s["complete"] is True and "COMPLETE" in format_summary(s)


def test_status_without_job(tmp_path):
    root = str(tmp_path)
    write_shard(OutputSpec(root, "parquet", "png"), "s0", *shard(["a"]))
    storage.write_json_atomic(root, "_SUCCESS", {})
    s = summarize(root)
    assert s["rows_total"] is None and s["rows_missing"] is None and s["job"] is None
    assert s["rows_done"] == 1 and s["complete"] is False
    assert "unknown" in format_summary(s)


def test_status_ok_supersedes_errors(tmp_path):
    """A row with ok records and an error record (rendered again after failing) counts as ok, once; its
    error record no longer stands for any reader."""
    root = str(tmp_path)
    write_shard(OutputSpec(root, "files", "png"), "s0", *shard([], errors={"m": "decoder: CUDA error"}))
    assert summarize(root)["failed_by_reason"] == {"decoder": 1}
    write_shard(OutputSpec(root, "files", "png"), "s1", *shard(["m"]))
    s = summarize(root)
    assert (s["rows_done"], s["rows_ok"], s["rows_failed"], s["failed_by_reason"]) == (1, 1, 0, {})
    assert list(open_results(root).df["status"]) == ["ok"]
