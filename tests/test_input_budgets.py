"""docs/faults.md: the decoded pixels of one row and of one loading batch have a budget, checked from the image
headers before anything is decoded; prompts have a length limit. Nothing is lost: a row over its own budget
gets an error record naming the key, a row that does not fit a loading batch is loaded by another task."""
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kbatch.config import ConfigError, LimitsConfig, from_dict
from kbatch.models.actors import load_inputs
from kbatch.plan.input_images import LATER, InputError, PixelBudget, load_row_inputs
from kbatch.schema.rows import MixItem, Row

from conftest import sim_models, tiny_config


def _png(w, h, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _row(rid, *sizes, mode="img2img"):
    if mode == "interpolate":
        return Row(id=rid, prompt="p", mode=mode, mix=[MixItem(weight=1.0, image=_png(w, h, i))
                                                        for i, (w, h) in enumerate(sizes)])
    return Row(id=rid, prompt="p", mode=mode, init_image=_png(*sizes[0]))


def test_a_row_over_its_pixel_budget_fails_naming_the_key_before_decoding():
    limits = LimitsConfig(max_row_pixels=3 * 64 * 64, max_batch_pixels=100 * 64 * 64)
    ok = load_row_inputs(_row("a", (64, 64), (64, 64), (64, 64), mode="interpolate"), limits)
    assert len(ok["mix_images"]) == 3
    with pytest.raises(InputError, match=r"mix\[3\]\.image.*16384 > 12288 \(limits.max_row_pixels\)"):
        load_row_inputs(_row("b", (64, 64), (64, 64), (64, 64), (64, 64), mode="interpolate"), limits)


def test_budget_is_charged_from_the_header_not_after_decoding(monkeypatch):
    """A row over budget never decodes the image that takes it over (Image.load is not reached)."""
    from PIL import ImageFile

    from kbatch.plan.input_images import decode_image

    data, budget, loads = _png(64, 64), PixelBudget(100, "limits.max_row_pixels", row=True), []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real(self))
    with pytest.raises(InputError, match="max_row_pixels"):
        decode_image(data, field="init_image", limits=LimitsConfig(), budgets=(budget,))
    assert loads == [] and budget.used == 0
    decode_image(data, field="init_image", limits=LimitsConfig(), budgets=(PixelBudget(64 * 64, "k", row=True),))
    assert loads and loads[0] == (64, 64)  # the patch sees a real decode


def test_a_loading_batch_over_its_budget_leaves_rows_for_another_task():
    limits = LimitsConfig(max_row_pixels=2 * 64 * 64, max_batch_pixels=3 * 64 * 64)
    rows = [_row("a", (64, 64)), _row("b", (64, 64), (64, 64), mode="interpolate"), _row("c", (64, 64)),
            _row("big", (64, 64), (64, 64), (64, 64), mode="interpolate")]
    errors, inputs = load_inputs(rows, limits)
    assert sorted(inputs) == ["a", "b"]  # 1 + 2 images: the batch is full
    assert errors == {LATER: ["c", "big"]}  # they do not fit this batch: loaded by the next task
    again, inputs2 = load_inputs([r for r in rows if r.id in errors[LATER]], limits)
    assert sorted(inputs2) == ["c"]
    assert list(again) == ["big"] and "limits.max_row_pixels" in again["big"]  # over its own budget anywhere


def test_budgets_are_config_keys_checked_before_any_model():
    with pytest.raises(ConfigError, match="limits.max_batch_pixels.*max_row_pixels"):
        from_dict({"output": {"path": "x"}, "limits": {"max_row_pixels": 10, "max_batch_pixels": 5}})
    with pytest.raises(ConfigError, match="limits.max_prompt_chars"):
        from_dict({"output": {"path": "x"}, "limits": {"max_prompt_chars": 0}})


def test_job_with_budgets_and_long_prompts_loses_no_row(ray_session, tmp_path):
    """End to end (simulated stages, real loading tasks): rows that do not fit one loading batch are loaded
    by later tasks and render; a row over its own budget and a prompt over the limit get error records that
    name the key; every row ends with its records."""
    import kbatch
    from kbatch.run.runner import run_job

    img = _png(64, 64)
    rows = [{"id": f"r{i}", "prompt": "a cat", "mode": "img2img", "init_image": img, "strength": 0.5}
            for i in range(6)]
    rows.append({"id": "huge", "prompt": "a cat", "mode": "inpaint", "init_image": img, "mask": _png(64, 64, 1),
                 "strength": 0.5})
    rows.append({"id": "long", "prompt": "a cat " * 500})
    manifest = tmp_path / "m.parquet"
    pd.DataFrame(rows).to_parquet(manifest)
    cfg = from_dict(tiny_config({}, tmp_path / "out", manifest=str(manifest), models=sim_models(),
                                limits={"max_row_pixels": 64 * 64, "max_batch_pixels": 2 * 64 * 64,
                                        "max_prompt_chars": 1000},
                                retries={"max_failed_rows": 2}))
    result = run_job(cfg)
    assert result.exit_code == 0 and result.rows_ok == 6 and result.rows_failed == 2, result
    df = kbatch.open_results(str(tmp_path / "out")).df
    errors = dict(zip(df[df.status == "error"].id, df[df.status == "error"].error))
    assert "limits.max_row_pixels" in errors["huge"] and errors["huge"].startswith("mask")
    assert "limits.max_prompt_chars" in errors["long"] and "3000" in errors["long"]
    assert sorted(df[df.status == "ok"].id) == [f"r{i}" for i in range(6)]
