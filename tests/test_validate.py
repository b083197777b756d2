"""kbatch.plan.validate: one Row or exactly one RowError per manifest row; defaults; seeds; messages."""
from __future__ import annotations

import dataclasses
import io
import math
import os

import pyarrow as pa
import pytest
from PIL import Image

from kbatch.config import Defaults, JobConfig, LimitsConfig
from kbatch.schema.rows import ID_RE, MANIFEST_COLUMNS, Row, derive_seed
from kbatch.plan.validate import (RowError, check_params, format_problems, validate_images, validate_manifest,
                             validate_table)

NAN, INF = float("nan"), float("inf")


def png(size=(64, 64), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (10, 20, 30) if mode == "RGB" else 255).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def base(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png((64, 64)))
    (tmp_path / "img" / "m.png").write_bytes(png((64, 64), "L"))
    (tmp_path / "img" / "small_mask.png").write_bytes(png((32, 32), "L"))
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return str(tmp_path)


def schema(**override):
    fields = []
    for name, t in MANIFEST_COLUMNS.items():
        t = override.get(name, t)
        fields.append((name, t if t is not None else pa.string()))
    return pa.schema(fields)


# (row, expected error field or None). Columns left out are null.
GOOD = [
    {"id": "g1", "prompt": "a red fox"},
    {"id": "g2", "prompt": "a blue fox", "negative_prompt": "blurry", "height": 768, "width": 512,
     "num_inference_steps": 30.0, "guidance_scale": 0.0, "seed": 42, "num_images": 2},
    {"id": "g3.img2img", "prompt": "oil painting", "mode": "img2img", "init_image": "img/a.png", "strength": 0.5},
    {"id": "g4_inpaint", "prompt": "a hat", "mode": "inpaint", "init_image": "img/a.png", "mask": "./img/m.png"},
    {"id": "g5-mix", "prompt": "", "mode": "interpolate",
     "mix": [{"prompt": "a cat", "weight": 0.3}, {"image_uri": "img/a.png", "weight": 0.7}]},
    {"id": "G6", "prompt": "x", "mode": "img2img", "init_image": "ABS", "strength": 1.0},
    {"id": "g7", "prompt": "text with ignored inputs", "mode": "text2img", "init_image": "http://ignored/x.png",
     "mix": []},
]
BAD = [
    ({"id": "b_nullprompt", "prompt": None}, "prompt", "None"),
    ({"id": "b_emptyprompt", "prompt": "   "}, "prompt", "'   '"),
    ({"id": "b_mode", "prompt": "p", "mode": "sketch"}, "mode", "'sketch'"),
    ({"id": "b_s0", "prompt": "p", "mode": "img2img", "init_image": "img/a.png", "strength": 0.0}, "strength", "0.0"),
    ({"id": "b_s15", "prompt": "p", "mode": "img2img", "init_image": "img/a.png", "strength": 1.5}, "strength",
     "1.5"),
    ({"id": "b_snan", "prompt": "p", "mode": "img2img", "init_image": "img/a.png", "strength": NAN}, "strength",
     "nan"),
    ({"id": "b_steps0", "prompt": "p", "num_inference_steps": 0.0}, "num_inference_steps", "0"),
    ({"id": "b_stepsnan", "prompt": "p", "num_inference_steps": NAN}, "num_inference_steps", "nan"),
    ({"id": "b_stepsfrac", "prompt": "p", "num_inference_steps": 2.5}, "num_inference_steps", "2.5"),
    ({"id": "b_psteps", "prompt": "p", "prior_num_inference_steps": 5000}, "prior_num_inference_steps", "5000"),
    ({"id": "b_gnan", "prompt": "p", "guidance_scale": NAN}, "guidance_scale", "nan"),
    ({"id": "b_ginf", "prompt": "p", "prior_guidance_scale": INF}, "prior_guidance_scale", "inf"),
    ({"id": "b_gneg", "prompt": "p", "guidance_scale": -1.0}, "guidance_scale", "-1.0"),
    ({"id": "b_h500", "prompt": "p", "height": 500}, "height", "500"),
    ({"id": "b_w32", "prompt": "p", "width": 32}, "width", "32"),
    ({"id": "b_big", "prompt": "p", "height": 2048, "width": 2048}, "height", "2048"),
    ({"id": "b_numimg", "prompt": "p", "num_images": 17}, "num_images", "17"),
    ({"id": "b_numimg0", "prompt": "p", "num_images": 0}, "num_images", "0"),
    ({"id": "b_seed", "prompt": "p", "seed": -1}, "seed", "-1"),
    ({"id": "g1", "prompt": "duplicate"}, "id", "'g1'"),
    ({"id": "../evil", "prompt": "p"}, "id", "'../evil'"),
    ({"id": "a/b", "prompt": "p"}, "id", "'a/b'"),
    ({"id": "", "prompt": "p"}, "id", "''"),
    ({"id": ".hidden", "prompt": "p"}, "id", "'.hidden'"),
    ({"id": "x" * 200, "prompt": "p"}, "id", "'xxxxxxxx"),
    ({"id": None, "prompt": "p"}, "id", "None"),
    ({"id": "abc\n", "prompt": "p"}, "id", "'abc\\n'"),
    ({"id": "b_noinit", "prompt": "p", "mode": "img2img"}, "init_image", "None"),
    ({"id": "b_nomask", "prompt": "p", "mode": "inpaint", "init_image": "img/a.png"}, "mask", "None"),
    ({"id": "b_noinit_inpaint", "prompt": "p", "mode": "inpaint", "mask": "img/m.png"}, "init_image", "None"),
    ({"id": "b_emptymix", "prompt": "p", "mode": "interpolate", "mix": []}, "mix", "[]"),
    ({"id": "b_nullmix", "prompt": "p", "mode": "interpolate"}, "mix", "None"),
    ({"id": "b_mixboth", "prompt": "p", "mode": "interpolate",
      "mix": [{"prompt": "a", "weight": 1.0}, {"prompt": "b", "image_uri": "img/a.png", "weight": 1.0}]},
     "mix[1]", "'image_uri'"),
    ({"id": "b_mixnone", "prompt": "p", "mode": "interpolate", "mix": [{"weight": 1.0}]}, "mix[0]", "{}"),
    ({"id": "b_mixw", "prompt": "p", "mode": "interpolate", "mix": [{"prompt": "a", "weight": NAN}]},
     "mix[0].weight", "nan"),
    ({"id": "b_mixnullw", "prompt": "p", "mode": "interpolate", "mix": [{"prompt": "a"}]}, "mix[0].weight", "None"),
    ({"id": "b_mixuri", "prompt": "p", "mode": "interpolate",
      "mix": [{"image_uri": "../../etc/passwd", "weight": 1.0}]}, "mix[0].image_uri", "'../../etc/passwd'"),
    ({"id": "b_toomany", "prompt": "p", "mode": "interpolate",
      "mix": [{"prompt": str(i), "weight": 1.0} for i in range(17)]}, "mix", "got 17 items"),
    ({"id": "b_outside", "prompt": "p", "mode": "img2img", "init_image": "../../etc/passwd"}, "init_image",
     "'../../etc/passwd'"),
    ({"id": "b_abs_outside", "prompt": "p", "mode": "img2img", "init_image": "/etc/passwd"}, "init_image",
     "'/etc/passwd'"),
    ({"id": "b_http", "prompt": "p", "mode": "img2img", "init_image": "http://example.com/x.png"}, "init_image",
     "'http://example.com/x.png'"),
    ({"id": "b_mask_http", "prompt": "p", "mode": "inpaint", "init_image": "img/a.png",
      "mask": "https://example.com/m.png"}, "mask", "'https'"),
    ({"id": "b_multi", "prompt": "p", "height": 500, "guidance_scale": NAN}, "height", "500"),
]


def build_table(rows, base, **schema_override):
    out = []
    for r in rows:
        r = dict(r)
        if r.get("init_image") == "ABS":
            r["init_image"] = os.path.join(base, "img", "a.png")
        out.append(r)
    return pa.Table.from_pylist(out, schema=schema(**schema_override))


@pytest.fixture
def cfg():
    c = JobConfig()
    c.seed = 7
    return c


@pytest.fixture
def mixed(base):
    rows = GOOD + [r for r, _, _ in BAD]
    return build_table(rows, base, num_inference_steps=pa.float64()), rows


def test_mixed_table_one_outcome_per_row(mixed, cfg, base):
    table, rows = mixed
    valid, errors = validate_table(table, cfg, base)
    assert len(valid) == len(GOOD)
    assert [r.id for r in valid] == [r["id"] for r in GOOD]
    assert len(errors) == len(BAD)
    by_index = {e.index: e for e in errors}
    assert len(by_index) == len(errors)  # exactly one error per bad row
    for k, (row, field, shown) in enumerate(BAD):
        index = len(GOOD) + k
        e = by_index[index]
        assert isinstance(e, RowError)
        assert e.field == field, (row["id"], e)
        assert e.message.startswith(f"{field}: " if not field.startswith("mix[") else "mix["), e.message
        assert shown in e.message, (shown, e.message)
        if field == "id" or row["id"] is None:
            assert e.id == f"_row{index}"
            assert not ID_RE.fullmatch(e.id)
        else:
            assert e.id == row["id"]


def test_messages(mixed, cfg, base):
    table, _ = mixed
    _, errors = validate_table(table, cfg, base)
    msg = {e.id: e.message for e in errors}
    assert msg["b_h500"] == "height: must be a multiple of 64, got 500"
    assert msg["b_s15"] == "strength: must be a number in (0, 1], got 1.5"
    assert msg["b_gnan"] == "guidance_scale: must be a finite number >= 0, got nan"
    assert msg["b_stepsnan"] == "num_inference_steps: must be an integer in [1, 1000], got nan"
    assert msg["b_steps0"] == "num_inference_steps: must be in [1, 1000] (limits.max_steps), got 0.0"
    assert "height*width" in msg["b_big"] and "1048576" in msg["b_big"]
    assert msg["b_noinit"] == "init_image: is required for mode 'img2img', got None"
    assert "uses protocol 'http'" in msg["b_http"]
    assert "outside the allowed roots" in msg["b_outside"]
    assert msg["b_multi"].startswith("height: must be a multiple of 64, got 500; guidance_scale: ")
    dup = [e for e in errors if e.field == "id" and e.value == "g1"][0]
    assert dup.message == "id: duplicate id 'g1' (first at row 0)"
    long_id = [e for e in errors if e.field == "id" and isinstance(e.value, str) and len(e.value) == 200][0]
    assert len(long_id.message) < 400  # long values are shortened in messages


def test_good_rows_defaults_and_resolution(mixed, cfg, base):
    table, _ = mixed
    rows, _ = validate_table(table, cfg, base)
    r = {row.id: row for row in rows}
    d = Defaults()
    g1 = r["g1"]
    assert isinstance(g1, Row)
    assert (g1.mode, g1.height, g1.width, g1.num_inference_steps, g1.guidance_scale, g1.num_images) == \
        ("text2img", d.height, d.width, d.num_inference_steps, d.guidance_scale, d.num_images)
    assert (g1.prior_num_inference_steps, g1.prior_guidance_scale) == (d.prior_num_inference_steps,
                                                                       d.prior_guidance_scale)
    assert g1.strength is None and g1.negative_prompt is None and g1.init_image is None
    assert g1.seed == derive_seed(7, "g1")
    assert g1.row_hash == g1.fingerprint() and g1.row_hash
    g2 = r["g2"]
    assert (g2.height, g2.width, g2.num_inference_steps, g2.seed, g2.num_images) == (768, 512, 30, 42, 2)
    assert isinstance(g2.num_inference_steps, int) and isinstance(g2.guidance_scale, float)
    assert g2.guidance_scale == 0.0 and g2.negative_prompt == "blurry"
    a_png = os.path.join(os.path.realpath(base), "img", "a.png")
    g3 = r["g3.img2img"]
    assert g3.strength == 0.5 and g3.init_image == a_png and g3.mask is None
    g4 = r["g4_inpaint"]
    assert g4.init_image == a_png and g4.mask == os.path.join(os.path.realpath(base), "img", "m.png")
    assert g4.strength is None
    g5 = r["g5-mix"]
    assert g5.prompt == "" and len(g5.mix) == 2 and g5.init_image is None
    assert (g5.mix[0].prompt, g5.mix[0].weight) == ("a cat", 0.3)
    assert (g5.mix[1].image_uri, g5.mix[1].weight) == (a_png, 0.7)
    assert r["G6"].init_image == a_png and r["G6"].strength == 1.0
    g7 = r["g7"]  # inputs of other modes are ignored, not read
    assert g7.init_image is None and g7.mix == []


def test_negative_prompt_default_and_strength_default(base):
    cfg = JobConfig()
    cfg.defaults.negative_prompt = "low quality"
    cfg.defaults.strength = 0.8
    table = build_table([{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "p", "negative_prompt": ""},
                         {"id": "c", "prompt": "p", "mode": "img2img", "init_image": "img/a.png"}], base)
    rows, errors = validate_table(table, cfg, base)
    assert errors == []
    assert [r.negative_prompt for r in rows] == ["low quality", "", "low quality"]
    assert [r.strength for r in rows] == [None, None, 0.8]


def test_seeds_stable_and_distinct(mixed, cfg, base):
    table, _ = mixed
    rows1, _ = validate_table(table, cfg, base)
    rows2, _ = validate_table(table, cfg, base)
    assert [r.seed for r in rows1] == [r.seed for r in rows2]
    derived = [r.seed for r in rows1 if r.id != "g2"]
    assert len(set(derived)) == len(derived)
    assert all(0 <= s < 2**63 for s in derived)
    # independent of row order and of the other rows
    alone = build_table([{"id": "g5-mix", "prompt": "", "mode": "interpolate",
                          "mix": [{"prompt": "a", "weight": 1.0}]}], base)
    r_alone, _ = validate_table(alone, cfg, base)
    assert r_alone[0].seed == {r.id: r.seed for r in rows1}["g5-mix"]
    # the job seed changes derived seeds
    other = JobConfig()
    other.seed = 8
    rows3, _ = validate_table(table, other, base)
    assert {r.id: r.seed for r in rows3}["g1"] != {r.id: r.seed for r in rows1}["g1"]
    assert {r.id: r.seed for r in rows3}["g2"] == 42


def test_row_hash_changes_with_pixels_deciding_fields(base, cfg):
    t = build_table([{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "p", "height": 576}], base)
    rows, _ = validate_table(t, cfg, base)
    t2 = build_table([{"id": "a", "prompt": "p", "guidance_scale": 4.0}], base)  # explicit == default
    rows2, _ = validate_table(t2, cfg, base)
    assert rows[0].row_hash == rows2[0].row_hash
    t3 = build_table([{"id": "a", "prompt": "p", "guidance_scale": 5.0}], base)
    assert validate_table(t3, cfg, base)[0][0].row_hash != rows[0].row_hash


def test_binary_image_columns(base, cfg):
    t = build_table([
        {"id": "i2i", "prompt": "p", "mode": "img2img", "init_image": png()},
        {"id": "inp", "prompt": "p", "mode": "inpaint", "init_image": png(), "mask": png(mode="L")},
        {"id": "empty", "prompt": "p", "mode": "img2img", "init_image": b""},
        {"id": "mixbytes", "prompt": "p", "mode": "interpolate", "mix": [{"image": png(), "weight": 1.0}]},
    ], base, init_image=pa.binary(), mask=pa.binary())
    rows, errors = validate_table(t, cfg, base)
    assert [r.id for r in rows] == ["i2i", "inp", "mixbytes"]
    assert isinstance(rows[0].init_image, bytes) and isinstance(rows[1].mask, bytes)
    assert rows[2].mix[0].image == png()
    assert len(errors) == 1 and errors[0].field == "init_image" and "<0 bytes>" in errors[0].message
    tight = JobConfig()
    tight.limits.max_image_bytes = 50
    _, errors = validate_table(t, tight, base)
    assert {e.id for e in errors} == {"i2i", "inp", "empty", "mixbytes"}
    assert all("bytes" in e.message for e in errors)
    assert all(isinstance(e.value, str) for e in errors)  # bytes never copied into errors


def test_type_errors(base, cfg):
    t = build_table([{"id": "s", "prompt": "p", "height": "512"}, {"id": "ok", "prompt": "p", "height": "512.5"}],
                    base, height=pa.string())
    rows, errors = validate_table(t, cfg, base)
    assert rows == [] and len(errors) == 2
    assert errors[0].message == "height: must be an integer multiple of 64, got '512'"
    t = pa.table({"id": ["a", "b"], "prompt": ["p", "q"], "seed": [1.0, 2.5], "height": [512.0, None],
                  "guidance_scale": pa.array([True, None], pa.bool_())})
    rows, errors = validate_table(t, cfg, base)
    assert rows == []
    fields = {e.id: e.field for e in errors}
    assert fields["a"] == "guidance_scale" and fields["b"] == "seed"
    t = pa.table({"id": ["a"], "prompt": ["p"], "seed": [3.0], "height": [512.0]})
    rows, errors = validate_table(t, cfg, base)
    assert errors == [] and rows[0].seed == 3 and rows[0].height == 512 and isinstance(rows[0].seed, int)


def test_minimal_manifest_and_extra_columns(base, cfg):
    t = pa.table({"id": ["a", "b"], "prompt": ["p", "q"], "caption_source": ["x", "y"]})
    rows, errors = validate_table(t, cfg, base)
    assert errors == [] and [r.mode for r in rows] == ["text2img", "text2img"]
    rows, errors = validate_table(t.slice(0, 0), cfg, base)
    assert rows == [] and errors == []


def test_check_params():
    limits = LimitsConfig()
    assert check_params(dataclasses.asdict(Defaults()), limits) == []
    assert check_params(dataclasses.asdict(JobConfig().defaults), limits) == []
    assert check_params({}, limits) == []
    assert check_params({"height": None, "negative_prompt": "x", "other": object()}, limits) == []
    probs = check_params({"height": 500, "width": 512, "strength": 0, "guidance_scale": NAN,
                          "prior_guidance_scale": INF, "num_images": True, "num_inference_steps": "50",
                          "prior_num_inference_steps": 0}, limits)
    fields = [p[0] for p in probs]
    assert fields == ["num_images", "height", "num_inference_steps", "guidance_scale",
                      "prior_num_inference_steps", "prior_guidance_scale", "strength"]
    assert all(p[2].startswith("must ") for p in probs)
    assert ("height", 500, "must be a multiple of 64") in probs
    big = check_params({"height": 1024, "width": 2048}, limits)
    assert big and big[0][0] == "height" and "max_pixels" in big[0][2]
    assert check_params({"height": 1024, "width": 2048}, LimitsConfig(max_pixels=2048 * 1024)) == []
    assert check_params({"strength": 1}, limits) == [] and check_params({"guidance_scale": 0}, limits) == []
    assert math.isnan(check_params({"strength": NAN}, limits)[0][1])


def test_validate_images_and_manifest(base, cfg):
    t = build_table([
        {"id": "ok", "prompt": "p", "mode": "inpaint", "init_image": "img/a.png", "mask": "img/m.png"},
        {"id": "missing", "prompt": "p", "mode": "img2img", "init_image": "img/nope.png"},
        {"id": "corrupt", "prompt": "p", "mode": "img2img", "init_image": "img/corrupt.png"},
        {"id": "small_mask", "prompt": "p", "mode": "inpaint", "init_image": "img/a.png",
         "mask": "img/small_mask.png"},
        {"id": "bad id!", "prompt": "p"},
        {"id": "text", "prompt": "p"},
        {"id": "mix", "prompt": "", "mode": "interpolate",
         "mix": [{"prompt": "a", "weight": 1}, {"image_uri": "img/nope.png", "weight": 1}]},
    ], base)
    rows, errors = validate_table(t, cfg, base)
    assert len(rows) == 6 and len(errors) == 1
    img_errors = validate_images(rows, cfg.limits)
    assert [(e.index, e.id, e.field) for e in img_errors] == [
        (1, "missing", "init_image"), (2, "corrupt", "init_image"), (3, "small_mask", "mask"),
        (5, "mix", "mix[1].image_uri")]
    assert "not found" in img_errors[0].message and "nope.png" in img_errors[0].message
    assert img_errors[2].message == "mask: size 32x32 differs from init_image size 64x64"
    assert validate_images(rows, cfg.limits, workers=1) == img_errors
    rows2, errors2 = validate_manifest(t, cfg, base, check_images=True)
    assert [r.id for r in rows2] == ["ok", "text"]
    assert [e.index for e in errors2] == [1, 2, 3, 4, 6]
    text = format_problems(errors2)
    lines = text.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("row 1 (id missing): init_image: image ")
    assert lines[2] == "row 3 (id small_mask): mask: size 32x32 differs from init_image size 64x64"
    assert lines[3].startswith("row 4 (id _row4): id: must match")
    short = format_problems(errors2, max_lines=2).splitlines()
    assert len(short) == 3 and short[-1] == "... and 3 more invalid rows"
    assert format_problems([]) == ""


def test_allowed_roots_and_protocols_from_config(base, tmp_path_factory):
    other = tmp_path_factory.mktemp("shared")
    (other / "x.png").write_bytes(png())
    t = build_table([{"id": "a", "prompt": "p", "mode": "img2img", "init_image": str(other / "x.png")},
                     {"id": "b", "prompt": "p", "mode": "img2img", "init_image": "img/a.png"}], base)
    cfg = JobConfig()
    rows, errors = validate_table(t, cfg, base)
    assert [e.id for e in errors] == ["a"] and "outside the allowed roots" in errors[0].message
    cfg.limits.allowed_roots = [base, str(other)]
    rows, errors = validate_table(t, cfg, base)
    assert errors == [] and rows[0].init_image == os.path.realpath(other / "x.png")
    cfg.limits.allowed_protocols = ["s3"]
    rows, errors = validate_table(t, cfg, base)
    assert len(errors) == 2 and all("uses protocol 'file'" in e.message for e in errors)


def test_symlink_escape_in_manifest(base, tmp_path_factory, cfg):
    secret = tmp_path_factory.mktemp("secret")
    (secret / "s.png").write_bytes(png())
    os.symlink(secret / "s.png", os.path.join(base, "img", "link.png"))
    t = build_table([{"id": "a", "prompt": "p", "mode": "img2img", "init_image": "img/link.png"}], base)
    rows, errors = validate_table(t, cfg, base)
    assert rows == [] and "outside the allowed roots" in errors[0].message


def test_many_rows_fast(base, cfg):
    n = 20000
    t = pa.table({"id": [f"r{i}" for i in range(n)], "prompt": ["p"] * n,
                  "height": pa.array([512 if i % 10 else 500 for i in range(n)], pa.int64())})
    rows, errors = validate_table(t, cfg, base)
    assert len(rows) + len(errors) == n and len(errors) == n // 10
