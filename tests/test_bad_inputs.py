"""Issue 4: a manifest of bad inputs mixed with good rows: one error record each, good rows ok;
`kbatch validate` reports the same rows without loading models."""
import io
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import kbatch
from kbatch.config import from_dict
from kbatch.run.runner import run_job

from conftest import sim_models, tiny_config

# Bad rows are the validator's and the loaders' business: the simulated models (docs/clusters.md, simulated models) render the good ones.
SIM = sim_models()


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _bomb():
    """A PNG whose header says 30000x30000 (1-bit, tiny file): must be refused before decoding."""
    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_bad_rows_become_error_records(ray_session, tmp_path, capsys):
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    good_png = _png(rgb)
    (tmp_path / "ok.png").write_bytes(good_png)
    (tmp_path / "small_mask.png").write_bytes(_png(np.zeros((32, 32), np.uint8)))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (tmp_path.parent / "outside.png").write_bytes(good_png)
    nan = math.nan
    rows = [  # (row, field named in the error or None for a good row)
        ({"id": "good-1", "prompt": "a fox"}, None),
        ({"id": "good-2", "prompt": "a ship", "mode": "img2img", "init_image_uri": "ok.png"}, None),
        ({"id": "no-prompt", "prompt": None}, "prompt"),
        ({"id": "bad-mode", "prompt": "x", "mode": "sketch"}, "mode"),
        ({"id": "strength-0", "prompt": "x", "mode": "img2img", "init_image_uri": "ok.png", "strength": 0.0}, "strength"),
        ({"id": "strength-nan", "prompt": "x", "mode": "img2img", "init_image_uri": "ok.png", "strength": nan}, "strength"),
        ({"id": "steps-0", "prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"id": "guidance-nan", "prompt": "x", "guidance_scale": nan}, "guidance_scale"),
        ({"id": "h-500", "prompt": "x", "height": 500}, "height"),
        ({"id": "too-big", "prompt": "x", "height": 2048, "width": 2048}, "height"),
        ({"id": "good-1", "prompt": "duplicate"}, "id"),
        ({"id": "../evil", "prompt": "x"}, "id"),
        ({"id": "no-init", "prompt": "x", "mode": "img2img"}, "init_image"),
        ({"id": "missing-file", "prompt": "x", "mode": "img2img", "init_image_uri": "nope.png"}, "init_image"),
        ({"id": "corrupt", "prompt": "x", "mode": "img2img", "init_image_uri": "corrupt.png"}, "init_image"),
        ({"id": "truncated", "prompt": "x", "mode": "img2img", "init_image_uri": "truncated.png"}, "init_image"),
        ({"id": "bomb", "prompt": "x", "mode": "img2img", "init_image": _bomb()}, "init_image"),
        ({"id": "no-mask", "prompt": "x", "mode": "inpaint", "init_image_uri": "ok.png"}, "mask"),
        ({"id": "mask-size", "prompt": "x", "mode": "inpaint", "init_image_uri": "ok.png",
          "mask_uri": "small_mask.png"}, "mask"),
        ({"id": "outside", "prompt": "x", "mode": "img2img", "init_image_uri": "../outside.png"}, "init_image"),
        ({"id": "http", "prompt": "x", "mode": "img2img", "init_image_uri": "http://example.com/a.png"}, "init_image"),
        ({"id": "empty-mix", "prompt": "x", "mode": "interpolate", "mix": []}, "mix"),
        ({"id": "two-in-one", "prompt": "x", "mode": "interpolate",
          "mix": [{"prompt": "a", "image": good_png, "image_uri": None, "weight": 1.0}]}, "mix"),
    ]
    df = pd.DataFrame([r for r, _ in rows])
    df["init_image"] = df["init_image"].astype(object)
    table = pa.Table.from_pandas(df, preserve_index=False)
    for col in ("strength", "guidance_scale"):  # pandas turns NaN into null; a real NaN must stay NaN
        table = table.set_column(table.schema.get_field_index(col), col,
                                 pa.array([r.get(col) for r, _ in rows], pa.float64()))
    pq.write_table(table, tmp_path / "m.parquet")
    cfg = tiny_config(SIM, tmp_path / "out", manifest=str(tmp_path / "m.parquet"))
    result = run_job(from_dict(cfg))
    assert result.complete and result.exit_code == 1  # failures above the default tolerance of 0
    res = kbatch.open_results(str(tmp_path / "out"))
    recs = res.df
    assert set(recs[recs.status == "ok"].id) == {"good-1", "good-2"}
    errors = recs[recs.status == "error"].set_index("id")
    assert len(errors) == len(rows) - 2 and errors.index.is_unique, errors
    for index, (row, field) in enumerate(rows):
        if field is None:
            continue
        rid = f"_row{index}" if field == "id" else row["id"]  # bad ids get a safe synthetic id
        reason = errors.loc[rid, "error"]
        assert reason.startswith(field) or f"; {field}:" in reason, (rid, field, reason)
        value = row.get(field) if field != "id" else row["id"]
        if isinstance(value, (int, float, str)) and field not in ("mix",):
            assert str(value) in reason or field == "init_image", (rid, reason)
    assert not any("/" in i or i.startswith("..") for i in recs.id), "bad ids never become paths"
    # validate: the same rows, without models
    from kbatch.cli import main

    import yaml
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    code = main(["validate", str(tmp_path / "job.yaml")])
    out = capsys.readouterr().out
    assert code == 1 and f"{len(rows)} rows, 2 valid" in out, out
