"""Writer round trips for every format and encoding, the commit protocol, memory:// and a local S3 server."""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tarfile
import uuid

import numpy as np
import pytest
from PIL import Image

from kbatch import storage
from kbatch.output.results import open_results
from kbatch.schema.records import RECORD_FIELDS, record_key
from kbatch.run.status import summarize
from kbatch.output.writer import (OutputSpec, ShardStats, encode_image, list_committed_shards, read_records,
                           write_shard)

FORMATS = ["files", "webdataset", "parquet"]
IMAGE_FORMATS = ["png", "jpeg", "webp"]


def make_shard(ids=("r0", "a.b-1", "r2"), num_images=(1, 2, 1), errors=None, size=(32, 48), seed=0):
    """Records + images as the runner passes them: ok records with arrays, error records with None."""
    rng = np.random.default_rng(seed)
    records, images = [], []
    for rid, n in zip(ids, num_images):
        for k in range(n):
            records.append({"id": rid, "image_index": k, "status": "ok", "error": None, "mode": "text2img",
                            "prompt": f"a photo of {rid}", "seed": 2**62 + k, "num_images": n,
                            "height": size[0], "width": size[1], "num_inference_steps": 5,
                            "guidance_scale": 4.0, "key": record_key(rid, k), "run_id": "run-1"})
            images.append(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8))
    for rid, reason in (errors or {}).items():
        records.append({"id": rid, "image_index": -1, "status": "error", "error": reason, "prompt": "x"})
        images.append(None)
    return records, images


def all_files(root):
    out = []
    for dp, _, fns in os.walk(root):
        out += [os.path.relpath(os.path.join(dp, f), root) for f in fns]
    return sorted(out)


def commit_of(root, shard="shard-00000"):
    """The commit record of ``shard`` (it names the write attempt whose objects readers trust)."""
    with open(os.path.join(root, "_commits", f"{shard}.json")) as fh:
        return json.load(fh)


def _close(a, b, lossless):
    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert a.shape == b.shape
    if lossless:
        assert np.array_equal(a, b)
    else:
        assert np.abs(a - b).mean() < 10


def smooth_image(h, w, seed=0):
    """Lossy codecs on pure noise are far off; a smooth image with a little noise is a fair check."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("image_format", IMAGE_FORMATS)
def test_round_trip(tmp_path, fmt, image_format):
    root = str(tmp_path / "out")
    records, images = make_shard(errors={"bad": "height: 65 is not a multiple of 64"})
    lossless = image_format == "png"
    if not lossless:
        images = [None if im is None else smooth_image(*im.shape[:2], seed=i) for i, im in enumerate(images)]
    stats = write_shard(OutputSpec(root, fmt, image_format, quality=90), "shard-00000", records, images)
    assert isinstance(stats, ShardStats)
    assert (stats.rows, stats.images, stats.errors) == (4, 4, 1)
    assert stats.errors_by_reason == {"height": 1}
    assert list_committed_shards(root) == ["shard-00000"]

    res = open_results(root)
    assert list(res.df.columns) == list(RECORD_FIELDS)
    assert len(res) == 5 and res.n_images == 4 and res.n_errors == 1
    ok = res.df[res.df.status == "ok"]
    assert sorted(zip(ok.id, ok.image_index)) == [("a.b-1", 0), ("a.b-1", 1), ("r0", 0), ("r2", 0)]
    assert set(ok.image_format) == {image_format} and set(res.df.shard) == {"shard-00000"}
    assert int(ok[ok.id == "r0"].seed.iloc[0]) == 2**62  # 63-bit seeds stay exact
    for rec, img in zip(records, images):
        if img is None:
            continue
        got = res.image(rec["id"], rec["image_index"])
        assert isinstance(got, Image.Image) and got.size == (img.shape[1], img.shape[0])
        _close(got.convert("RGB"), img, lossless)
        row = res.df[(res.df.id == rec["id"]) & (res.df.image_index == rec["image_index"])].iloc[0]
        data = res.image_bytes(rec["id"], rec["image_index"])
        assert hashlib.sha256(data).hexdigest() == row.sha256
        assert row.key == record_key(rec["id"], rec["image_index"]) and "." not in row.key
        if fmt == "files":
            ext = {"png": "png", "jpeg": "jpg", "webp": "webp"}[image_format]
            assert row.path == f"images/shard-00000~{commit_of(root)['attempt']}/{row.key}.{ext}"
            with open(os.path.join(root, row.path), "rb") as fh:
                assert hashlib.sha256(fh.read()).hexdigest() == row.sha256
    commit = commit_of(root)
    stem = f"shard-00000~{commit['attempt']}"  # the attempt's own names; the commit record names them
    expected = {"files": f"images/{stem}/", "webdataset": f"tars/{stem}.tar",
                "parquet": f"data/{stem}.parquet"}[fmt]
    files = all_files(root)
    assert any(f.startswith(expected) for f in files)
    assert {f"meta/{stem}.parquet", f"stats/{stem}.json", "_commits/shard-00000.json"} <= set(files)
    assert not any(storage.TMP_MARK in f for f in files)
    assert commit["shard"] == "shard-00000" and commit["rows"] == 4 and commit["images"] == 4
    assert commit["errors"] == 1 and "time" in commit and commit["meta"] == f"meta/{stem}.parquet"
    assert all(os.path.exists(os.path.join(root, f)) for f in commit["files"])
    stats_json = json.load(open(os.path.join(root, f"stats/{stem}.json")))
    assert stats_json["images"] == 4 and stats_json["bytes"] > 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_error_records(tmp_path, fmt):
    root = str(tmp_path)
    records, images = make_shard(ids=("ok1",), num_images=(1,),
                                 errors={"bad.row": "prompt: empty string ''", "b2": "no colon here"})
    write_shard(OutputSpec(root, fmt, "png"), "s0", records, images)
    res = open_results(root)
    err = res.df[res.df.status == "error"].sort_values("id")
    assert list(err.id) == ["b2", "bad.row"]
    assert list(err.image_index) == [-1, -1]
    assert list(err.error) == ["no colon here", "prompt: empty string ''"]
    assert err.sha256.isna().all() and err.path.isna().all()
    for rid in ("bad.row", "b2"):
        with pytest.raises(KeyError, match=rid.replace(".", r"\.")):
            res.image(rid, 0)
        with pytest.raises(KeyError, match="-1"):
            res.image(rid, -1)
    with pytest.raises(KeyError, match=r"id='nope' image_index=0"):
        res.image("nope")
    with pytest.raises(KeyError, match=r"image_index=3"):
        res.image("ok1", 3)


def test_webdataset_members(tmp_path):
    root = str(tmp_path)
    records, images = make_shard(ids=("a.b-1", "x_y.z"), num_images=(2, 1))
    write_shard(OutputSpec(root, "webdataset", "png"), "wds-0", records, images)
    stem = f"wds-0~{commit_of(root, 'wds-0')['attempt']}"
    with tarfile.open(os.path.join(root, "tars", f"{stem}.tar")) as tar:
        names = tar.getnames()
        assert names == ["a~b-1__0.png", "a~b-1__0.json", "a~b-1__1.png", "a~b-1__1.json",
                         "x_y~z__0.png", "x_y~z__0.json"]
        for n in names:
            assert "." not in n.rsplit(".", 1)[0]  # webdataset: key = name up to the first dot
        meta = json.loads(tar.extractfile("a~b-1__1.json").read())
        png = tar.extractfile("a~b-1__1.png").read()
    assert meta["id"] == "a.b-1" and meta["image_index"] == 1 and meta["seed"] == 2**62 + 1
    assert meta["sha256"] == hashlib.sha256(png).hexdigest()
    assert meta["path"] == f"tars/{stem}.tar#a~b-1__1.png"
    assert set(meta) == set(RECORD_FIELDS)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), images[1])


def test_webdataset_long_ids(tmp_path):
    root = str(tmp_path)
    long_id = "L" + "x.y-z_" * 21 + "q"  # 128 characters, the longest id the manifest allows
    records, images = make_shard(ids=(long_id,), num_images=(1,))
    write_shard(OutputSpec(root, "webdataset", "webp", quality=100), "s0", records, images)
    with tarfile.open(os.path.join(root, "tars", f"s0~{commit_of(root, 's0')['attempt']}.tar")) as tar:
        assert tar.getnames() == [f"{record_key(long_id, 0)}.webp", f"{record_key(long_id, 0)}.json"]
    np.testing.assert_array_equal(np.asarray(open_results(root).image(long_id).convert("RGB")), images[0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_injected_failure_is_invisible(tmp_path, fmt):
    root = str(tmp_path)
    records, images = make_shard()
    write_shard(OutputSpec(root, fmt, "png"), "s-good", *make_shard(ids=("g",), num_images=(1,)))
    with pytest.raises(RuntimeError, match="injected write failure"):
        write_shard(OutputSpec(root, fmt, "png", fail_after_data=True), "s-bad", records, images)
    assert not os.path.exists(os.path.join(root, "_commits", "s-bad.json"))
    assert list_committed_shards(root) == ["s-good"]
    assert set(read_records(root).id) == {"g"}
    assert set(open_results(root).df.shard) == {"s-good"}
    with pytest.raises(KeyError):
        open_results(root).image("r0")
    s = summarize(root)
    assert s["uncommitted_shards"] == 1 and s["shards"] == 1 and s["rows_done"] == 1
    assert not any(storage.TMP_MARK in f for f in all_files(root))
    # the retry of the same shard commits it
    write_shard(OutputSpec(root, fmt, "png"), "s-bad", *make_shard())
    assert list_committed_shards(root) == ["s-bad", "s-good"]
    assert summarize(root)["uncommitted_shards"] == 0
    assert open_results(root).image("a.b-1", 1).size == (48, 32)


def test_rewrite_and_no_partial_files(tmp_path, monkeypatch):
    root = str(tmp_path)
    one = write_shard(OutputSpec(root, "files", "png"), "s0", *make_shard(seed=1))
    first = open_results(root).image_bytes("r0")
    # one shard, one commit: writing a committed shard again writes nothing and answers with its stats
    two = write_shard(OutputSpec(root, "files", "png"), "s0", *make_shard(seed=2))
    res = open_results(root)
    assert len(res) == 4 and res.image_bytes("r0") == first
    assert two.attempt == one.attempt and (two.rows, two.images) == (one.rows, one.images)
    assert len(os.listdir(os.path.join(root, "meta"))) == 1
    # a failing rename leaves neither the final name nor the temp file behind
    fs, base = storage.get_fs(root)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes_atomic(fs, storage.join(base, "x", "y.bin"), b"data")
    assert os.listdir(os.path.join(root, "x")) == []


def test_input_validation(tmp_path):
    root = str(tmp_path)
    records, images = make_shard()
    with pytest.raises(ValueError, match="shard"):
        write_shard(OutputSpec(root, "files", "png"), "../escape", records, images)
    with pytest.raises(ValueError, match="images"):
        write_shard(OutputSpec(root, "files", "png"), "s0", records, images[:-1])
    with pytest.raises(ValueError, match="duplicate"):
        write_shard(OutputSpec(root, "files", "png"), "s0", records + records[:1], images + images[:1])
    with pytest.raises(ValueError, match="no image"):
        write_shard(OutputSpec(root, "files", "png"), "s0", records[:1], [None])
    with pytest.raises(ValueError, match="format"):
        OutputSpec(root, "zip", "png")
    with pytest.raises(ValueError, match="image_format"):
        OutputSpec(root, "files", "gif")
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((4, 4, 3), np.float32), "png", 95)
    assert list_committed_shards(root) == []


def test_key_filled_in_and_missing_fields(tmp_path):
    root = str(tmp_path)
    rec = {"id": "only.id", "image_index": 0}
    img = np.zeros((8, 8, 3), np.uint8)
    write_shard(OutputSpec(root, "parquet", "png"), "s0", [rec], [img])
    assert rec["key"] == "only~id__0" and rec["status"] == "ok" and rec["shard"] == "s0"
    df = read_records(root)
    assert df.prompt.isna().all() and df.seed.isna().all() and list(df.key) == ["only~id__0"]
    assert list(read_records(root, columns=["id", "status"]).columns) == ["id", "status"]


def test_read_records_empty(tmp_path):
    df = read_records(str(tmp_path / "nothing"))
    assert len(df) == 0 and list(df.columns) == list(RECORD_FIELDS)


def test_encode_image_quality():
    img = smooth_image(64, 64)
    png = encode_image(img, "png", 95)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), img)
    assert Image.open(io.BytesIO(encode_image(img, "jpeg", 90))).format == "JPEG"
    assert len(encode_image(img, "jpeg", 30)) < len(encode_image(img, "jpeg", 95))
    assert Image.open(io.BytesIO(encode_image(img, "webp", 80))).format == "WEBP"
    lossless = np.asarray(Image.open(io.BytesIO(encode_image(img, "webp", 100))).convert("RGB"))
    np.testing.assert_array_equal(lossless, img)  # webp at quality 100 is lossless


@pytest.mark.parametrize("fmt", FORMATS)
def test_memory_filesystem(fmt):
    import fsspec

    root = f"memory://kbatch-test-{uuid.uuid4().hex}/out"
    try:
        records, images = make_shard(errors={"e1": "mask: not found"})
        write_shard(OutputSpec(root, fmt, "png"), "m0", records, images)
        with pytest.raises(RuntimeError):
            write_shard(OutputSpec(root, fmt, "png", fail_after_data=True), "m1", *make_shard(ids=("z",),
                                                                                                num_images=(1,)))
        storage.write_json_atomic(root, "_job.json", {"total_rows": 5, "run_id": "r"})
        assert storage.read_json(root, "_job.json")["total_rows"] == 5
        assert storage.read_json(root, "missing.json") is None
        res = open_results(root)
        assert res.job["run_id"] == "r" and len(res) == 5
        np.testing.assert_array_equal(np.asarray(res.image("a.b-1", 1)), images[2])
        s = summarize(root)
        assert (s["rows_done"], s["rows_ok"], s["rows_failed"], s["rows_missing"]) == (4, 3, 1, 1)
        assert s["uncommitted_shards"] == 1 and s["complete"] is False
        storage.remove(root, "_job.json")
        storage.remove(root, "_job.json")  # missing: no error
        assert not storage.exists(root, "_job.json")
    finally:
        fs, base = storage.get_fs(root)
        top = base.rsplit("/out", 1)[0]
        if fs.exists(top):
            fs.rm(top, recursive=True)
        assert not fsspec.filesystem("memory").exists(base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_moto_server(monkeypatch):
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    import s3fs

    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # botocore (and so s3fs) read it from the env
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("kbatch-test")
        root = "s3://kbatch-test/renders/run1"
        records, images = make_shard(errors={"e": "init_image: too large"})
        for fmt in FORMATS:
            write_shard(OutputSpec(f"{root}-{fmt}", fmt, "png"), "s0", records, images)
            res = open_results(f"{root}-{fmt}")
            assert len(res) == 5 and res.n_images == 4
            np.testing.assert_array_equal(np.asarray(res.image("a.b-1", 1)), images[2])
            assert "e" in set(res.df[res.df.status == "error"].id)
        assert fs.exists("kbatch-test/renders/run1-files/_commits/s0.json")
        attempt = json.loads(fs.cat_file("kbatch-test/renders/run1-files/_commits/s0.json"))["attempt"]
        assert fs.exists(f"kbatch-test/renders/run1-files/images/s0~{attempt}/r0__0.png")
        # explicit storage options work too (no env endpoint)
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        s3fs.S3FileSystem.clear_instance_cache()
        opts = {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"}
        spec = OutputSpec(f"{root}-opts", "webdataset", "png", storage_options=opts)
        write_shard(spec, "s1", records, images)
        res = open_results(f"{root}-opts", storage_options=opts)
        np.testing.assert_array_equal(np.asarray(res.image("r2")), images[3])
        assert summarize(f"{root}-opts", storage_options=opts)["rows_done"] == 4
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_local_commit_after_its_folders_are_durable(tmp_path, monkeypatch):
    """On a local disk a shard's folders are fsynced before its commit record is created: a power cut never
    leaves a durable commit naming files whose names were lost (docs/output.md)."""
    import kbatch.output.commits as commits_mod
    import kbatch.storage.local_store as local_store

    events = []
    real_fsync_dir, real_create = local_store.fsync_dir, commits_mod.create
    monkeypatch.setattr(local_store, "fsync_dir", lambda folder: (events.append(("sync", folder)),
                                                                  real_fsync_dir(folder))[1])
    monkeypatch.setattr(commits_mod, "create", lambda *a, **k: (events.append(("commit", a[1])),
                                                                real_create(*a, **k))[1])
    root = str(tmp_path / "out")
    write_shard(OutputSpec(root, "files", "png"), "s0", *make_shard())
    rec = commit_of(root, "s0")
    first_commit = events.index(("commit", "s0"))
    synced = {os.path.normpath(f) for k, f in events[:first_commit] if k == "sync"}
    named = {os.path.normpath(os.path.dirname(os.path.join(root, f))) for f in rec["files"]}
    assert named and named <= synced, (named, synced)
