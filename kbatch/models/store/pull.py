"""``kbatch models pull SOURCE DEST``: stage a model once for a whole fleet in its own bucket (or folder):
pickle-free files only, files already there with the same content skipped (never by size alone), a manifest
of sha256 sums that staging verifies against, ``model_index.json`` last. See docs/models.md.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from kbatch.models.store.checks import _layout_problem
from kbatch.models.store.integrity import _signature, _source_md5, md5_of
from kbatch.models.store.manifest import COMPLETE, PULL_MANIFEST, PULLING, PullManifest, new_pull, read_manifest
from kbatch.models.store.retries import with_retries
from kbatch.models.store.same_weights import file_sha256
from kbatch.models.store.sources import _fs, _local_names, _remote_listing, is_sim, wanted
from kbatch.models.store.staging import stage_model

log = logging.getLogger("kbatch")


def _trusted_entries(before: PullManifest | None, there: dict) -> dict[str, dict]:
    """The earlier pull's entries that still describe the destination: recorded with the version of the object
    the pull wrote, and the object is still that version (same size). An entry without a version (an older
    kbatch) or of an object replaced since (an interrupted pull, a sync) is not trusted."""
    if before is None:
        return {}
    return {rel: e for rel, e in before.files.items()
            if rel in there and e.get("version") and e["version"] == _signature(there[rel])
            and e.get("size") == there[rel].get("size")}


def _already_there(info: dict, path: Path, size: int, sha: str, recorded: dict | None) -> bool:
    """Whether the destination already holds these bytes, decided by content, never by size alone: the md5
    its listing states (single-part S3 ETag, GCS md5Hash) equal to the local file's, or the sha256 an earlier
    pull recorded for this very version of the object. An SSE-KMS / SSE-C ETag is not an MD5: it never
    equals one, so such files are decided by the recorded sha256. Nothing to go by: upload."""
    if info.get("size") != size:
        return False
    if recorded and recorded.get("size") == size and recorded.get("sha256") == sha:
        return True
    md5 = _source_md5(info)
    return md5 is not None and md5_of(path) == md5


def _version_of(fs, target: str) -> str:
    """The version of the object just written (ETag, GCS etag, mtime), asked of the store (not its cache)."""
    def info():
        fs.invalidate_cache(target)
        return fs.info(target)

    return _signature(with_retries(info, what=f"reading back {target}"))


def pull_model(source: str, dest_url: str, storage_options: dict | None = None, revision: str | None = None) -> dict:
    """``kbatch models pull SOURCE DEST_URL``: stage a model once for a whole fleet. ``source`` is a hub id
    (downloaded with huggingface_hub: safetensors and configs only), a local folder or a URL; ``dest_url`` any
    fsspec URL or local folder. First marks the destination's manifest ``pulling`` (naming this pull), then
    uploads the pickle-free files (model_index.json last), skipping files already there with the same content
    (md5 from the listing, or the sha256 an earlier pull recorded for that very object version; never by size
    alone), and last writes the manifest ``complete``: sizes, sha256 sums and object versions, which staging
    verifies against. A destination mid-pull or left by an interrupted pull is refused by staging and by the
    start-up check, naming the pull; running the pull again completes it. Returns a summary."""
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
    before = read_manifest(fs, root, there)  # what an earlier pull says the destination holds
    if before is not None and before.state != COMPLETE:
        log.warning("%s: %s did not finish (or is still running); this pull takes over", dest_url,
                    before.describe())
    trusted = _trusted_entries(before, there)
    manifest = PullManifest(state=PULLING, files=dict(trusted), pull=new_pull(source, revision))
    if is_local:
        fs.makedirs(root, exist_ok=True)
    data = manifest.to_json()
    with_retries(lambda: fs.pipe_file(f"{root}/{PULL_MANIFEST}", data), what=f"marking {PULL_MANIFEST} pulling")
    files: dict[str, dict] = {}
    uploaded = skipped = nbytes = 0
    for rel in sorted(local, key=lambda r: (r == "model_index.json", r)):  # model_index.json last
        path = local[rel]
        size = path.stat().st_size
        sha = file_sha256(path)
        target = f"{root}/{rel}"
        if rel in there and _already_there(there[rel], path, size, sha, trusted.get(rel)):
            skipped += 1
            files[rel] = {"size": size, "sha256": sha, "version": _signature(there[rel])}
            continue
        if is_local:
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        with_retries(lambda: fs.put_file(str(path), target), what=f"uploading {rel} to {dest_url}")
        files[rel] = {"size": size, "sha256": sha, "version": _version_of(fs, target)}
        uploaded += 1
        nbytes += size
    manifest.state, manifest.files = COMPLETE, files
    data = manifest.to_json()
    with_retries(lambda: fs.pipe_file(f"{root}/{PULL_MANIFEST}", data), what=f"writing {PULL_MANIFEST}")
    summary = {"source": source, "dest": dest_url, "files": len(local), "uploaded": uploaded, "skipped": skipped,
               "bytes": nbytes, "total_bytes": sum(e["size"] for e in files.values()),
               "seconds": round(time.perf_counter() - t0, 3), "pull": manifest.pull_id}
    log.info("pulled %s to %s: %d files (%d uploaded, %.1f MB) in %.1f s", source, dest_url, len(local), uploaded,
             nbytes / 1e6, summary["seconds"])
    return summary
