"""Small files by name below an output root: JSON encoding, atomic JSON writes, reads, existence, removal.

Each function takes the root as a URL (or local path) plus fsspec ``storage_options`` and a relative name
(checked: no absolute paths, no ``..``), so that it can run in any process, Ray workers included.
"""
from __future__ import annotations

import json
import math
import posixpath
from typing import Any

from kbatch.storage.atomic import write_bytes_atomic
from kbatch.storage.paths import check_relative, get_fs, join


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays to Python, NaN/inf to null, bytes to a short marker."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        import hashlib

        return "sha256:" + hashlib.sha256(bytes(obj)).hexdigest()
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item):
        try:
            return to_jsonable(item())
        except (TypeError, ValueError):
            pass
    tolist = getattr(obj, "tolist", None)  # numpy arrays
    if callable(tolist):
        return to_jsonable(tolist())
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return str(obj)


def dumps_json(obj: Any, indent: int | None = 2) -> bytes:
    return json.dumps(to_jsonable(obj), indent=indent, sort_keys=False, allow_nan=False).encode("utf-8")


def write_json_atomic(uri_root: str, name: str, obj: Any, storage_options: dict | None = None) -> str:
    """Write ``obj`` as JSON to ``<uri_root>/<name>`` atomically; returns the filesystem path written."""
    fs, root = get_fs(uri_root, storage_options)
    path = join(root, check_relative(name))
    write_bytes_atomic(fs, path, dumps_json(obj))
    return path


def read_bytes(uri_root: str, name: str, storage_options: dict | None = None) -> bytes | None:
    fs, root = get_fs(uri_root, storage_options)
    try:
        return fs.cat_file(join(root, check_relative(name)))
    except FileNotFoundError:
        return None


def read_json(uri_root: str, name: str, storage_options: dict | None = None) -> dict | None:
    """The JSON object stored at ``<uri_root>/<name>``, or None if there is none."""
    data = read_bytes(uri_root, name, storage_options)
    if data is None:
        return None
    return json.loads(data.decode("utf-8"))


def exists(uri_root: str, name: str, storage_options: dict | None = None) -> bool:
    fs, root = get_fs(uri_root, storage_options)
    path = join(root, check_relative(name))
    try:
        fs.invalidate_cache(posixpath.dirname(path))
    except Exception:  # noqa: BLE001
        pass
    return bool(fs.exists(path))


def remove(uri_root: str, name: str, storage_options: dict | None = None) -> None:
    """Delete ``<uri_root>/<name>``; no error if it is missing."""
    fs, root = get_fs(uri_root, storage_options)
    path = join(root, check_relative(name))
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    try:
        fs.invalidate_cache(posixpath.dirname(path))
    except Exception:  # noqa: BLE001
        pass
