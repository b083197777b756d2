"""What a ``models.*`` value is and which of its files travel: ``sim``, a local folder, an fsspec URL or a hub id;
listings of a folder (local or remote) restricted to safe, relative, pickle-free names.

Only safetensors weights and the small json/txt/model files travel; ``.bin``/``.ckpt``/``.pt`` never do
(pickles run code when loaded). A listed name becomes a path in the node's cache only when it is a relative
name inside the folder (``decoder//etc/x.json`` would name ``/etc/x.json``). See docs/models.md.
"""
from __future__ import annotations

import logging
import os
import re

log = logging.getLogger("kbatch")

#: Files a model folder needs besides its weights; anything else is not copied.
CONFIG_SUFFIXES = (".json", ".txt", ".model")
#: Weight formats that unpickle (run code) when loaded: never copied, never loaded.
UNSAFE_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle", ".msgpack", ".h5")
#: What huggingface_hub fetches of a hub repo: the pipeline index and its components' safetensors + configs.
HUB_PATTERNS = ["model_index.json", "*/*.safetensors", "*/*.json", "*/*.txt", "*/*.model"]
HUB_TIMEOUT = 10.0  # seconds for one question to the hub from the driver

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_sim(uri) -> bool:
    """``sim`` stands for simulated models: nothing to check, stage or load."""
    return isinstance(uri, str) and uri.strip() == "sim"


def model_kind(uri) -> str:
    """``"sim" | "local" | "url" | "hub"``.

    A folder that exists here is local even if it looks like ``owner/name`` (as diffusers decides); a value
    with a protocol is a URL (``file://`` is local); ``owner/name`` that is not a folder here is a hub id;
    anything else is a local path (that may not exist: ``check_model`` says so).
    """
    uri = str(uri)
    if is_sim(uri):
        return "sim"
    proto, sep, _ = uri.partition("://")
    if sep:
        return "local" if proto in ("file", "local") else "url"
    if os.path.isdir(os.path.expanduser(uri)):
        return "local"
    if _HUB_ID.match(uri) and ".." not in uri and "--" not in uri:
        return "hub"
    return "local"




def _local_path(uri: str) -> str:
    uri = str(uri)
    if "://" in uri:
        uri = uri.split("://", 1)[1]
    return os.path.abspath(os.path.expanduser(uri))


def _fs(uri: str, storage_options: dict | None):
    import fsspec

    return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def safe_name(rel: str) -> bool:
    """A name from a listing that can become a path inside the model folder (and the node's cache): relative,
    no empty, ``.`` or ``..`` segment (``decoder//etc/x.json`` would name ``/etc/x.json``), no backslash."""
    from kbatch.storage import check_relative

    try:
        check_relative(rel)
    except ValueError:
        return False
    return True


def wanted(rel: str) -> bool:
    """Whether a file (path relative to the model folder) is part of a loadable, pickle-free copy."""
    if not safe_name(rel):
        return False
    parts = rel.split("/")
    if any(p.startswith(".") for p in parts):
        return False
    if len(parts) == 1:
        return rel == "model_index.json"
    return rel.endswith(".safetensors") or rel.endswith(CONFIG_SUFFIXES)



def _local_names(root: str) -> set[str]:
    out = set()
    for dirpath, _, files in os.walk(root):
        for f in files:
            out.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return out


def _remote_listing(fs, root: str) -> dict[str, dict]:
    """{relative path: fsspec info} of every file under ``root``."""
    base = root.rstrip("/")
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for path, info in found.items():
        path = path.rstrip("/")
        if info.get("type") == "directory" or not path.startswith(base + "/"):
            continue
        rel = path[len(base) + 1:]
        if not safe_name(rel):  # a key like "decoder//etc/x.json": never a path outside the folder
            log.warning("ignoring %r under %s: not a relative name inside the model folder", rel, root)
            continue
        out[rel] = info
    return out

