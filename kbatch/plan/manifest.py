"""Reading the input manifest: a Parquet file, a folder of Parquet files, or a glob; local or fsspec URL.

A manifest is streamed, never loaded whole: :class:`ManifestSource` lists the files (sorted by path), checks
their schemas from the Parquet footers (no data read), and yields record batches of the columns asked for,
file by file (``ParquetFile.iter_batches`` reads a row group page by page, so memory is one batch plus
Arrow's read buffers, whatever the row-group size). A row's *position* is its index in the whole manifest
(files in path order); it names rows whose id is unusable (``_row<position>``) and lets the planner's
passes line up.

:func:`read_manifest` reads everything into one table: for tests and small tools only.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

REQUIRED_COLUMNS = ("id", "prompt")
IMAGE_COLUMNS = ("init_image", "mask")  # bytes or URIs: the type may differ from file to file
_MAGIC = "*?["


class ManifestError(ValueError):
    """The manifest cannot be read as a whole (not found, not Parquet, required columns missing)."""


def _is_local(fs) -> bool:
    protos = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protos or "local" in protos


def _uri(fs, path: str) -> str:
    """A path of ``fs`` as a full URI (absolute path for the local file system)."""
    if _is_local(fs):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def _parent(path: str) -> str:
    path = path.rstrip("/")
    if "/" not in path:
        return ""
    parent = path.rsplit("/", 1)[0]
    return parent or "/"


def _list_parquet(fs, folder: str) -> list[str]:
    out = []
    for info in fs.ls(folder, detail=True):
        name = info["name"]
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") == "directory" or base.startswith((".", "_")):
            continue  # hidden / _SUCCESS / _metadata-style files are not data
        if base.lower().endswith(".parquet"):
            out.append(name)
    return sorted(out)


def list_manifest_files(uri: str, storage_options: dict | None = None) -> tuple[object, list[str], str]:
    """Resolve a manifest URI to ``(fs, sorted parquet paths, base folder URI)`` without reading data."""
    import fsspec

    if not isinstance(uri, str) or not uri.strip():
        raise ManifestError(f"manifest must be a file, folder or glob URI, got {uri!r}")
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except Exception as e:  # noqa: BLE001 - unknown protocol, missing optional package, bad options
        raise ManifestError(f"manifest {uri!r} cannot be opened: {type(e).__name__}: {e}") from None
    try:
        if any(c in path for c in _MAGIC):
            first = min(path.index(c) for c in _MAGIC if c in path)
            prefix = path[:first]
            base = prefix.rstrip("/") if prefix.endswith("/") else _parent(prefix)
            if _is_local(fs) and not base:
                base = os.getcwd()
            matches = [p for p in sorted(fs.glob(path)) if not fs.isdir(p)]
            files = [p for p in matches if p.rstrip("/").rsplit("/", 1)[-1].lower().endswith(".parquet")]
            if matches and not files:
                raise ManifestError(f"manifest {uri!r}: the glob matches no '.parquet' files "
                                    f"(matched e.g. {_uri(fs, matches[0])!r})")
            if not files:
                raise ManifestError(f"manifest {uri!r}: no files match the glob")
        elif fs.isdir(path):
            base = path
            files = _list_parquet(fs, path)
            if not files:
                raise ManifestError(f"manifest {uri!r}: the folder holds no '.parquet' files")
        elif fs.exists(path):
            base = _parent(path)
            files = [path]
        else:
            raise ManifestError(f"manifest {uri!r} not found")
    except ManifestError:
        raise
    except Exception as e:  # noqa: BLE001 - permissions, credentials, network
        raise ManifestError(f"manifest {uri!r} cannot be listed: {type(e).__name__}: {e}") from None
    return fs, files, _uri(fs, base)


def _string_like(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))


@dataclass
class ManifestFile:
    path: str  # in the file system's own form (no protocol)
    rows: int
    schema: pa.Schema
    stamp: str  # size + modification time / ETag: a file rewritten between passes is noticed


@dataclass
class ManifestSource:
    """A manifest to stream: Parquet files in path order, or an in-memory table (``kbatch.render`` of a
    DataFrame). ``base_uri``: the folder relative URIs in the manifest resolve against."""

    uri: str
    base_uri: str
    files: list[ManifestFile] = field(default_factory=list)
    fs: object = None
    table: pa.Table | None = None
    storage_options: dict | None = None
    _starts: list = field(default_factory=list, repr=False)  # position of each file's first row
    read_columns: list[str] | None = None  # the columns rows are read with (None: all)

    @classmethod
    def open(cls, uri: str, storage_options: dict | None = None) -> "ManifestSource":
        """List and check the files (footers only). Raises :class:`ManifestError` naming the URI: nothing
        matches, a file is not Parquet, files have incompatible schemas, required columns are missing or
        not strings."""
        fs, paths, base = list_manifest_files(uri, storage_options)
        from kbatch.storage import absolute_local

        return cls.from_files(fs, paths, base, absolute_local(uri), storage_options)

    @classmethod
    def from_files(cls, fs, paths: list[str], base_uri: str, uri: str, storage_options: dict | None = None,
                   required: tuple[str, ...] = REQUIRED_COLUMNS) -> "ManifestSource":
        def footer(p: str) -> ManifestFile:
            shown = _uri(fs, p)
            try:
                info = fs.info(p)
                with fs.open(p, "rb") as fh:
                    meta = pq.ParquetFile(fh).metadata
                    schema = meta.schema.to_arrow_schema()
            except FileNotFoundError:
                raise ManifestError(f"manifest file {shown!r} not found") from None
            except (pa.ArrowException, OSError, ValueError) as e:
                raise ManifestError(f"manifest file {shown!r} is not a valid Parquet file: {e}") from None
            stamp = json.dumps([info.get("size"), str(info.get("mtime") or info.get("LastModified") or ""),
                                str(info.get("ETag") or info.get("etag") or "")])
            _check_schema(schema, shown, required)
            return ManifestFile(p, meta.num_rows, schema, stamp)

        with ThreadPoolExecutor(max_workers=min(16, max(1, len(paths)))) as pool:  # object stores: in parallel
            files = list(pool.map(footer, paths))
        _check_compatible([f.schema for f in files], uri)
        src = cls(uri, base_uri, files, fs, None, storage_options)
        src._starts = list(itertools.accumulate([0] + [f.rows for f in files]))
        return src

    @classmethod
    def from_table(cls, table: pa.Table, base_uri: str, uri: str = "<in-memory>") -> "ManifestSource":
        _check_schema(table.schema, uri)
        return cls(uri, base_uri, [], None, table, None)

    @property
    def total(self) -> int:
        return self.table.num_rows if self.table is not None else sum(f.rows for f in self.files)

    @property
    def columns(self) -> list[str]:
        """Every column name in any file, in first-seen order."""
        if self.table is not None:
            return list(self.table.column_names)
        seen: dict[str, None] = {}
        for f in self.files:
            seen.update(dict.fromkeys(f.schema.names))
        return list(seen)

    def stamp(self) -> str | None:
        """A digest of the files' names, sizes and modification stamps; None for an in-memory table."""
        if self.table is not None:
            return None
        return hashlib.sha256(json.dumps([(f.path, f.stamp) for f in self.files]).encode()).hexdigest()[:16]

    def batches(self, columns: list[str] | None = None, batch_size: int = 4096
                ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """``(position of the first row, record batch)`` over the whole manifest, in order. ``columns``:
        the columns wanted (those a file lacks are simply absent from its batches); default
        ``read_columns``."""
        columns = columns or self.read_columns
        if self.table is not None:
            t = self.table.select([c for c in columns if c in self.table.column_names]) if columns else self.table
            pos = 0
            for b in t.to_batches(max_chunksize=batch_size):
                yield pos, b
                pos += b.num_rows
            return
        pos = 0
        for f in self.files:
            shown = _uri(self.fs, f.path)
            try:
                with self.fs.open(f.path, "rb") as fh:
                    pf = pq.ParquetFile(fh)
                    if pf.metadata.num_rows != f.rows:
                        raise ManifestError(f"manifest file {shown!r} changed while the job reads it "
                                            f"({f.rows} rows when listed, {pf.metadata.num_rows} now)")
                    cols = [c for c in columns if c in f.schema.names] if columns else None
                    if cols == []:  # none of the wanted columns: rows still count
                        for start in range(0, f.rows, batch_size):
                            n = min(batch_size, f.rows - start)
                            yield pos, pa.RecordBatch.from_pydict({"__row": pa.nulls(n)})
                            pos += n
                        continue
                    for b in pf.iter_batches(batch_size=batch_size, columns=cols):
                        yield pos, b
                        pos += b.num_rows
            except ManifestError:
                raise
            except (pa.ArrowException, OSError, ValueError) as e:
                raise ManifestError(f"manifest file {shown!r} cannot be read: {type(e).__name__}: {e}") from None

    def locate(self, position: int) -> tuple[str, int]:
        """(file URI, row index in that file) of a manifest position."""
        i = bisect.bisect_right(self._starts, position) - 1
        if not 0 <= i < len(self.files) or position < 0:
            raise IndexError(position)
        return _uri(self.fs, self.files[i].path), position - self._starts[i]


def _check_schema(schema: pa.Schema, shown: str, required: tuple[str, ...] = REQUIRED_COLUMNS) -> None:
    names = schema.names
    missing = [c for c in required if c not in names]
    if missing:
        raise ManifestError(f"manifest {shown!r} is missing required column(s) {missing}; found columns {names}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ManifestError(f"manifest {shown!r} has duplicate column name(s) {dup}")
    for c in required:
        t = schema.field(c).type
        if not _string_like(t):
            raise ManifestError(f"manifest {shown!r}: column {c!r} must be string, got {t}")


def _check_compatible(schemas: list[pa.Schema], uri: str) -> None:
    """Files must agree on column types (up to nulls and widening); init_image / mask may be bytes in one
    file and URIs in another (each row is read as it is)."""
    if len(schemas) < 2:
        return
    trimmed = [pa.schema([f for f in s if f.name not in IMAGE_COLUMNS]) for s in schemas]
    try:
        pa.unify_schemas(trimmed, promote_options="permissive")
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise ManifestError(f"manifest {uri!r}: the files have incompatible schemas: {e}") from None


def _split_image_columns(tables: list[pa.Table]) -> list[pa.Table]:
    """Files may hold ``init_image`` / ``mask`` as bytes in one and URIs in another; Arrow would turn the
    URIs into bytes when joining them. String columns then move to ``init_image_uri`` / ``mask_uri``."""
    for col in IMAGE_COLUMNS:
        types = {t.schema.field(col).type for t in tables if col in t.column_names}
        if len(types) > 1:
            tables = [t.rename_columns([f"{c}_uri" if c == col and (pa.types.is_string(t.schema.field(c).type)
                                        or pa.types.is_large_string(t.schema.field(c).type)) else c
                                        for c in t.column_names]) for t in tables]
    return tables


def read_manifest(uri: str, storage_options: dict | None = None) -> tuple[pa.Table, str]:
    """The whole manifest as one table (files concatenated in path order, schemas unified permissively)
    and its base URI. For tests and small tools: jobs stream it (:class:`ManifestSource`)."""
    src = ManifestSource.open(uri, storage_options)
    tables = []
    for f in src.files:
        with src.fs.open(f.path, "rb") as fh:
            tables.append(pq.read_table(fh))
    tables = _split_image_columns(tables)
    try:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise ManifestError(f"manifest {uri!r}: the files have incompatible schemas: {e}") from None
    return table, src.base_uri


def embeddings_source(uri: str, storage_options: dict | None = None, limits=None):
    """An embeddings output as a manifest (``stage: decoder``): its committed shards' ``embeddings/*.parquet``
    files, streamed like any manifest (the embedding columns are read by the decoding tasks, not the driver).
    Relative URIs resolve against the prior job's own manifest folder, but are read only under the decoding
    job's own ``limits.allowed_roots`` (``limits``: when empty, it becomes the embeddings output's location):
    a root named by the embeddings output (its ``_job.json``) is never trusted."""
    if limits is not None and not limits.allowed_roots:
        limits.allowed_roots = [uri]
    from kbatch import storage
    from kbatch.output.embeddings import CELL_FIELDS
    from kbatch.output.job_file import JOB_FILE

    fs, root = storage.get_fs(uri, storage_options)
    from kbatch.output import commits

    # the file each commit record names (an attempt's own name; records without attempts: <shard>.parquet)
    paths = [storage.join(root, commits.data_file(rec, "embeddings") or f"embeddings/{s}.parquet")
             for s, rec in commits.read_all(fs, root).items()]
    paths = [p for p in paths if fs.exists(p)]
    if not paths:
        raise ManifestError(f"manifest {uri!r} holds no committed prior embeddings (write them with stage: prior)")
    prior_job = storage.read_json(uri, JOB_FILE, storage_options) or {}
    src = ManifestSource.from_files(fs, paths, prior_job.get("manifest_base") or uri, uri, storage_options)
    src.read_columns = [name for name, _ in CELL_FIELDS]  # not the embeddings: the decoding tasks read those
    return src
