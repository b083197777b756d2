"""Prior embeddings as data: a ``stage: prior`` job writes them, a ``stage: decoder`` job renders from them.

An embeddings output is a normal kbatch output location (commit records, ``meta/``, ``_job.json``) whose
data objects are ``embeddings/<shard>.parquet``: per row, the request as the prior saw it (seed, num_images,
negative prompt and prior parameters resolved; decoder parameters as the manifest gave them, null = the
decoding job's defaults), the embedding pairs, and the generator state after the prior. Decoding them gives
the same pixels as one job doing both stages, with any decoder settings the decoding job chooses.
"""
from __future__ import annotations

import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kbatch import storage
from kbatch.schema.payloads import PriorOutput
from kbatch.schema.rows import Row
from kbatch.schema.records import record_key

CELL_FIELDS = [("id", pa.string()), ("prompt", pa.string()), ("mode", pa.string()),
               ("negative_prompt", pa.string()), ("seed", pa.int64()), ("num_images", pa.int64()),
               ("prior_num_inference_steps", pa.int64()), ("prior_guidance_scale", pa.float64()),
               ("height", pa.int64()), ("width", pa.int64()), ("num_inference_steps", pa.int64()),
               ("guidance_scale", pa.float64()), ("strength", pa.float64()),
               ("init_image", pa.binary()), ("init_image_uri", pa.string()),
               ("mask", pa.binary()), ("mask_uri", pa.string())]
EMBED_SCHEMA = pa.schema(CELL_FIELDS + [
    ("image_embeds", pa.list_(pa.float32())), ("negative_image_embeds", pa.list_(pa.float32())),
    ("embed_dim", pa.int32()), ("generator_state", pa.binary()), ("prior_worker", pa.string()),
    # quality (kbatch.models.scoring): best_of's candidates (embeddings candidate-major; null: one candidate)
    # and the prompt's CLIP text embedding (null: written without scores; a scoring decoder makes it)
    ("candidate_seeds", pa.list_(pa.int64())), ("candidate_states", pa.list_(pa.binary())),
    ("text_embeds", pa.list_(pa.float32()))])
DECODER_CELLS = ("height", "width", "num_inference_steps", "guidance_scale", "strength")


def cells(row: Row, raw: dict) -> dict:
    """The row as the decoding job will see it: prior side resolved, decoder side as in the manifest."""
    out = {"id": row.id, "prompt": row.prompt, "mode": row.mode, "negative_prompt": row.negative_prompt,
           "seed": row.seed, "num_images": row.num_images,
           "prior_num_inference_steps": row.prior_num_inference_steps,
           "prior_guidance_scale": row.prior_guidance_scale}
    for k in DECODER_CELLS:
        v = raw.get(k)
        out[k] = None if v is None or (isinstance(v, float) and np.isnan(v)) else v
    for k in ("init_image", "mask"):
        v = getattr(row, k)
        out[k] = v if isinstance(v, bytes) else None
        out[f"{k}_uri"] = v if isinstance(v, str) else None
    return out


def write_embeddings_shard(spec, shard: str, bases: dict[str, dict], row_cells: dict[str, dict],
                           outputs: list[PriorOutput], error_records: list[dict]):
    """CPU task: ``embeddings/<shard>.parquet``, then metadata, stats and the commit record."""
    from kbatch.output import commits
    from kbatch.output.writer import begin_shard, commit_shard

    t0 = time.time()
    attempt = commits.new_attempt()
    done = begin_shard(spec, shard, attempt)  # committed by an earlier attempt: nothing to write
    if done is not None:
        return done
    fs, root = storage.get_fs(spec.root, spec.storage_options)
    data = [{**row_cells[o.id], "image_embeds": o.image_embeds.reshape(-1).tolist(),
             "negative_image_embeds": o.negative_image_embeds.reshape(-1).tolist(),
             "embed_dim": int(o.image_embeds.shape[-1]), "generator_state": o.generator_state,
             "prior_worker": o.prior_worker, "candidate_seeds": o.candidate_seeds,
             "candidate_states": o.candidate_states,
             "text_embeds": None if o.text_embeds is None else np.asarray(o.text_embeds).reshape(-1).tolist()}
            for o in outputs]
    rel = f"embeddings/{commits.attempt_name(shard, attempt)}.parquet"  # this attempt's own name
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(data, schema=EMBED_SCHEMA), buf, compression="zstd")
    nbytes = storage.write_bytes_atomic(fs, storage.join(root, rel), buf.getvalue())
    records = []
    for o in outputs:
        for i in range(o.image_embeds.shape[0] // len(o.states)):  # per image index, not per candidate
            records.append({**bases[o.id], "image_index": i, "status": "ok", "error": None,
                            "key": record_key(o.id, i), "path": f"{rel}#{o.id}", "shard": shard,
                            "image_format": "embeddings", "prior_worker": o.prior_worker})
    for rec in error_records:
        records.append({**rec, "shard": shard, "key": record_key(rec["id"], -1)})
    if spec.fail_after_data:
        raise RuntimeError("injected write failure")
    return commit_shard(spec, shard, records, [rel], nbytes, t0, n_ok=len(records) - len(error_records),
                        attempt=attempt)


def read_prior_outputs(locations: list[tuple[str, int, str]], storage_options: dict | None = None
                       ) -> list[PriorOutput]:
    """The stored prior outputs at ``locations`` ((embeddings file URI, row index, id)), in that order."""
    import fsspec

    by_file: dict[str, list[tuple[int, str]]] = {}
    for uri, index, rid in locations:
        by_file.setdefault(uri, []).append((index, rid))
    found: dict[str, PriorOutput] = {}
    cols = ["id", "num_images", "image_embeds", "negative_image_embeds", "embed_dim", "generator_state",
            "prior_worker"]
    quality = ["candidate_seeds", "candidate_states", "text_embeds"]  # absent from older embeddings outputs
    for uri, wanted in by_file.items():
        with fsspec.open(uri, "rb", **(storage_options or {})) as fh:
            pf = pq.ParquetFile(fh)
            table = pf.read(columns=cols + [c for c in quality if c in pf.schema_arrow.names])
        rows = table.take(pa.array([i for i, _ in wanted])).to_pylist()
        for r, (_, rid) in zip(rows, wanted):
            if r["id"] != rid:
                raise ValueError(f"embeddings file {uri!r} changed: row {rid!r} is not where it was")
            shape = (-1, r["embed_dim"])
            text = r.get("text_embeds")
            found[rid] = PriorOutput(rid, np.asarray(r["image_embeds"], np.float32).reshape(shape),
                                     np.asarray(r["negative_image_embeds"], np.float32).reshape(shape),
                                     r["generator_state"], r["prior_worker"], r.get("candidate_seeds"),
                                     r.get("candidate_states"),
                                     None if text is None else np.asarray(text, np.float32))
    return [found[rid] for _, _, rid in locations]
