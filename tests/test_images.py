"""kbatch.plan.input_images: URI resolution under allowed roots/protocols and size-checked image decoding."""
from __future__ import annotations

import io
import os
import pickle
import struct
import time
import uuid
import zlib

import fsspec
import numpy as np
import pytest
from PIL import Image

from kbatch.config import LimitsConfig
from kbatch.plan.input_images import InputError, load_image, load_row_inputs, resolve_uri
from kbatch.schema.rows import MixItem, Row


def png_bytes(size=(64, 64), color=(200, 30, 30), mode="RGB", noise=False) -> bytes:
    if noise:
        arr = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        im = Image.fromarray(arr, "RGB")
    else:
        im = Image.new(mode, size, color if mode == "RGB" else 255)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (1-bit gray): a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


@pytest.fixture
def limits():
    return LimitsConfig()


def _err(fn, *a, **kw) -> InputError:
    with pytest.raises(InputError) as ei:
        fn(*a, **kw)
    return ei.value


# ---------------------------------------------------------------------------------------------------------
# load_image


def test_png_bytes_ok(limits):
    im = load_image(png_bytes((64, 48)), field="init_image", limits=limits)
    assert im.size == (64, 48) and im.mode == "RGB"
    assert im.getpixel((0, 0)) == (200, 30, 30)
    mask = load_image(png_bytes((64, 48)), field="mask", limits=limits, mode="L")
    assert mask.mode == "L"


def test_rgba_and_palette_are_converted(limits):
    for mode in ("RGBA", "P", "L"):
        buf = io.BytesIO()
        Image.new(mode, (8, 8)).save(buf, "PNG")
        assert load_image(buf.getvalue(), field="init_image", limits=limits).mode == "RGB"


def test_corrupt_bytes(limits):
    e = _err(load_image, b"this is not an image at all", field="init_image", limits=limits)
    assert str(e).startswith("init_image: ")
    assert "<27 bytes>" in str(e) and "not a readable image" in str(e)
    assert e.field == "init_image"


def test_empty_bytes(limits):
    assert "empty" in str(_err(load_image, b"", field="mask", limits=limits))


def test_truncated_png(limits):
    data = png_bytes((128, 128), noise=True)
    cut = data[: len(data) // 2]
    e = _err(load_image, cut, field="init_image", limits=limits)
    assert "init_image" in str(e) and f"<{len(cut)} bytes>" in str(e)
    assert "truncated" in str(e) or "corrupt" in str(e)


def test_decompression_bomb_rejected_from_header(limits):
    bomb = png_header_only(20000, 20000)
    assert len(bomb) < 200
    before = Image.MAX_IMAGE_PIXELS
    t0 = time.perf_counter()
    e = _err(load_image, bomb, field="init_image", limits=limits)
    assert time.perf_counter() - t0 < 1.0
    assert "20000x20000" in str(e) and "limits.max_image_pixels" in str(e)
    assert Image.MAX_IMAGE_PIXELS == before  # the global is neither relied on nor changed


def test_pixel_limit_is_ours_not_pillows(limits, monkeypatch):
    # Pillow's global check disabled: our limit still applies, from the header.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    small = LimitsConfig(max_image_pixels=1000 * 1000)
    e = _err(load_image, png_header_only(2000, 2000), field="mask", limits=small, mode="L")
    assert "2000x2000" in str(e) and "1000000" in str(e)
    # and an image within our limit loads even if Pillow's global is tiny
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert load_image(png_bytes((64, 64)), field="init_image", limits=limits).size == (64, 64)


def test_too_many_bytes_inline_file_and_memory(limits, tmp_path):
    tight = LimitsConfig(max_image_bytes=100)
    data = png_bytes((64, 64), noise=True)
    assert len(data) > 100
    e = _err(load_image, data, field="init_image", limits=tight)
    assert "too large" in str(e) and "limits.max_image_bytes" in str(e)
    p = tmp_path / "big.png"
    p.write_bytes(data)
    e = _err(load_image, str(p), field="init_image", limits=tight)
    assert repr(str(p)) in str(e) and "bytes" in str(e)
    uri = f"memory://kbatch-test-{uuid.uuid4().hex}/big.png"
    with fsspec.open(uri, "wb") as fh:
        fh.write(data)
    e = _err(load_image, uri, field="init_image", limits=tight)
    assert "too large" in str(e)
    assert load_image(uri, field="init_image", limits=limits).size == (64, 64)


def test_missing_file(limits, tmp_path):
    missing = str(tmp_path / "nope.png")
    e = _err(load_image, missing, field="init_image", limits=limits)
    assert str(e) == f"init_image: image {missing!r} not found"
    e = _err(load_image, f"memory://kbatch-test-{uuid.uuid4().hex}/nope.png", field="mask", limits=limits)
    assert "not found" in str(e)


def test_directory_and_fifo_rejected(limits, tmp_path):
    assert "directory" in str(_err(load_image, str(tmp_path), field="init_image", limits=limits))
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    assert "not a regular file" in str(_err(load_image, str(fifo), field="init_image", limits=limits))
    assert time.perf_counter() - t0 < 1.0


def test_disallowed_format_rejected(limits):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PCX")
    assert "not a readable image" in str(_err(load_image, buf.getvalue(), field="init_image", limits=limits))


def test_load_image_checks_protocol(limits):
    e = _err(load_image, "http://example.com/x.png", field="init_image", limits=limits)
    assert "'http'" in str(e)


def test_input_error_pickles():
    e = InputError("mask", "x.png", "image 'x.png' not found")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.field, e2.value, e2.message, str(e2)) == ("mask", "x.png", "image 'x.png' not found",
                                                         "mask: image 'x.png' not found")
    assert isinstance(e2, ValueError)


# ---------------------------------------------------------------------------------------------------------
# load_row_inputs


def test_load_row_inputs(limits, tmp_path):
    uri = tmp_path / "a.png"
    uri.write_bytes(png_bytes((64, 64)))
    row = Row(id="r", prompt="p", mode="inpaint", init_image=str(uri), mask=png_bytes((64, 64), mode="L"))
    out = load_row_inputs(row, limits)
    assert out["init_image"].size == (64, 64) and out["init_image"].mode == "RGB"
    assert out["mask"].mode == "L" and out["mix_images"] == []
    row = Row(id="r", prompt="", mode="interpolate",
              mix=[MixItem(0.5, prompt="cat"), MixItem(0.5, image=png_bytes((32, 32))),
                   MixItem(1.0, image_uri=str(uri))])
    out = load_row_inputs(row, limits)
    assert out["init_image"] is None and out["mask"] is None
    assert out["mix_images"][0] is None and out["mix_images"][1].size == (32, 32)
    assert out["mix_images"][2].mode == "RGB"


def test_mask_wrong_size(limits):
    row = Row(id="r", prompt="p", mode="inpaint", init_image=png_bytes((64, 64)),
              mask=png_bytes((32, 32), mode="L"))
    e = _err(load_row_inputs, row, limits)
    assert str(e) == "mask: size 32x32 differs from init_image size 64x64"
    assert e.field == "mask"


def test_mix_image_error_names_item(limits):
    row = Row(id="r", prompt="", mode="interpolate", mix=[MixItem(1.0, prompt="a"), MixItem(1.0, image=b"junk")])
    assert str(_err(load_row_inputs, row, limits)).startswith("mix[1].image: ")


# ---------------------------------------------------------------------------------------------------------
# resolve_uri


def test_resolve_relative_and_absolute(limits, tmp_path):
    base = str(tmp_path)
    (tmp_path / "img").mkdir()
    assert resolve_uri("img/a.png", base, limits) == os.path.join(os.path.realpath(base), "img", "a.png")
    assert resolve_uri("./img/../img/a.png", base, limits) == os.path.join(os.path.realpath(base), "img", "a.png")
    absolute = os.path.join(base, "img", "a.png")
    assert resolve_uri(absolute, base, limits) == os.path.realpath(absolute)
    assert resolve_uri("file://" + absolute, base, limits) == os.path.realpath(absolute)


def test_resolve_outside_base(limits, tmp_path):
    base = tmp_path / "prompts"
    base.mkdir()
    e = _err(resolve_uri, "../../etc/passwd", str(base), limits, field="init_image")
    assert str(e).startswith("init_image: URI '../../etc/passwd' resolves to")
    assert "outside the allowed roots" in str(e)
    for bad in ("/etc/passwd", "file:///etc/passwd", "../prompts2/x.png"):
        assert "outside the allowed roots" in str(_err(resolve_uri, bad, str(base), limits))


def test_resolve_protocols(limits, tmp_path):
    for uri, proto in (("http://example.com/x.png", "http"), ("https://example.com/x.png", "https"),
                       ("ftp://h/x.png", "ftp"), ("HTTP://example.com/x.png", "http")):
        e = _err(resolve_uri, uri, str(tmp_path), limits, field="mask")
        assert f"uses protocol {proto!r}" in str(e) and "allowed:" in str(e) and str(e).startswith("mask: ")
    for bad in ("simplecache::s3://b/x.png", "", "x\x00.png", "a/b://c.png"):
        _err(resolve_uri, bad, str(tmp_path), limits)
    # allowed once configured
    lim = LimitsConfig(allowed_protocols=["https"], allowed_roots=["https://cdn.example.com/imgs"])
    assert resolve_uri("https://cdn.example.com/imgs/a/../b.png", "/x", lim) == "https://cdn.example.com/imgs/b.png"
    assert "outside" in str(_err(resolve_uri, "https://cdn.example.com/imgs2/b.png", "/x", lim))


def test_resolve_remote_roots(limits):
    base = "s3://bucket/prompts"
    assert resolve_uri("img/a.png", base, limits) == "s3://bucket/prompts/img/a.png"
    assert resolve_uri("s3://bucket/prompts/x.png", base, limits) == "s3://bucket/prompts/x.png"
    for bad in ("../secret.png", "s3://bucket/prompts/../secret.png", "s3://bucket/prompts2/x.png",
                "s3://other/prompts/x.png", "gs://bucket/prompts/x.png", "/etc/passwd"):
        assert "outside the allowed roots" in str(_err(resolve_uri, bad, base, limits)), bad
    lim = LimitsConfig(allowed_roots=["s3://bucket/prompts", "gs://team/imgs"])
    assert resolve_uri("gcs://team/imgs/x.png", base, lim) == "gcs://team/imgs/x.png"
    # memory:// with and without the leading slash name the same place
    assert resolve_uri("a.png", "memory:///prompts", limits) == "memory://prompts/a.png"
    assert resolve_uri("memory://prompts/b.png", "memory:///prompts", limits) == "memory://prompts/b.png"


def test_resolve_explicit_roots(tmp_path):
    base, other = tmp_path / "m", tmp_path / "common"
    base.mkdir()
    other.mkdir()
    lim = LimitsConfig(allowed_roots=[str(other)])
    assert resolve_uri(str(other / "a.png"), str(base), lim) == os.path.realpath(other / "a.png")
    # roots replace the default: the manifest folder is no longer allowed unless listed
    assert "outside" in str(_err(resolve_uri, "a.png", str(base), lim))
    assert resolve_uri("../common/a.png", str(base), lim) == os.path.realpath(other / "a.png")


def test_symlink_escaping_root_rejected(limits, tmp_path):
    base, secret = tmp_path / "prompts", tmp_path / "secret"
    base.mkdir()
    secret.mkdir()
    (secret / "x.png").write_bytes(png_bytes())
    (base / "link.png").symlink_to(secret / "x.png")
    (base / "dirlink").symlink_to(secret, target_is_directory=True)
    (base / "inside.png").write_bytes(png_bytes())
    (base / "ok_link.png").symlink_to(base / "inside.png")
    for uri in ("link.png", "dirlink/x.png", str(base / "link.png")):
        e = _err(resolve_uri, uri, str(base), limits, field="init_image")
        assert "outside the allowed roots" in str(e), uri
    assert resolve_uri("ok_link.png", str(base), limits) == os.path.realpath(base / "inside.png")
