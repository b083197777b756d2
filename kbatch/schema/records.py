"""The output record: one per produced image and one per failed row; its Arrow schema and how a row's
record is made from the row and the run's shared fields."""
from __future__ import annotations

import json

import pyarrow as pa

from kbatch.schema.rows import Row, input_ref


def record_template(cfg, run_id: str) -> dict:
    """What every record of a run shares (models, schedulers, dtype, run id): sent to a writer once per shard;
    the writer makes each row's record from it (``base_record``)."""
    m = cfg.models
    return {"scheduler": m.scheduler, "prior_scheduler": m.prior_scheduler, "dtype": m.dtype,
            "model_prior": m.prior, "model_decoder": m.decoder, "model_inpaint": m.inpaint, "run_id": run_id}


def base_record(row: Row, template: dict) -> dict:
    """The metadata of a row (without image fields): its request as run, and the run's ``template``."""
    mix = None
    if row.mix:
        mix = json.dumps([{k: (input_ref(v) if k == "image" else v) for k, v in
                           (("weight", it.weight), ("prompt", it.prompt), ("image", it.image),
                            ("image_uri", it.image_uri)) if v is not None} for it in row.mix])
    t = template
    return {
        "id": row.id, "mode": row.mode, "prompt": row.prompt, "negative_prompt": row.negative_prompt,
        "seed": row.seed, "num_images": row.num_images, "height": row.height, "width": row.width,
        "num_inference_steps": row.num_inference_steps, "guidance_scale": row.guidance_scale,
        "prior_num_inference_steps": row.prior_num_inference_steps,
        "prior_guidance_scale": row.prior_guidance_scale, "strength": row.strength,
        "init_image": input_ref(row.init_image), "mask": input_ref(row.mask), "mix": mix,
        "scheduler": t["scheduler"], "prior_scheduler": t["prior_scheduler"], "dtype": t["dtype"],
        "model_prior": t["model_prior"],
        "model_decoder": t["model_inpaint"] if row.mode == "inpaint" else t["model_decoder"],
        "row_hash": row.row_hash, "run_id": t["run_id"],
    }


def error_record(base: dict, message: str) -> dict:
    return {**base, "image_index": -1, "status": "error", "error": message}


def record_key(row_id: str, image_index: int) -> str:
    """Output key of one image: no dots (webdataset), injective (ids never contain '~')."""
    return f"{row_id.replace('.', '~')}__{image_index}"


# One metadata record per produced image, and one per failed row (image_index -1).
RECORD_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image_index", pa.int32()),
    ("status", pa.string()),  # ok | error | filtered (quality.gate)
    ("error", pa.string()),  # reason naming field and value; null when ok
    ("mode", pa.string()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("seed", pa.int64()),
    ("num_images", pa.int32()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("num_inference_steps", pa.int32()),
    ("guidance_scale", pa.float64()),
    ("prior_num_inference_steps", pa.int32()),
    ("prior_guidance_scale", pa.float64()),
    ("strength", pa.float64()),
    ("init_image", pa.string()),  # URI or sha256 of inline bytes
    ("mask", pa.string()),
    ("mix", pa.string()),  # JSON list of {prompt|image|image_uri, weight}
    ("scheduler", pa.string()),
    ("prior_scheduler", pa.string()),
    ("dtype", pa.string()),
    ("model_prior", pa.string()),
    ("model_decoder", pa.string()),  # the inpaint model for inpaint rows
    ("image_format", pa.string()),
    ("sha256", pa.string()),  # of the encoded image
    ("key", pa.string()),  # record_key(id, image_index)
    ("path", pa.string()),  # where the image lives, relative to the output root
    ("shard", pa.string()),
    ("prior_worker", pa.string()),  # node:gpu ids
    ("decoder_worker", pa.string()),
    ("row_hash", pa.string()),
    ("run_id", pa.string()),
    ("seconds", pa.float64()),  # decoder seconds of the batch, per image
    # quality scores (docs/quality.md); null when off. clip_score: 100 x CLIP cosine(image as written, prompt)
    ("clip_score", pa.float64()),
    ("candidate_seeds", pa.list_(pa.int64())),  # quality.best_of: every candidate's seed, candidate order
    ("candidate_scores", pa.list_(pa.float64())),  # ... and this image index's clip_score of each
    # quality.gate (docs/quality.md): the gate's score of the prior's predicted embedding (of the kept
    # candidate; of the best candidate on a filtered record) and the gate ("aesthetic>=6.0"); null without one
    ("predicted_score", pa.float64()),
    ("gate", pa.string()),
])
RECORD_FIELDS = RECORD_SCHEMA.names
# quality.heads: one float64 column score_<NAME> per head, beside RECORD_SCHEMA's (named by the job's config)
SCORE_PREFIX = "score_"
STATUSES = ("ok", "error", "filtered")  # filtered: quality.gate kept no candidate of the image


def is_score_column(name: str) -> bool:
    return isinstance(name, str) and name.startswith(SCORE_PREFIX) and len(name) > len(SCORE_PREFIX)
