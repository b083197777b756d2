"""Where things are: local paths and fsspec URLs, their protocols, joining and listing names below a root.

Everything here is a plain function (picklable, usable inside Ray tasks) and keeps no global state of its own
(fsspec's own instance cache aside). Paths returned by :func:`get_fs` are filesystem paths *without* the
protocol; :func:`join` builds paths below them. Temp files (``<name>.tmp-<uuid>``, :data:`TMP_MARK`) are never
listed.
"""
from __future__ import annotations

import os
import posixpath

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"

# Object stores (and fsspec's in-memory store): one put is atomic per object, there are no real directories.
_OBJECT_STORE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "memory", "az", "abfs", "abfss", "adl", "oss", "r2"}


def get_fs(uri: str, storage_options: dict | None = None):
    """``(fs, root_path)`` for a local path or fsspec URL (``root_path`` has no protocol and no trailing '/')."""
    if not uri:
        raise ValueError("empty output URI")
    fs, path = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    if path != "/":
        path = path.rstrip("/")
    return fs, path


def protocol_problem(uri: str) -> str | None:
    """Why fsspec cannot open ``uri`` here (an unknown protocol, or its package is not installed), or None.
    Only looks up the filesystem class: no connection, no credentials."""
    for part in str(uri).split("::"):  # chained URLs: simplecache::s3://...
        proto, _ = fsspec.core.split_protocol(part)
        if proto in (None, "file", "local"):
            continue
        try:
            fsspec.get_filesystem_class(proto)
        except (ImportError, ValueError) as e:
            return str(e) or type(e).__name__
    return None


def node_local(uri) -> bool:
    """True for a local path (or ``file://``): on a cluster, each node has its own unless it is a shared mount."""
    if not isinstance(uri, str):
        return False
    proto, _ = fsspec.core.split_protocol(uri.split("::")[-1])
    return proto in (None, "file", "local")


def absolute_local(uri: str) -> str:
    """A plain local path made absolute against this process's directory: Ray workers run in the directory
    Ray was started in, which need not be the driver's (a running cluster, a notebook that changed directory).
    URLs (``file://`` included) are returned as they are."""
    if not isinstance(uri, str) or "://" in uri or "::" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def absolute_if_exists(uri: str) -> str:
    """A plain local path that exists here (a model folder), made absolute; anything else (a hub id, a URL)
    unchanged."""
    if isinstance(uri, str) and "://" not in uri and os.path.exists(os.path.expanduser(uri)):
        return absolute_local(uri)
    return uri


def process_local(uri) -> bool:
    """True for fsspec's in-memory filesystem (``memory://``): its files live in the memory of one process, so
    only the driver of a job (the process that plans it and reads the results) can write or read them."""
    return isinstance(uri, str) and uri.lower().startswith("memory:")


def join(root: str, *parts: str) -> str:
    """Join path parts with '/' (also for URLs); empty parts are skipped."""
    out = root.rstrip("/") if root != "/" else root
    for p in parts:
        p = str(p).strip("/")
        if not p:
            continue
        out = p if not out else (out + p if out.endswith("/") else f"{out}/{p}")
    return out


def check_relative(name: str) -> str:
    """A relative name inside an output root: no absolute paths, no '..' components, no backslashes."""
    n = str(name)
    if not n or n.startswith("/") or "\\" in n or "://" in n:
        raise ValueError(f"invalid relative name {name!r}")
    parts = n.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid relative name {name!r}")
    return n


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def _protocols(fs) -> set[str]:
    p = fs.protocol
    return {p} if isinstance(p, str) else set(p)


def renames_atomically(fs) -> bool:
    """True where write-to-temp-then-rename is the atomic way to publish a file."""
    return is_local(fs) or not (_protocols(fs) & _OBJECT_STORE_PROTOCOLS)


def display_path(fs, path: str) -> str:
    """What to show users: a plain path for the local filesystem, a URL otherwise."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def list_names(fs, dir_path: str, suffix: str = "", dirs: bool = False) -> list[str]:
    """Base names of the entries directly under ``dir_path`` ending with ``suffix`` (files, or folders if
    ``dirs``), skipping temp files; [] when the folder does not exist. Always a fresh listing."""
    try:
        fs.invalidate_cache(dir_path)
    except Exception:  # noqa: BLE001
        pass
    try:
        entries = fs.ls(dir_path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    finally:  # and leave no listing behind: s3fs answers later reads of this folder from a cached listing,
        try:  # so an object created after it (the next shard's meta) would read as missing in this process
            fs.invalidate_cache(dir_path)
        except Exception:  # noqa: BLE001
            pass
    out = []
    for e in entries:
        name = posixpath.basename(str(e["name"]).rstrip("/"))
        kind = e.get("type")
        if TMP_MARK in name or not name.endswith(suffix):
            continue
        if dirs and kind != "directory":
            continue
        if not dirs and kind == "directory":
            continue
        out.append(name[: len(name) - len(suffix)] if suffix else name)
    return sorted(set(out))
