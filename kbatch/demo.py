"""``kbatch demo``: tiny offline models, an example manifest of every mode, a local render, a gallery."""
from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SUBJECTS = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen, studio photo",
            "an astronaut riding a horse", "a watercolor of a mountain lake", "a robot reading a book",
            "a city street in the rain, neon", "a cat wearing a tiny hat", "sunflowers in a blue vase",
            "a sailing ship on a stormy sea", "a cozy cabin in the woods", "a futuristic train station"]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def demo_inputs(folder: str) -> None:
    """A gradient init image and a centre mask (white = repaint), written as PNG files."""
    os.makedirs(folder, exist_ok=True)
    y, x = np.mgrid[0:64, 0:64]
    img = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    with open(os.path.join(folder, "init.png"), "wb") as fh:
        fh.write(_png(img))
    with open(os.path.join(folder, "mask.png"), "wb") as fh:
        fh.write(_png(mask))


def demo_manifest(rows: int) -> pa.Table:
    """``rows`` requests: mostly text2img, plus one row of each other mode once rows >= 6."""
    recs = []
    for i in range(rows):
        r = {"id": f"demo-{i:04d}", "prompt": SUBJECTS[i % len(SUBJECTS)], "mode": "text2img",
             "negative_prompt": None, "num_images": 1, "init_image": None, "mask": None, "strength": None,
             "mix": None}
        if i == 1:
            r["negative_prompt"] = "blurry, low quality"
        if i == 2:
            r["num_images"] = 2
        if rows >= 6 and i == rows - 3:
            r.update(mode="img2img", init_image="inputs/init.png", strength=0.6)
        if rows >= 6 and i == rows - 2:
            r.update(mode="inpaint", init_image="inputs/init.png", mask="inputs/mask.png")
        if rows >= 6 and i == rows - 1:
            r.update(mode="interpolate", mix=[{"prompt": "a red fox", "image": None, "image_uri": None, "weight": 0.5},
                                              {"prompt": None, "image": None, "image_uri": "inputs/init.png",
                                               "weight": 0.5}])
        recs.append(r)
    from kbatch.schema.rows import MIX_TYPE

    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("mode", pa.string()),
                        ("negative_prompt", pa.string()), ("num_images", pa.int64()), ("init_image", pa.string()),
                        ("mask", pa.string()), ("strength", pa.float64()), ("mix", MIX_TYPE)])
    return pa.Table.from_pylist(recs, schema=schema)


def demo_config(root: str, models: dict[str, str]) -> dict:
    return {
        "models": {**models, "dtype": "float32"},
        "manifest": os.path.join(root, "manifest.parquet"),
        "output": {"path": os.path.join(root, "render"), "rows_per_shard": 64},
        "seed": 0,
        # small machines: one process runs both stages (colocate), two batches at once in single-thread
        # lanes sharing the weights; faster than one two-thread loop and half the memory of two processes
        # (bench/RESULTS.md)
        "resources": {"prior": {"batch_size": 8},
                      "decoder": {"replicas": 1, "gpus": 1, "cpus": 1.5, "batch_size": 8, "threads": 1,
                                  "concurrency": 2},
                      "device": "auto", "colocate": True},
        "defaults": {"height": 64, "width": 64, "num_inference_steps": 10, "guidance_scale": 4.0,
                     "prior_num_inference_steps": 5, "prior_guidance_scale": 4.0, "strength": 0.5},
    }


def run_demo(root: str = "out", rows: int = 12, progress: str | None = None):
    import yaml

    from kbatch.config import load_config
    from kbatch.run.runner import run_job
    from kbatch.models.tiny import write_tiny_models

    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    models = write_tiny_models(os.path.join(root, "models"))
    demo_inputs(os.path.join(root, "inputs"))
    pq.write_table(demo_manifest(rows), os.path.join(root, "manifest.parquet"))
    data = demo_config(root, models)
    with open(os.path.join(root, "demo.yaml"), "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
    cfg = load_config(os.path.join(root, "demo.yaml"))
    result = run_job(cfg, overwrite=True, progress=progress)
    print(result.summary_line())
    print(f"config:   {os.path.join(root, 'demo.yaml')}  (rerun: kbatch run {os.path.join(root, 'demo.yaml')})")
    print(f"output:   {result.output}")
    print(f"gallery:  {os.path.join(result.output, 'gallery.html')}")
    return result
