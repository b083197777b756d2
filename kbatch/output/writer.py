"""One writer for every output format, with the shard commit protocol.

Layout of an output root (all paths relative to it); ``<stem>`` is ``<shard>~<attempt>``, one per write
attempt (``kbatch.output.commits``)::

    images/<stem>/<key>.<ext>         format "files": one encoded image per ok record
    tars/<stem>.tar                   format "webdataset": <key>.<ext> + <key>.json per ok record
    data/<stem>.parquet               format "parquet": ok records, all record columns + binary "image"
    meta/<stem>.parquet               every format: all records of the shard (ok and error), RECORD_SCHEMA
    stats/<stem>.json                 every format: ShardStats
    _commits/<shard>.json             every format, created LAST and exclusively: names the attempt's files

Commit protocol (``kbatch.output.shard_commit``): the attempt records itself in flight (an intent object,
``kbatch.output.fence``: refused once the run lost its lease), writes its data objects, then metadata and
stats, then *creates* the shard's commit record (if absent, through the output's conditional store: one commit
per shard, whatever attempts), after checking the lease once more. Every object
is written atomically (temp name + rename on local disks, one PUT on object stores), so no partially written
file is ever visible under a final name, and readers (:func:`read_records`, :mod:`kbatch.output.results`,
:mod:`kbatch.run.status`) only read the files a commit record names. An attempt that finds the record taken
commits nothing and removes its own objects.

Keys are ``schema.record_key(id, image_index)``: no dots (webdataset convention) and no '/', so ids never
become paths outside the output root.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import io
import json
import re
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kbatch import storage
from kbatch.output import commits, shard_commit
from kbatch.output.shard_commit import ShardAborted  # noqa: F401 - callers import it from here
from kbatch.schema.records import RECORD_FIELDS, RECORD_SCHEMA, is_score_column, record_key

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
FORMATS = ("files", "webdataset", "parquet", "embeddings")  # embeddings: stage prior
SHARD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_~-]{0,299}$")  # "_rowN": rows whose id was invalid
PARQUET_IMAGE_ROW_GROUP = 32  # rows per row group of data/<shard>.parquet: random access reads one group


@dataclass
class OutputSpec:
    """Where and how a shard is written (picklable; built by the runner from ``config.output``)."""

    root: str  # output URI (local path or fsspec URL)
    format: str = "files"  # files | webdataset | parquet
    image_format: str = "png"  # png | jpeg | webp
    quality: int = 95  # jpeg / webp; webp at 100 is lossless
    png_compress_level: int = 1  # zlib level of PNGs (lossless at any level; config output.png_compress_level)
    fail_after_data: bool = False  # fault injection: raise after the data objects, before metadata/commit
    # fsspec options (endpoint, credentials from the job config only): never in a repr
    storage_options: dict | None = field(default=None, repr=False)
    writer: str = ""  # who writes: "node:<id8>/pid:<pid>", set by the writer; goes into the shard's stats
    fence: Any = None  # lease.Fence of the run: a shard commits only while the run holds the output's lease
    image_embeddings: bool = False  # quality.image_embeddings: img_emb/<stem>.npy beside the metadata

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"output format must be one of {list(FORMATS)}, got {self.format!r}")
        if self.image_format not in EXTENSIONS:
            raise ValueError(f"image_format must be one of {list(EXTENSIONS)}, got {self.image_format!r}")
        if not 1 <= int(self.quality) <= 100:
            raise ValueError(f"quality must be in [1, 100], got {self.quality!r}")

    @property
    def ext(self) -> str:
        return EXTENSIONS[self.image_format]


@dataclass
class ShardStats:
    shard: str
    rows: int  # distinct manifest ids in the shard
    images: int  # ok records (encoded images)
    errors: int  # error records (failed rows)
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of write_shard (encoding + writing)
    bytes: int = 0  # bytes written (data, metadata, stats)
    writer: str = ""  # the process that wrote it ("node:<id8>/pid:<pid>")
    attempt: str = ""  # the write attempt whose objects the commit record names
    filtered_rows: int = 0  # ids whose every record is ``filtered`` (quality.gate kept no candidate)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------
# encoding


def encode_image(arr: Any, image_format: str, quality: int = 95, png_compress_level: int = 6) -> bytes:
    """uint8 HxWx3 array (or a PIL image) -> encoded bytes. PNG is lossless at every ``png_compress_level``
    (zlib 0-9: speed against size, bench/png.py); jpeg/webp use ``quality`` (webp at quality 100 is written
    lossless)."""
    from PIL import Image

    if isinstance(arr, Image.Image):
        img = arr.convert("RGB") if arr.mode not in ("RGB", "L") else arr
    else:
        a = np.asarray(arr)
        if a.dtype != np.uint8:
            raise ValueError(f"image must be uint8, got dtype {a.dtype}")
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
            raise ValueError(f"image must be HxWx3 uint8, got shape {a.shape}")
        img = Image.fromarray(np.ascontiguousarray(a))
    buf = io.BytesIO()
    fmt = image_format.lower()
    q = int(quality)
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=int(png_compress_level))
    elif fmt in ("jpeg", "jpg"):
        img.save(buf, format="JPEG", quality=q, subsampling=0 if q >= 90 else 2, optimize=False)
    elif fmt == "webp":
        if q >= 100:
            img.save(buf, format="WEBP", lossless=True, quality=100, method=4)
        else:
            img.save(buf, format="WEBP", quality=q, method=4)
    else:
        raise ValueError(f"image_format must be one of {list(EXTENSIONS)}, got {image_format!r}")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# records


def reason_of(error: str | None) -> str:
    """Group key of an error string: the text before the first ':' (the whole string if none)."""
    if not error:
        return "unknown"
    return str(error).split(":", 1)[0].strip() or "unknown"


def _coerce(value: Any, typ: pa.DataType) -> Any:
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if pa.types.is_string(typ):
        if isinstance(value, str):
            return value
        if isinstance(value, (dict, list, tuple)):
            return json.dumps(storage.to_jsonable(value), sort_keys=True)
        if isinstance(value, (bytes, bytearray)):
            return "sha256:" + hashlib.sha256(bytes(value)).hexdigest()
        return str(value)
    if pa.types.is_integer(typ):
        if isinstance(value, float) and value != value:  # NaN (pandas null)
            return None
        return int(value)
    if pa.types.is_floating(typ):
        return float(value)
    return value


def normalize_record(rec: dict) -> dict:
    """A dict with exactly the RECORD_SCHEMA fields (and ``score_<NAME>``s), values coerced to the column types
    (missing -> None)."""
    out = {f.name: _coerce(rec.get(f.name), f.type) for f in RECORD_SCHEMA}
    out.update({k: _coerce(v, pa.float64()) for k, v in rec.items() if is_score_column(k)})
    return out


def records_table(records: list[dict]) -> pa.Table:
    """RECORD_SCHEMA table of ``records``: column by column (Arrow converts plain values itself); a column
    holding values Arrow cannot take as they are (numpy scalars, dicts, bytes for strings) is coerced value
    by value (``normalize_record``'s rules). Keys ``score_<NAME>`` (quality.heads) become float64 columns after
    the schema's."""
    arrays = []
    for f in RECORD_SCHEMA:
        values = [r.get(f.name) for r in records]
        try:
            arrays.append(pa.array(values, type=f.type))
        except (pa.ArrowException, TypeError, ValueError):
            arrays.append(pa.array([_coerce(v, f.type) for v in values], type=f.type))
    scores = sorted({k for r in records for k in r if is_score_column(k)})
    if not scores:
        return pa.Table.from_arrays(arrays, schema=RECORD_SCHEMA)
    extra = [pa.array([_coerce(r.get(k), pa.float64()) for r in records], pa.float64()) for k in scores]
    return pa.Table.from_arrays(arrays + extra, schema=pa.schema(
        list(RECORD_SCHEMA) + [pa.field(k, pa.float64()) for k in scores]))


def _parquet_bytes(table: pa.Table, **kw) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kw)
    return buf.getvalue()


def _check_shard(shard: str) -> str:
    if not isinstance(shard, str) or not SHARD_RE.match(shard) or ".." in shard:
        raise ValueError(f"invalid shard name {shard!r} (letters, digits, '.', '_', '-')")
    return shard


def _tar_bytes(members: Iterable[tuple[str, bytes]], mtime: float) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(mtime)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# writing


def write_shard(spec: OutputSpec, shard: str, records: list[dict], images: list[Any]) -> ShardStats:
    """Encode and write one shard in ``spec.format``, then its metadata, stats and (last) commit record.

    ``records[i]`` holds RECORD_SCHEMA fields (missing ones become null); ``images[i]`` is the uint8 HxWx3
    array of an ok record, or None for an error record (``status == "error"``). The record dicts are updated
    in place with ``key``, ``sha256``, ``path``, ``shard``, ``image_format`` (and ``status`` if missing).
    """
    t0 = time.time()
    _check_shard(shard)
    if len(records) != len(images):
        raise ValueError(f"shard {shard!r}: {len(records)} records but {len(images)} images")
    fs, root = storage.get_fs(spec.root, spec.storage_options)
    ext = spec.ext

    # An earlier attempt of this shard (a resend, a Ray retry) may have committed it: then nothing is written.
    attempt = commits.new_attempt()
    done = begin_shard(spec, shard, attempt)
    if done is not None:
        return done
    stem = commits.attempt_name(shard, attempt)  # this attempt's own object names

    # 1. validate and fill record fields
    seen: set[str] = set()
    ok_idx: list[int] = []
    for i, (rec, img) in enumerate(zip(records, images)):
        if rec.get("id") is None:
            raise ValueError(f"shard {shard!r}: record {i} has no id")
        status = rec.get("status") or ("ok" if img is not None else "error")
        rec["status"] = status
        if status == "ok":
            if img is None:
                raise ValueError(f"shard {shard!r}: record {i} (id {rec['id']!r}) is ok but has no image")
            if rec.get("image_index") is None:
                raise ValueError(f"shard {shard!r}: record {i} (id {rec['id']!r}) has no image_index")
            ok_idx.append(i)
        elif status in ("error", "filtered"):  # filtered: quality.gate kept no candidate of this image
            if img is not None:
                raise ValueError(f"shard {shard!r}: {status} record {i} (id {rec['id']!r}) has an image")
            if rec.get("image_index") is None:
                rec["image_index"] = -1
            rec["sha256"] = None
            rec["path"] = None
            rec["image_format"] = None
        else:
            raise ValueError(f"shard {shard!r}: record {i} has status {status!r} (ok | error | filtered)")
        if not rec.get("key"):
            rec["key"] = record_key(str(rec["id"]), int(rec["image_index"]))
        key = rec["key"]
        if not KEY_RE.match(key):
            raise ValueError(f"shard {shard!r}: record key {key!r} is not a safe name (no dots or slashes)")
        if key in seen:
            raise ValueError(f"shard {shard!r}: duplicate record key {key!r}")
        seen.add(key)
        rec["shard"] = shard

    # 2. encode (CPU); PNG/WebP encoders release the GIL, so threads help on multi-CPU tasks, for images
    #    large enough that the encoding outweighs a thread hand-off
    def _enc(i: int) -> bytes:
        return encode_image(images[i], spec.image_format, spec.quality, spec.png_compress_level)

    big = bool(ok_idx) and np.asarray(images[ok_idx[0]]).size > 128 * 128 * 3
    if len(ok_idx) > 1 and big:
        with cf.ThreadPoolExecutor(max_workers=min(4, len(ok_idx))) as ex:
            encoded = dict(zip(ok_idx, ex.map(_enc, ok_idx)))
    else:
        encoded = {i: _enc(i) for i in ok_idx}
    for i in ok_idx:
        rec = records[i]
        rec["sha256"] = hashlib.sha256(encoded[i]).hexdigest()
        rec["image_format"] = spec.image_format
        if spec.format == "files":
            rec["path"] = f"images/{stem}/{rec['key']}.{ext}"
        elif spec.format == "webdataset":
            rec["path"] = f"tars/{stem}.tar#{rec['key']}.{ext}"
        else:
            rec["path"] = f"data/{stem}.parquet#{rec['key']}"

    # 3. data objects
    files: list[str] = []
    nbytes = 0
    if spec.format == "files":
        items = [(records[i]["path"], encoded[i]) for i in ok_idx]

        def _put(item):
            rel, data = item
            return storage.write_bytes_atomic(fs, storage.join(root, rel), data)

        if len(items) > 1 and not storage.is_local(fs):
            with cf.ThreadPoolExecutor(max_workers=min(16, len(items))) as ex:
                nbytes += sum(ex.map(_put, items))
        else:
            nbytes += sum(_put(it) for it in items)
        files += [rel for rel, _ in items]
    elif spec.format == "webdataset":
        members = []
        for i in ok_idx:
            rec = normalize_record(records[i])
            members.append((f"{rec['key']}.{ext}", encoded[i]))
            members.append((f"{rec['key']}.json", storage.dumps_json(rec, indent=None)))
        rel = f"tars/{stem}.tar"
        nbytes += storage.write_bytes_atomic(fs, storage.join(root, rel), _tar_bytes(members, t0))
        files.append(rel)
    else:
        table = records_table(records).take(pa.array(ok_idx, pa.int64()))
        table = table.append_column(pa.field("image", pa.binary()),
                                    pa.array([encoded[i] for i in ok_idx], type=pa.binary()))
        compression = {name: "zstd" for name in RECORD_FIELDS}
        compression["image"] = "none"  # already compressed
        rel = f"data/{stem}.parquet"
        data = _parquet_bytes(table, compression=compression, row_group_size=PARQUET_IMAGE_ROW_GROUP,
                              use_dictionary=[n for n in RECORD_FIELDS])
        nbytes += storage.write_bytes_atomic(fs, storage.join(root, rel), data)
        files.append(rel)

    if spec.image_embeddings:  # each ok record's CLIP image embedding, named after the metadata object
        from kbatch.output.image_embeddings import write_shard_embeddings

        rel, n = write_shard_embeddings(fs, root, f"meta/{stem}.parquet", [records[i] for i in ok_idx])
        files.append(rel)
        nbytes += n

    if spec.fail_after_data:
        raise RuntimeError("injected write failure")

    return commit_shard(spec, shard, records, files, nbytes, t0, n_ok=len(ok_idx), attempt=attempt)

def _stats_of(shard: str, rec: dict) -> ShardStats:
    """The stats of a committed shard, from its commit record."""
    s = rec.get("stats") if isinstance(rec.get("stats"), dict) else {}
    return ShardStats(shard=shard, rows=int(rec.get("rows") or 0), images=int(rec.get("images") or 0),
                      errors=int(rec.get("errors") or 0), errors_by_reason=dict(s.get("errors_by_reason") or {}),
                      seconds=float(s.get("seconds") or 0.0), bytes=int(s.get("bytes") or 0),
                      writer=str(s.get("writer") or ""), attempt=str(rec.get("attempt") or ""))


def _refused(shard: str, rec: dict) -> ShardStats:
    """An attempt found the shard's commit record taken: the stats of the attempt that committed it, or
    ShardAborted / Fenced for an abort (``kbatch.output.shard_commit``)."""
    shard_commit.refuse_abort(shard, rec)
    return _stats_of(shard, rec)


def begin_shard(spec: OutputSpec, shard: str, attempt: str | None = None) -> ShardStats | None:
    """Before attempt ``attempt`` writes anything: the stats of the attempt that already committed ``shard``
    (then this one writes nothing), else None after recording the attempt in flight (its intent,
    ``kbatch.output.fence``; raises ``lease.Fenced`` when the run no longer holds the lease, ShardAborted when
    the name was aborted). A fenced spec needs the ``attempt``."""
    _check_shard(shard)
    rec = shard_commit.begin(spec, shard, attempt)
    return None if rec is None else _refused(shard, rec)


def commit_shard(spec: OutputSpec, shard: str, records: list[dict], files: list[str], nbytes: int, t0: float,
                 n_ok: int, attempt: str | None = None) -> ShardStats:
    """After an attempt's data objects: its metadata (all records), stats and, last, the shard's commit record,
    created exclusively. Returns the stats of the attempt that committed the shard: this one, or an earlier
    one that got there first (this attempt's objects are then removed, never read). Raises ``lease.Fenced``
    when the run no longer holds the output's lease, ShardAborted when the shard's name was aborted."""
    fs, root = storage.get_fs(spec.root, spec.storage_options)
    attempt = attempt or commits.new_attempt()
    stem = commits.attempt_name(shard, attempt)
    files = list(files)
    # 4. metadata (all records) and stats
    by_reason: dict[str, int] = {}
    for rec in records:
        if rec["status"] == "error":
            r = reason_of(rec.get("error"))
            by_reason[r] = by_reason.get(r, 0) + 1
    meta_rel = f"meta/{stem}.parquet"
    nbytes += storage.write_bytes_atomic(fs, storage.join(root, meta_rel),
                                         _parquet_bytes(records_table(records), compression="zstd"))
    files.append(meta_rel)
    n_err = sum(1 for r in records if r["status"] == "error")  # filtered records are neither
    statuses: dict[str, set] = {}
    for r in records:
        statuses.setdefault(str(r["id"]), set()).add(r["status"])
    stats = ShardStats(shard=shard, rows=len(statuses), images=n_ok, errors=n_err,
                       errors_by_reason=by_reason, seconds=0.0, bytes=0, writer=spec.writer, attempt=attempt,
                       filtered_rows=sum(1 for s in statuses.values() if s == {"filtered"}))
    stats_rel = f"stats/{stem}.json"
    stats_blob = storage.dumps_json(stats.to_dict())  # size estimate for the bytes count
    stats.bytes = nbytes + len(stats_blob)
    stats.seconds = round(time.time() - t0, 6)
    nbytes += storage.write_bytes_atomic(fs, storage.join(root, stats_rel), storage.dumps_json(stats.to_dict()))
    files.append(stats_rel)

    # 5. commit record, last: created only if the shard has none (one commit per shard, whatever attempts)
    fence = spec.fence
    commit = {"shard": shard, "attempt": attempt, "meta": meta_rel, "rows": stats.rows, "images": stats.images,
              "errors": stats.errors, "files": files, "format": spec.format, "image_format": spec.image_format,
              "stats": {k: v for k, v in stats.to_dict().items() if k in ("errors_by_reason", "seconds", "bytes",
                                                                           "writer")},
              "run_id": getattr(fence, "run_id", None), "epoch": getattr(fence, "epoch", None), "time": time.time()}
    existing = shard_commit.commit(spec, shard, attempt, commit, files)  # after a last lease check
    return stats if existing is None else _refused(shard, existing)


# ---------------------------------------------------------------------------------------------------------
# reading


def list_committed_shards(root: str, storage_options: dict | None = None) -> list[str]:
    """Names of the committed shards, sorted (a shard whose name was aborted is not committed)."""
    fs, path = storage.get_fs(root, storage_options)
    return list(commits.read_all(fs, path))


def pandas_types_mapper():
    """Arrow -> pandas dtypes keeping integers exact when nulls are present (seeds are 63-bit)."""
    import pandas as pd

    mapping = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype(), pa.int16(): pd.Int16Dtype(),
               pa.int8(): pd.Int8Dtype()}
    return mapping.get


def _conform(table: pa.Table, columns: list[str] | None) -> pa.Table:
    """Cast a metadata table to RECORD_SCHEMA (adding missing columns as nulls), optionally selecting; its
    ``score_<NAME>`` columns (quality.heads) are kept after the schema's (float64; null when absent)."""
    names = (list(columns) if columns is not None else
             list(RECORD_FIELDS) + [c for c in table.column_names if is_score_column(c)])
    arrays, fields = [], []
    for name in names:
        target = (RECORD_SCHEMA.field(name) if name in RECORD_FIELDS else
                  pa.field(name, pa.float64()) if is_score_column(name) else None)
        if name in table.column_names:
            col = table.column(name)
            if target is not None and col.type != target.type:
                col = col.cast(target.type)
            arrays.append(col)
            fields.append(pa.field(name, col.type))
        elif target is not None:
            arrays.append(pa.nulls(table.num_rows, type=target.type))
            fields.append(target)
        else:
            raise KeyError(f"unknown metadata column {name!r}")
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _committed(fs, path: str, shards: list[str] | None) -> dict[str, dict | None]:
    """``{shard: its commit record}`` of every committed shard, read once; for named ``shards``, their
    records are read by ``_read_meta`` (None here)."""
    if shards is None:
        return commits.read_all(fs, path)
    return dict.fromkeys(shards)


def _read_meta(fs, path: str, shard: str, cols: list[str] | None, rec: dict | None = None) -> pa.Table:
    """One shard's metadata (``cols`` only; None: every column), conformed to RECORD_SCHEMA: the metadata
    object its commit record (``rec``, read here when not given) names (no rows when the shard has no
    commit: readers trust nothing else)."""
    if rec is None:
        rec = commits.read(fs, path, shard)
    if not commits.is_commit(rec):
        return _conform(RECORD_SCHEMA.empty_table(), cols)
    data = fs.cat_file(storage.join(path, commits.meta_file(shard, rec)))
    pf = pq.ParquetFile(io.BytesIO(data))
    present = set(pf.schema_arrow.names)
    t = pf.read(columns=[c for c in cols if c in present] if cols is not None else None)
    return _conform(t, cols)


def iter_records_tables(root: str, columns: list[str] | None = None, storage_options: dict | None = None,
                        shards: list[str] | None = None, *, newest_first: bool = False, read_ahead: int = 8):
    """``(shard, Arrow table of its metadata)`` for each committed shard (``shards``: those names), one at a
    time, in shard order (``newest_first``: reversed), ``columns`` only, with at most ``read_ahead`` shards
    read ahead on threads: every record of an output of any size, holding a few shards at a time."""
    import collections

    fs, path = storage.get_fs(root, storage_options)
    recs = _committed(fs, path, shards)
    names = list(recs)
    if newest_first:
        names.reverse()
    cols = list(columns) if columns is not None else None
    unknown = [c for c in cols or [] if c not in RECORD_FIELDS and not is_score_column(c)]
    if unknown:
        raise KeyError(f"unknown metadata columns {unknown}; known: {list(RECORD_FIELDS)}")
    if not names:
        return
    todo = iter(names)
    pending: collections.deque = collections.deque()
    ex = cf.ThreadPoolExecutor(max_workers=max(1, min(read_ahead, len(names))))
    try:
        for name in todo:
            pending.append((name, ex.submit(_read_meta, fs, path, name, cols, recs[name])))
            if len(pending) >= max(1, read_ahead):
                break
        while pending:
            name, fut = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, ex.submit(_read_meta, fs, path, nxt, cols, recs[nxt])))
            yield name, fut.result()
    finally:  # also when the caller stops early: drop what was read ahead
        for _, fut in pending:
            fut.cancel()
        ex.shutdown(wait=True)


def read_records_table(root: str, columns: list[str] | None = None, storage_options: dict | None = None,
                       shards: list[str] | None = None) -> pa.Table:
    """Arrow table of the metadata of committed shards (``shards`` narrows to those names)."""
    fs, path = storage.get_fs(root, storage_options)
    recs = _committed(fs, path, shards)
    committed = list(recs)
    cols = list(columns) if columns is not None else None
    if cols is not None:
        unknown = [c for c in cols if c not in RECORD_FIELDS and not is_score_column(c)]
        if unknown:
            raise KeyError(f"unknown metadata columns {unknown}; known: {list(RECORD_FIELDS)}")

    def _read(shard: str) -> pa.Table:
        return _read_meta(fs, path, shard, cols, recs[shard])

    if not committed:
        return _conform(RECORD_SCHEMA.empty_table(), cols)
    if len(committed) == 1:
        tables = [_read(committed[0])]
    else:
        with cf.ThreadPoolExecutor(max_workers=min(16, len(committed))) as ex:
            tables = list(ex.map(_read, committed))
    return pa.concat_tables(tables, promote_options="default")  # score_<NAME> columns: shards may differ


def current(table: pa.Table, order=None) -> pa.Table:
    """The records that stand: a row rendered again (``--retry-failed``, or a failed row that changed)
    supersedes its old error records. Per id: its ok (and ``filtered``: quality.gate) records if it has any,
    else its latest error record: of the latest run in ``order`` (``job_file.RunOrder``: ``_job.json``'s
    runs list; None: by run id)."""
    from kbatch.output.job_file import RunOrder

    order = order or RunOrder([])
    if table.num_rows == 0 or "status" not in table.column_names or "id" not in table.column_names:
        return table
    ids = table.column("id").to_pylist()
    status = table.column("status").to_pylist()
    runs = table.column("run_id").to_pylist() if "run_id" in table.column_names else [""] * len(ids)
    stands = ("ok", "filtered")
    has_ok = {i for i, s in zip(ids, status) if s in stands}
    latest_error: dict = {}
    for k, (i, s, r) in enumerate(zip(ids, status, runs)):
        if s not in stands and i not in has_ok and (i not in latest_error
                                                    or order.key(r) >= order.key(runs[latest_error[i]])):
            latest_error[i] = k
    keep = [s in stands or latest_error.get(i) == k for k, (i, s) in enumerate(zip(ids, status))]
    return table if all(keep) else table.filter(pa.array(keep))


def read_records(root: str, columns: list[str] | None = None, storage_options: dict | None = None,
                 superseded: bool = False):
    """pandas DataFrame of the metadata records of committed shards, in shard order: ok records and the
    error records that stand (``current``; ``superseded=True``: every record ever committed).

    Empty (with the schema's columns) when nothing is committed. Integer columns use pandas' nullable
    integer dtypes so that 63-bit seeds stay exact."""
    cols = None if columns is None else list(dict.fromkeys(list(columns) + ["id", "status", "run_id"]))
    table = read_records_table(root, cols, storage_options)
    if not superseded:
        from kbatch.output.job_file import RunOrder, runs_of

        table = current(table, RunOrder(runs_of(root, storage_options)))
    if columns is not None:
        table = table.select(list(columns))
    return table.to_pandas(types_mapper=pandas_types_mapper())


def sample_records(root: str, storage_options: dict | None = None, max_ok: int = 200, max_errors: int = 1000,
                   *, errors: bool = True):
    """A bounded sample of the records (for the gallery): :func:`summarize_records`'s sample."""
    return summarize_records(root, storage_options, max_ok, max_errors, count=False, errors=errors)[0]


def summarize_records(root: str, storage_options: dict | None = None, max_ok: int = 200, max_errors: int = 1000,
                      *, count: bool = True, errors: bool = True):
    """``(sample DataFrame, counts)`` of an output, in memory bounded by a few shards whatever its size.

    The sample (every column): the ok records of the newest committed shards (read newest first until
    ``max_ok`` are in; the first ``max_ok`` of those shards' ok records in shard order), then (``errors``) up
    to ``max_errors`` of the error records that stand: of ids with no ok record in any shard, each id's
    latest, in shard order. ``counts``: ``shards`` (committed), and with ``count`` also ``rows`` (distinct
    ids), ``images`` (ok records) and ``errors`` (ids whose records are all errors), exact for every shard.

    Reads the id and status columns of every shard one shard at a time (of the newest shards only, until the
    sample is in, when neither ``count`` nor ``errors``), once more when there are error records (to match
    the failed ids with ok records in other shards), and every column of the few shards the sample comes
    from. Holds at once: a few shards' id/status columns, the sample, and the id/status of the failed ids'
    records. An id is taken to be in one shard unless it has an error record (the writers never commit the
    ok records of one id twice)."""
    import pandas as pd
    import pyarrow.compute as pc

    names = list_committed_shards(root, storage_options)
    order = {s: i for i, s in enumerate(names)}
    everything = count or errors
    picks: dict[str, list[int]] = {}  # newest shards' ok rows, until max_ok are in
    n_ok = images = distinct = 0
    err_ids: list[pa.Array] = []
    for shard, t in iter_records_tables(root, ["id", "status"] if everything else ["status"], storage_options,
                                        names, newest_first=True):
        ok = np.asarray(pc.fill_null(pc.equal(t.column("status"), "ok"), False), dtype=bool)
        stands = ok | np.asarray(pc.fill_null(pc.equal(t.column("status"), "filtered"), False), dtype=bool)
        if n_ok < max_ok and ok.any():
            picks[shard] = np.flatnonzero(ok).tolist()
            n_ok += int(ok.sum())
        if not everything:
            if n_ok >= max_ok:
                break
            continue
        images += int(ok.sum())
        if count:
            distinct += pc.count_distinct(t.column("id")).as_py()
        if not stands.all():  # filtered records (quality.gate) stand like ok ones: not failures
            err_ids.append(t.column("id").filter(pa.array(~stands)))
    ok_list = [(s, r) for s in sorted(picks, key=order.get) for r in picks[s]][:max(0, int(max_ok))]

    err_list: list[tuple[str, int]] = []
    overlap = standing = 0
    if err_ids:  # the failed ids' records in every shard: which stand, and which ids are in several shards
        failed = pc.unique(pa.chunked_array(err_ids).combine_chunks())
        del err_ids
        parts = []
        for shard, t in iter_records_tables(root, ["id", "status"], storage_options, names):
            hit = np.asarray(pc.fill_null(pc.is_in(t.column("id"), value_set=failed), False), dtype=bool)
            if hit.any():
                sub = t.filter(pa.array(hit))
                parts.append(pd.DataFrame({
                    "id": sub.column("id").to_pylist(),
                    "ok": np.asarray(pc.fill_null(pc.is_in(sub.column("status"), value_set=pa.array(
                        ["ok", "filtered"])), False), dtype=bool),
                    "shard": order[shard], "row": np.flatnonzero(hit)}))
        f = pd.concat(parts, ignore_index=True)
        has_ok = f.groupby("id", sort=False)["ok"].any()
        overlap = int((f.groupby("id", sort=False)["shard"].nunique() - 1).sum())
        stand = has_ok.index[~has_ok.to_numpy()]
        standing = len(stand)
        if errors:
            e = f[~f["ok"] & f["id"].isin(stand)].sort_values(["shard", "row"], kind="stable")
            e = e.drop_duplicates("id", keep="last").head(max(0, int(max_errors)))
            err_list = [(names[s], int(r)) for s, r in zip(e["shard"], e["row"])]
        del f, parts

    counts: dict[str, int] = {"shards": len(names)}
    if count:
        counts.update(rows=distinct - overlap, images=images, errors=standing)
    want: dict[str, list[tuple[int, int]]] = {}  # shard -> [(row, position in the sample)]
    for k, (s, r) in enumerate(ok_list + err_list):
        want.setdefault(s, []).append((r, k))
    frames = []
    for shard, t in iter_records_tables(root, None, storage_options, sorted(want, key=order.get)):
        rows, keys = zip(*want[shard])
        sub = t.take(pa.array(rows, pa.int64())).to_pandas(types_mapper=pandas_types_mapper())
        sub["_k"] = keys
        frames.append(sub)
    if not frames:
        return _conform(RECORD_SCHEMA.empty_table(), None).to_pandas(types_mapper=pandas_types_mapper()), counts
    df = pd.concat(frames, ignore_index=True).sort_values("_k", kind="stable").drop(columns="_k")
    return df.reset_index(drop=True), counts
