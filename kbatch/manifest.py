"""Reading the input manifest: a Parquet file, a folder of Parquet files, or a glob; local or fsspec URL."""
from __future__ import annotations

import os

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

REQUIRED_COLUMNS = ("id", "prompt")
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


def _split_image_columns(tables: list[pa.Table]) -> list[pa.Table]:
    """Files may hold ``init_image`` / ``mask`` as bytes in one and URIs in another; Arrow would turn the
    URIs into bytes when joining them. String columns then move to ``init_image_uri`` / ``mask_uri``."""
    for col in ("init_image", "mask"):
        types = {t.schema.field(col).type for t in tables if col in t.column_names}
        if len(types) > 1:
            tables = [t.rename_columns([f"{c}_uri" if c == col and (pa.types.is_string(t.schema.field(c).type)
                                        or pa.types.is_large_string(t.schema.field(c).type)) else c
                                        for c in t.column_names]) for t in tables]
    return tables


def read_manifest(uri: str, storage_options: dict | None = None) -> tuple[pa.Table, str]:
    """Read a manifest: returns ``(table, base_uri)``.

    ``table`` concatenates all files (sorted by path; schemas unified permissively). ``base_uri`` is the
    folder relative URIs in the manifest resolve against: the file's folder, the folder itself, or the folder
    part of a glob before its first wildcard; an absolute local path, or a full URI (``s3://bucket/prompts``).

    Raises :class:`ManifestError` naming the URI: nothing matches, a file is not Parquet, files have
    incompatible schemas, required columns (``id``, ``prompt``) are missing or not strings.
    """
    fs, files, base = list_manifest_files(uri, storage_options)
    def read(p):
        shown = _uri(fs, p)
        try:
            with fs.open(p, "rb") as fh:
                return pq.read_table(fh)
        except FileNotFoundError:
            raise ManifestError(f"manifest file {shown!r} not found") from None
        except (pa.ArrowException, OSError, ValueError) as e:
            raise ManifestError(f"manifest file {shown!r} is not a valid Parquet file: {e}") from None

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(files)))) as pool:  # object stores: in parallel
        tables = list(pool.map(read, files))
    tables = _split_image_columns(tables)
    try:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise ManifestError(f"manifest {uri!r}: the files have incompatible schemas: {e}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"manifest {uri!r} is missing required column(s) {missing}; "
                            f"found columns {table.column_names}")
    dup = sorted({n for n in table.column_names if table.column_names.count(n) > 1})
    if dup:
        raise ManifestError(f"manifest {uri!r} has duplicate column name(s) {dup}")
    for c in REQUIRED_COLUMNS:
        t = table.schema.field(c).type
        if not _string_like(t):
            raise ManifestError(f"manifest {uri!r}: column {c!r} must be string, got {t}")
    return table, base
