"""open_results: records, image access in every format, integrity checks, inline gallery."""
from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from kbatch import storage
from kbatch.output.results import Results, open_results
from kbatch.schema.records import record_key
from kbatch.output.writer import OutputSpec, write_shard

FORMATS = ["files", "webdataset", "parquet"]


def shard(ids, num_images=1, size=(16, 24), seed=0, errors=None, prompt="p {id}"):
    rng = np.random.default_rng(seed)
    records, images = [], []
    for rid in ids:
        for k in range(num_images):
            records.append({"id": rid, "image_index": k, "status": "ok", "prompt": prompt.format(id=rid),
                            "seed": 7, "height": size[0], "width": size[1], "mode": "text2img",
                            "num_inference_steps": 3, "guidance_scale": 4.0, "key": record_key(rid, k)})
            images.append(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    for rid, reason in (errors or {}).items():
        records.append({"id": rid, "image_index": -1, "status": "error", "error": reason})
        images.append(None)
    return records, images


@pytest.mark.parametrize("fmt", FORMATS)
def test_many_shards_and_row_groups(tmp_path, fmt):
    root = str(tmp_path)
    ids_a = [f"a{i:03d}" for i in range(40)]  # > one parquet row group (32 rows)
    rec_a, img_a = shard(ids_a, seed=1)
    rec_b, img_b = shard(["b.0", "b.1"], num_images=3, seed=2, errors={"b.bad": "seed: -1 is negative"})
    write_shard(OutputSpec(root, fmt, "png"), "shard-00000", rec_a, img_a)
    write_shard(OutputSpec(root, fmt, "png"), "shard-00001", rec_b, img_b)
    res = open_results(root)
    assert len(res) == 47 and res.n_images == 46 and res.n_errors == 1 and res.n_rows == 43
    assert res.shards == ["shard-00000", "shard-00001"]
    assert "images=46" in repr(res) and "errors=1" in repr(res)
    for i in (0, 31, 32, 39):
        np.testing.assert_array_equal(np.asarray(res.image(ids_a[i])), img_a[i])
    np.testing.assert_array_equal(np.asarray(res.image("b.1", 2)), img_b[5])
    got = res.images(["b.1", "a005"])
    assert len(got) == 4
    np.testing.assert_array_equal(np.asarray(got[0]), img_b[3])
    np.testing.assert_array_equal(np.asarray(got[3]), img_a[5])
    assert len(res.images()) == 46
    assert res.record("b.0", 1)["key"] == "b~0__1"


def test_job_and_pickle(tmp_path):
    root = str(tmp_path)
    assert open_results(root).job is None and len(open_results(root)) == 0
    storage.write_json_atomic(root, "_job.json", {"run_id": "abc", "total_rows": 2})
    write_shard(OutputSpec(root, "webdataset", "png"), "s0", *shard(["x", "y"]))
    res = open_results(root)
    assert res.job == {"run_id": "abc", "total_rows": 2}
    res.image("x")  # fills the tar index cache
    res2 = pickle.loads(pickle.dumps(res))
    assert isinstance(res2, Results) and len(res2) == 2
    assert res2.image("y").size == (24, 16)


def test_uncommitted_shard_ignored(tmp_path):
    root = str(tmp_path)
    write_shard(OutputSpec(root, "files", "png"), "s0", *shard(["x"]))
    write_shard(OutputSpec(root, "files", "png"), "s1", *shard(["y"]))
    storage.remove(root, "_commits/s1.json")  # as if the writer died before committing
    res = open_results(root)
    assert set(res.df.id) == {"x"}
    with pytest.raises(KeyError, match="'y'"):
        res.image("y")


@pytest.mark.parametrize("fmt", FORMATS)
def test_corruption_detected(tmp_path, fmt):
    root = str(tmp_path)
    write_shard(OutputSpec(root, fmt, "png"), "s0", *shard(["x"]))
    res = open_results(root)
    if fmt == "files":
        path = os.path.join(root, res.record("x")["path"])
        other = Image.fromarray(np.zeros((16, 24, 3), np.uint8))
        other.save(path)
        with pytest.raises(ValueError, match="sha256 mismatch"):
            res.image("x")
        assert res.image_bytes("x", verify=False)[:4] == b"\x89PNG"
    else:
        res.df.loc[0, "sha256"] = "0" * 64
        with pytest.raises(ValueError, match="sha256 mismatch"):
            res.image("x")


def test_inline_gallery(tmp_path):
    root = str(tmp_path)
    recs, imgs = shard([f"i{n}" for n in range(6)], prompt="<script>alert('{id}')</script>",
                       errors={"bad": "mask: <b>missing</b>"})
    write_shard(OutputSpec(root, "parquet", "jpeg"), "s0", recs, imgs)
    g = open_results(root).gallery(max_images=4)
    page = g._repr_html_()
    assert len(re.findall(r"<img\b", page)) == 4
    assert page.count('src="data:image/jpeg;base64,') == 4
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;i0&#x27;)&lt;/script&gt;" in page
    assert "seed 7" in page
    assert "body{" not in page  # the notebook's styles are left alone
