"""Staging: a model folder made loadable on this node (actors, at start). A local folder is used as it is; a
hub id goes through huggingface_hub's cache; an fsspec URL is copied once per node into the model cache
(cache.py), every file verified (integrity.py, and the pull manifest's sha256) before it is renamed into
place. A copy killed midway resumes without fetching finished files again. See docs/models.md.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from kbatch.models.store.cache import (JOURNAL, _cache_name, _evict_old_versions, _have, _hold_shared, _inside,
                                       _last_complete, _node_lock, _read_journal, _seed_from_previous, _stamp,
                                       _write_journal, default_cache_dir, listing_signature)
from kbatch.models.store.errors import ChecksumMismatch, NotEnoughSpace
from kbatch.models.store.integrity import _download, _signature, _source_md5
from kbatch.models.store.retries import is_transient, with_retries
from kbatch.models.store.sources import HUB_PATTERNS, _fs, _local_path, _remote_listing, model_kind, wanted

log = logging.getLogger("kbatch")

#: Written by ``pull_model`` beside the files: their sizes and sha256, so staging can verify every byte.
PULL_MANIFEST = ".kbatch-manifest.json"


@dataclass(frozen=True)
class Staged:
    """A model folder ready for ``from_pretrained``, and what getting it here cost this process."""

    path: str
    kind: str
    files_copied: int = 0
    bytes_copied: int = 0
    seconds: float = 0.0



def stage_model(uri: str, storage_options: dict | None = None, cache_dir: str | None = None,
                revision: str | None = None) -> str:
    """A local folder that ``from_pretrained`` can load for ``uri`` (see :func:`stage`)."""
    return stage(uri, storage_options, cache_dir, revision).path


def stage(uri: str, storage_options: dict | None = None, cache_dir: str | None = None,
          revision: str | None = None) -> Staged:
    """Local folder: as is. Hub id: huggingface_hub's cache (safetensors + configs), with retries. fsspec URL:
    one verified copy per node in ``cache_dir`` (see the module docstring)."""
    uri = str(uri)
    kind = model_kind(uri)
    if kind == "sim":
        raise ValueError("'sim' stands for simulated models: there is nothing to load")
    if kind == "local":
        path = _local_path(uri)
        if not os.path.isdir(path):  # a local path must exist on every node (or be a shared mount)
            raise FileNotFoundError(f"model folder {uri!r} does not exist on this node ({path})")
        return Staged(path, kind)
    if kind == "hub":
        from huggingface_hub import snapshot_download

        t0 = time.perf_counter()
        path = with_retries(lambda: snapshot_download(uri, revision=revision, allow_patterns=HUB_PATTERNS),
                            what=f"downloading {uri} from the hub")
        return Staged(path, kind, seconds=time.perf_counter() - t0)
    return _stage_url(uri, storage_options, cache_dir)



def _fetch(fs, src: str, dest: Path, rel: str, info: dict, want_sha: str | None) -> tuple[Path, dict]:
    """Download one file to a temp name beside its final name and verify it (size; md5 from the listing; the
    pull manifest's sha256). Returns the temp path and its journal entry."""
    tmp = dest / f"{rel}.part-{os.getpid()}"
    try:
        size, md5, sha = _download(fs, src, tmp)
        if size != info.get("size"):
            raise ChecksumMismatch(f"{src}: got {size} bytes, the listing says {info.get('size')}")
        if (expected := _source_md5(info)) and expected != md5:
            raise ChecksumMismatch(f"{src}: md5 {md5} differs from the source's {expected}")
        if want_sha and want_sha != sha:
            raise ChecksumMismatch(f"{src}: sha256 {sha} differs from {PULL_MANIFEST}'s {want_sha}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, {"size": size, "source": _signature(info), "sha256": sha}


def _pull_shas(fs, root: str, listing: dict) -> dict[str, str]:
    """{rel: sha256} from a ``pull_model`` manifest at the source, for the files whose size it matches."""
    if PULL_MANIFEST not in listing:
        return {}
    try:
        files = json.loads(fs.cat_file(f"{root.rstrip('/')}/{PULL_MANIFEST}"))["files"]
        return {rel: e["sha256"] for rel, e in files.items()
                if rel in listing and listing[rel].get("size") == e.get("size")}
    except Exception as e:  # a manifest we cannot read only loses a check
        log.warning("ignoring unreadable %s under %s (%s)", PULL_MANIFEST, root, e)
        return {}


def _stage_url(uri: str, storage_options: dict | None, cache_dir: str | None) -> Staged:
    t0 = time.perf_counter()
    fs, root = _fs(uri, storage_options)
    root = root.rstrip("/")
    cache = Path(cache_dir or default_cache_dir()).expanduser().absolute()
    cache.mkdir(parents=True, exist_ok=True)
    prefix = _cache_name(uri)
    with _node_lock(cache / f"{prefix}.lock", uri):
        try:
            listing = with_retries(lambda: _remote_listing(fs, root), what=f"listing {uri}")
        except Exception as e:
            staged = _last_complete(cache, prefix, uri)
            if staged is not None and is_transient(e):
                log.warning("cannot list %s (%s); loading the copy staged earlier at %s", uri, e, staged)
                _hold_shared(staged)
                return Staged(str(staged), "url", seconds=time.perf_counter() - t0)
            raise
        if "model_index.json" not in listing:
            raise FileNotFoundError(f"{uri}: no model_index.json there")
        files = {rel: info for rel, info in listing.items() if wanted(rel)}
        dest = cache / f"{prefix}-{listing_signature(files)}"  # one folder per version of the source
        dest.mkdir(exist_ok=True)
        journal = _read_journal(dest)
        shas = _pull_shas(fs, root, listing)
        for p in dest.rglob("*.part-*"):  # left by a process that died mid-copy (we hold the lock)
            p.unlink(missing_ok=True)
        done = journal.get("files", {}) if journal.get("uri") == uri else {}
        journal = {"uri": uri, "complete": False,
                   "files": {rel: e for rel, e in done.items() if rel in files and _have(dest / rel, files[rel], e)}}
        _seed_from_previous(cache, prefix, dest, files, journal)
        todo = [rel for rel in sorted(files) if rel not in journal["files"]]
        _write_journal(dest, journal)
        need = sum(files[rel].get("size") or 0 for rel in todo)
        free = shutil.disk_usage(dest).free
        if need > free:
            raise NotEnoughSpace(f"staging {uri} needs {need} more bytes in {dest}, {free} free: point "
                                 f"models.cache_dir (or KBATCH_MODEL_CACHE) at a larger disk")
        copied = 0
        for rel in todo:
            final = _inside(dest, rel)
            final.unlink(missing_ok=True)  # an older version must not pass for the new one after a kill
            tmp, entry = with_retries(
                lambda rel=rel: _fetch(fs, f"{root}/{rel}", dest, rel, files[rel], shas.get(rel)),
                what=f"downloading {uri}/{rel}")
            os.replace(tmp, final)  # verified; its journal entry is tied to the file as renamed into place
            journal["files"][rel] = {**entry, **_stamp(final)}
            _write_journal(dest, journal)
            copied += entry["size"]
        for p in list(dest.rglob("*")):  # files of an older version that the source no longer has
            rel = p.relative_to(dest).as_posix()
            if p.is_file() and rel != JOURNAL and rel not in files:
                p.unlink()
        journal["complete"] = True
        _write_journal(dest, journal)
        _hold_shared(dest)
        _evict_old_versions(cache, prefix, dest)
    seconds = time.perf_counter() - t0
    if todo:
        log.info("staged %s into %s: %d files, %.1f MB in %.1f s (%.1f MB/s)", uri, dest, len(todo), copied / 1e6,
                 seconds, copied / 1e6 / max(seconds, 1e-9))
    else:
        log.info("%s: using the copy staged at %s (%.2f s)", uri, dest, seconds)
    return Staged(str(dest), "url", len(todo), copied, seconds)

