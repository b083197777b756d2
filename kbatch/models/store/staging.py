"""Staging: a model folder made loadable on this node (actors, at start). A local folder is used as it is; a
hub id goes through huggingface_hub's cache; an fsspec URL is copied once per node into the model cache
(cache.py), every file verified (integrity.py, and the pull manifest's sha256) before it is renamed into
place. A copy killed midway resumes without fetching finished files again. A folder that ``kbatch models
pull`` is writing (its manifest says so) is refused by naming the pull, and a folder that changes while it is
copied is staged again: a staged copy is always one version of the source. See docs/models.md.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from kbatch.models.store.cache import (_cache_name, _evict_old_versions, _have, _hold_shared, _inside, _last_complete,
                                       _node_lock, _read_journal, _seed_from_previous, _stamp, _write_journal,
                                       clean_temp_files, default_cache_dir, listing_signature, temp_name)
from kbatch.models.store.errors import ChecksumMismatch, NotEnoughSpace, PullInProgress
from kbatch.models.store.integrity import _download, _signature, _source_md5, etag_not_md5
from kbatch.models.store.manifest import PULL_MANIFEST, PullManifest, read_manifest, refuse_if_pulling
from kbatch.models.store.retries import is_transient, with_retries
from kbatch.models.store.sources import HUB_PATTERNS, _fs, _local_path, _remote_listing, model_kind, wanted

log = logging.getLogger("kbatch")

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
        if os.path.isfile(os.path.join(path, PULL_MANIFEST)):  # a pull's destination: not while it writes
            refuse_if_pulling(uri, read_manifest(_fs(path, None)[0], path))
        return Staged(path, kind)
    if kind == "hub":
        from huggingface_hub import snapshot_download

        t0 = time.perf_counter()
        path = with_retries(lambda: snapshot_download(uri, revision=revision, allow_patterns=HUB_PATTERNS),
                            what=f"downloading {uri} from the hub")
        return Staged(path, kind, seconds=time.perf_counter() - t0)
    return _stage_url(uri, storage_options, cache_dir)



def _fetch(fs, src: str, dest: Path, rel: str, info: dict, want_sha: str | None) -> tuple[Path, dict]:
    """Download one file to a temp name beside its final name and verify it: its size; the pull manifest's
    sha256 when the folder has one for it; else the md5 the listing states, where the ETag is an MD5 (not for
    SSE-KMS / SSE-C objects: :func:`etag_not_md5`; those are taken by size, their sha256 recorded in the
    journal). Returns the temp path and its journal entry."""
    tmp = temp_name(dest / rel)
    try:
        size, md5, sha = _download(fs, src, tmp)
        if size != info.get("size"):
            raise ChecksumMismatch(f"{src}: got {size} bytes, the listing says {info.get('size')}")
        if want_sha:
            if want_sha != sha:
                raise ChecksumMismatch(f"{src}: sha256 {sha} differs from {PULL_MANIFEST}'s {want_sha}")
        elif (expected := _source_md5(info)) and expected != md5:
            why = etag_not_md5(fs, src)
            if why is None:
                raise ChecksumMismatch(f"{src}: md5 {md5} differs from the source's {expected}")
            log.debug("%s: %s, its ETag is not an MD5; checked by size (no %s entry)", src, why, PULL_MANIFEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, {"size": size, "source": _signature(info), "sha256": sha}


class _Changed(Exception):
    """The source folder changed while it was being staged (a pull replaced it): staged again from a new
    listing."""


def _pull_shas(uri: str, manifest: PullManifest | None, listing: dict) -> dict[str, str]:
    """{rel: sha256} from the folder's pull manifest; refuses a folder a pull is writing
    (:class:`PullInProgress`)."""
    if manifest is None:
        return {}
    refuse_if_pulling(uri, manifest)
    return {rel: e["sha256"] for rel, e in manifest.files.items() if rel in listing and e.get("sha256")}


def _disagreement(manifest: PullManifest, listing: dict) -> str | None:
    """The first file where the listing and the complete manifest disagree (missing, or another size)."""
    for rel, e in sorted(manifest.files.items()):
        if rel not in listing:
            return f"{rel} is missing, {PULL_MANIFEST} lists it"
        if listing[rel].get("size") != e.get("size"):
            return f"{rel} has {listing[rel].get('size')} bytes, {PULL_MANIFEST} says {e.get('size')}"
    return None


def _stage_url(uri: str, storage_options: dict | None, cache_dir: str | None) -> Staged:
    for attempt in range(1, 4):
        try:
            return _stage_url_once(uri, storage_options, cache_dir)
        except _Changed as e:
            if attempt == 3:
                raise PullInProgress(f"{uri} is not one version (three listings: {e}): a pull is writing it, or "
                                     f"its files were changed without one; run kbatch models pull again to make "
                                     f"it one version") from e
            log.warning("%s changed while it was staged (%s); staging it again", uri, e)
    raise AssertionError("unreachable")


def _stage_url_once(uri: str, storage_options: dict | None, cache_dir: str | None) -> Staged:
    t0 = time.perf_counter()
    fs, root = _fs(uri, storage_options)
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # the folder as it is now, not as this process listed it before
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
        manifest = read_manifest(fs, root, listing)
        shas = _pull_shas(uri, manifest, listing)
        if manifest is not None and (off := _disagreement(manifest, listing)):
            raise _Changed(off)  # listed before a pull changed it, or changed without a pull
        files = {rel: info for rel, info in listing.items() if wanted(rel)}
        if manifest is not None and (extra := sorted(set(files) - set(manifest.files))):
            # files the pull did not write (left from an earlier version, or added by hand): not part of it
            log.warning("%s: not staging %s: not in its %s", uri, ", ".join(extra[:5]), PULL_MANIFEST)
            files = {rel: info for rel, info in files.items() if rel in manifest.files}
        dest = cache / f"{prefix}-{listing_signature(files)}"  # one folder per version of the source
        dest.mkdir(exist_ok=True)
        journal = _read_journal(dest)
        clean_temp_files(dest)  # left by a process of this node that died mid-copy (we hold the lock)
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
                lambda rel=rel: _fetch_unless_changed(fs, root, uri, dest, rel, files[rel], shas.get(rel), manifest),
                what=f"downloading {uri}/{rel}")
            os.replace(tmp, final)  # verified; its journal entry is tied to the file as renamed into place
            journal["files"][rel] = {**entry, **_stamp(final)}
            _write_journal(dest, journal)
            copied += entry["size"]
        for p in list(dest.rglob("*")):  # files of an older version that the source no longer has
            rel = p.relative_to(dest).as_posix()
            if p.is_file() and wanted(rel) and rel not in files:  # never a temp file or the journal
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


def _fetch_unless_changed(fs, root: str, uri: str, dest: Path, rel: str, info: dict, want_sha: str | None,
                          manifest: PullManifest | None) -> tuple[Path, dict]:
    """:func:`_fetch`; a file that fails (its check, or its read) while the folder's manifest is no longer the
    one read at the start (a pull began or finished meanwhile) means the folder changed under this copy:
    :class:`_Changed` (staged again from a new listing) or :class:`PullInProgress`, never a copy that mixes two
    versions."""
    try:
        return _fetch(fs, f"{root}/{rel}", dest, rel, info, want_sha)
    except Exception as e:  # a check failed, or the object changed since the listing (a 412 on If-Match reads)
        now = read_manifest(fs, root)
        if now is not None and (manifest is None or (now.pull_id, now.state) != (manifest.pull_id, manifest.state)):
            refuse_if_pulling(uri, now)
            raise _Changed(f"{e}; {PULL_MANIFEST} now records {now.describe()}") from None  # not retried as is
        raise
