"""``kbatch models pull SOURCE DEST``: stage a model once for a whole fleet in its own bucket (or folder):
pickle-free files only, files already there with the same content skipped (never by size alone), a manifest
of sha256 sums that staging verifies against, ``model_index.json`` last. See docs/models.md.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from kbatch.models.store.checks import _layout_problem
from kbatch.models.store.integrity import _source_md5, md5_of
from kbatch.models.store.retries import with_retries
from kbatch.models.store.same_weights import file_sha256
from kbatch.models.store.sources import _fs, _local_names, _remote_listing, is_sim, wanted
from kbatch.models.store.staging import PULL_MANIFEST, stage_model

log = logging.getLogger("kbatch")


def _remote_manifest(fs, root: str, listing: dict) -> dict[str, dict]:
    """{rel: {size, sha256}} of the destination's pull manifest, or {} (none, or unreadable)."""
    if PULL_MANIFEST not in listing:
        return {}
    try:
        return dict(json.loads(fs.cat_file(f"{root}/{PULL_MANIFEST}"))["files"])
    except Exception as e:  # noqa: BLE001 - an unreadable manifest only means: upload everything
        log.warning("ignoring unreadable %s under %s (%s)", PULL_MANIFEST, root, e)
        return {}


def _already_there(info: dict, path: Path, size: int, sha: str, recorded: dict | None) -> bool:
    """Whether the destination already holds these bytes, decided by content, never by size alone: the md5
    its listing states (single-part S3 ETag, GCS md5Hash) against the local file's, else the sha256 the
    earlier pull recorded for it. Nothing to go by: upload."""
    if info.get("size") != size:
        return False
    md5 = _source_md5(info)
    if md5 is not None:
        return md5_of(path) == md5
    return bool(recorded) and recorded.get("size") == size and recorded.get("sha256") == sha


def pull_model(source: str, dest_url: str, storage_options: dict | None = None, revision: str | None = None) -> dict:
    """``kbatch models pull SOURCE DEST_URL``: stage a model once for a whole fleet. ``source`` is a hub id
    (downloaded with huggingface_hub: safetensors and configs only), a local folder or a URL; ``dest_url`` any
    fsspec URL or local folder. Uploads only the pickle-free files, skips files already there with the same
    content (md5 from the listing, or the sha256 an earlier pull recorded; never by size alone), writes a
    manifest of sha256 sums (staging verifies against it) after the uploads and model_index.json last, so the
    destination is a loadable folder only once it is complete. Returns a summary."""
    t0 = time.perf_counter()
    if is_sim(source):
        raise ValueError("'sim' stands for simulated models: there is nothing to pull")
    src = Path(stage_model(source, storage_options, revision=revision))
    local = {rel: src / rel for rel in _local_names(str(src)) if wanted(rel)}
    problem = _layout_problem(set(local), lambda rel: local[rel].read_bytes(), None)
    if problem:
        raise ValueError(f"{source}: {problem}")
    fs, root = _fs(dest_url, storage_options)
    root = root.rstrip("/")
    there = with_retries(lambda: _remote_listing(fs, root), what=f"listing {dest_url}")
    is_local = "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
    before = _remote_manifest(fs, root, there)  # what an earlier pull says the destination holds
    manifest = {"source": source, "revision": revision, "files": {}}
    uploaded = skipped = nbytes = 0
    for rel in sorted(local, key=lambda r: (r == "model_index.json", r)):  # model_index.json last
        path = local[rel]
        size = path.stat().st_size
        sha = file_sha256(path)
        manifest["files"][rel] = {"size": size, "sha256": sha}
        if rel == "model_index.json":  # the manifest after the uploads, before the file that makes it loadable
            data = json.dumps(manifest, indent=1, sort_keys=True).encode()
            with_retries(lambda: fs.pipe_file(f"{root}/{PULL_MANIFEST}", data), what=f"writing {PULL_MANIFEST}")
        if rel in there and _already_there(there[rel], path, size, sha, before.get(rel)):
            skipped += 1
            continue
        target = f"{root}/{rel}"
        if is_local:
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        with_retries(lambda: fs.put_file(str(path), target), what=f"uploading {rel} to {dest_url}")
        uploaded += 1
        nbytes += size
    summary = {"source": source, "dest": dest_url, "files": len(local), "uploaded": uploaded, "skipped": skipped,
               "bytes": nbytes, "total_bytes": sum(e["size"] for e in manifest["files"].values()),
               "seconds": round(time.perf_counter() - t0, 3)}
    log.info("pulled %s to %s: %d files (%d uploaded, %.1f MB) in %.1f s", source, dest_url, len(local), uploaded,
             nbytes / 1e6, summary["seconds"])
    return summary
