"""Same weights? Whether two component folders hold the same module (the inpaint model shares the decoder's
text encoder and MoVQ when they are equal), decided from file hashes known without reading (a staged copy's
journal, huggingface_hub's blob names) or by comparing bytes; never by loading tensors.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from kbatch.models.store.cache import JOURNAL, _read_journal
from kbatch.models.store.integrity import _CHUNK, _SHA256, sha256_of
from kbatch.models.store.sources import _local_names, wanted


def known_sha256(path: str | os.PathLike) -> str | None:
    """A file's sha256 where it is known without reading the file: the staging journal of a staged copy, or
    the blob name in huggingface_hub's cache (LFS blobs are named by their sha256)."""
    path = Path(path)
    size = path.stat().st_size
    for root in list(path.parents)[:3]:
        if (root / JOURNAL).is_file():
            entry = _read_journal(root).get("files", {}).get(path.relative_to(root).as_posix())
            if entry and entry.get("size") == size and entry.get("sha256"):
                return entry["sha256"]
    if path.is_symlink():
        blob = os.path.basename(os.path.realpath(path))
        if _SHA256.match(blob):
            return blob
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file: :func:`known_sha256`, else by reading it."""
    known = known_sha256(path)
    if known:
        return known
    return sha256_of(path)


def _same_file_content(a: Path, b: Path) -> bool:
    """Equal bytes: by known hashes when both are known (no reading), else by reading both side by side and
    stopping at the first difference (memcmp speed; hashing both would cost ~3 s/GiB on a small CPU)."""
    if os.path.samefile(a, b):
        return True
    ha, hb = known_sha256(a), known_sha256(b)
    if ha and hb:
        return ha == hb
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(_CHUNK), fb.read(_CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


_IGNORED_CONFIG_KEYS = {"_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash"}


def _config_view(data: bytes):
    try:
        value = json.loads(data)
    except ValueError:
        return data
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in _IGNORED_CONFIG_KEYS}
    return value


def same_weights(folder_a: str | os.PathLike, folder_b: str | os.PathLike) -> bool:
    """Whether two component folders (e.g. ``decoder/text_encoder`` and ``inpaint/text_encoder``) hold the same
    module, decided without loading it: the same files; configs equal (up to version stamps); every safetensors
    file of the same size and the same bytes (by sha256 where known without reading: staged copies, the hub
    cache; else compared side by side)."""
    a, b = Path(folder_a), Path(folder_b)
    if not a.is_dir() or not b.is_dir():
        return False
    if a.resolve() == b.resolve():
        return True
    names_a = {n for n in _local_names(str(a)) if wanted("x/" + n)}
    names_b = {n for n in _local_names(str(b)) if wanted("x/" + n)}
    if names_a != names_b or not names_a:
        return False
    weights = sorted(n for n in names_a if n.endswith(".safetensors"))
    if any((a / n).stat().st_size != (b / n).stat().st_size for n in weights):
        return False
    for n in sorted(names_a - set(weights)):
        if _config_view((a / n).read_bytes()) != _config_view((b / n).read_bytes()):
            return False
    return all(_same_file_content(a / n, b / n) for n in weights)
