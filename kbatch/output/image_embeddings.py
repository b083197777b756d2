"""Each ok image's CLIP image embedding (``quality.image_embeddings``), in clip-retrieval's layout beside the
metadata (docs/quality.md): ``img_emb/<shard>~<attempt>.npy``, float16, shape [n_ok, D], row i = the i-th
record with status ok in ``meta/<shard>~<attempt>.parquet`` (file order). The file is written with the shard's
other objects, before its commit record, and its name is derived from the metadata object's, so a reader finds
it from the commit record alone; autofaiss indexes the folder as it is (``autofaiss build_index
--embeddings=OUT/img_emb``).

Readers: ``iter_shard_embeddings`` (one committed shard at a time: its standing records, the rows
``open_results(...).df`` has, and their embeddings row by row) and ``Results.embeddings`` (aligned with
``.df``). A record without an embedding (an error, ``filtered``, or an ok record of a shard written without
them) has a row of NaN.
"""
from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kbatch import storage
from kbatch.output import commits

FOLDER = "img_emb"
FIELD = "_image_embedding"  # the record key a writer gets each ok image's embedding under (not a column)


def embeddings_path(meta_path: str) -> str:
    """``meta/<shard>~<attempt>.parquet`` -> ``img_emb/<shard>~<attempt>.npy``."""
    name = meta_path.rsplit("/", 1)[-1]
    if not name.endswith(".parquet"):
        raise ValueError(f"not a metadata object name: {meta_path!r}")
    return f"{FOLDER}/{name[:-len('.parquet')]}.npy"


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_shard_embeddings(fs, root: str, meta_rel: str, ok_records: list[dict]) -> tuple[str, int]:
    """Write the embeddings of a shard's ok records (in their order) as float16; returns (path, bytes). A
    record without one gets a row of NaN; a shard without ok records, a [0, 0] array."""
    rows = [r.get(FIELD) for r in ok_records]
    dim = next((len(np.asarray(e).reshape(-1)) for e in rows if e is not None), 0)
    out = np.full((len(rows), dim), np.nan, np.float16)
    for i, e in enumerate(rows):
        if e is not None:
            out[i] = np.asarray(e, np.float32).reshape(-1)
    rel = embeddings_path(meta_rel)
    return rel, storage.write_bytes_atomic(fs, storage.join(root, rel), _npy(out))


def read_shard_embeddings(fs, root: str, shard: str, rec: dict) -> np.ndarray | None:
    """The [n_ok, D] float16 embeddings of a committed shard (``rec``: its commit record); None when it has none."""
    rel = embeddings_path(commits.meta_file(shard, rec))
    if rec.get("files") is not None and rel not in rec["files"]:
        return None
    try:
        data = fs.cat_file(storage.join(root, rel))
    except FileNotFoundError:
        return None
    return np.load(io.BytesIO(data), allow_pickle=False)


def aligned(status: list, emb: np.ndarray | None, dim: int) -> np.ndarray:
    """Rows for records with ``status`` (a shard's records in file order, some dropped as superseded: never
    ok ones): the ok records' rows of ``emb`` in order, NaN elsewhere."""
    ok = np.array([s == "ok" for s in status], bool)
    out = np.full((len(status), dim), np.nan, np.float16)
    if emb is not None and emb.size and ok.any():
        if emb.shape[0] != int(ok.sum()):
            raise ValueError(f"image embeddings hold {emb.shape[0]} rows for {int(ok.sum())} ok records")
        out[ok] = emb
    return out


def _standing_errors(fs, path: str, recs: dict[str, dict], read) -> dict[str, set[int]] | None:
    """Which error records stand (``writer.current``'s rule), as {shard: rows to drop}; None when no shard
    has an error record (nothing is dropped). Reads id/status/run_id of each shard, one at a time."""
    import pandas as pd

    errs = []
    for n, shard in enumerate(recs):
        t = read(shard, ["id", "status", "run_id"])
        bad = np.asarray(pc.fill_null(pc.is_in(t.column("status"), value_set=pa.array(["ok", "filtered"])),
                                      False), bool)
        if not bad.all():
            rows = np.flatnonzero(~bad)
            errs.append(pd.DataFrame({"id": t.column("id").take(rows).to_pylist(),
                                      "run": t.column("run_id").take(rows).to_pylist(), "shard": n, "row": rows}))
    if not errs:
        return None
    e = pd.concat(errs, ignore_index=True)
    ids = pa.array(e["id"].unique())
    has_ok: set = set()
    for shard in recs:
        t = read(shard, ["id", "status"])
        hit = pc.and_(pc.fill_null(pc.is_in(t.column("id"), value_set=ids), False),
                      pc.fill_null(pc.is_in(t.column("status"), value_set=pa.array(["ok", "filtered"])), False))
        has_ok.update(t.column("id").filter(hit).to_pylist())
    e["run"] = e["run"].fillna("")
    cand = e[~e["id"].isin(has_ok)]
    # the latest error record of each id stands (by run id; the last such record on ties, like current())
    keep = cand.sort_values(["run"], kind="stable").drop_duplicates("id", keep="last")
    names = list(recs)
    drop: dict[str, set[int]] = {}
    kept = set(zip(keep["shard"], keep["row"]))
    for s, r in zip(e["shard"], e["row"]):
        if (s, r) not in kept:
            drop.setdefault(names[s], set()).add(int(r))
    return drop


def iter_shard_embeddings(uri: str, storage_options: dict | None = None, columns: list[str] | None = None
                          ) -> Iterator[tuple[pa.Table, np.ndarray | None]]:
    """Per committed shard, in shard order: its standing records (``columns``; the rows and order
    ``open_results(uri).df`` has) and their embeddings row by row (float16 [len(table), D], NaN rows where a
    record has none), or None for every shard when the output has no embeddings. One shard at a time."""
    from kbatch.output.writer import _read_meta

    fs, path = storage.get_fs(uri, storage_options)
    recs = commits.read_all(fs, path)

    def read(shard, cols):
        return _read_meta(fs, path, shard, cols, recs[shard])

    drop = _standing_errors(fs, path, recs, read)
    cols = None if columns is None else list(dict.fromkeys(list(columns) + ["status"]))
    has_any = any(embeddings_path(commits.meta_file(s, r)) in (r.get("files") or []) for s, r in recs.items())
    dim = None
    for shard, rec in recs.items():
        t = read(shard, cols)
        if drop and drop.get(shard):
            t = t.filter(pa.array([i not in drop[shard] for i in range(t.num_rows)]))
        emb = None
        if has_any:
            raw = read_shard_embeddings(fs, path, shard, rec)
            if raw is not None and raw.size:
                dim = raw.shape[1]
            if dim is None:
                dim = _first_dim(fs, path, recs)
            emb = aligned(t.column("status").to_pylist(), raw, dim)
        if columns is not None and "status" not in columns:
            t = t.drop_columns(["status"])
        yield t, emb


def _first_dim(fs, path: str, recs: dict[str, dict]) -> int:
    """The embedding width of an output: of its first shard with an embedding (0 if none has one)."""
    for shard, rec in recs.items():
        raw = read_shard_embeddings(fs, path, shard, rec)
        if raw is not None and raw.size:
            return int(raw.shape[1])
    return 0


def embeddings_for(uri: str, df, storage_options: dict | None = None) -> np.ndarray | None:
    """float16 [len(df), D] for the records of ``df`` (``open_results(...).df``: each ok record is in the
    shard its ``shard`` column names, ok records in file order); None when the output has no embeddings."""
    fs, path = storage.get_fs(uri, storage_options)
    recs = commits.read_all(fs, path)
    per_shard = {s: read_shard_embeddings(fs, path, s, r) for s, r in recs.items()}
    dims = [e.shape[1] for e in per_shard.values() if e is not None and e.size]
    if not any(e is not None for e in per_shard.values()):
        return None
    dim = dims[0] if dims else 0
    out = np.full((len(df), dim), np.nan, np.float16)
    if not len(df):
        return out
    status = df["status"].to_numpy()
    shards = df["shard"].to_numpy()
    at: dict[str, int] = {}
    for k in np.flatnonzero(status == "ok"):
        s = shards[k]
        e = per_shard.get(s)
        if e is None or not e.size:
            continue
        i = at.get(s, 0)
        at[s] = i + 1
        out[k] = e[i]
    for s, n in at.items():
        if n != per_shard[s].shape[0]:
            raise ValueError(f"shard {s}: {n} ok records but {per_shard[s].shape[0]} image embeddings")
    return out
