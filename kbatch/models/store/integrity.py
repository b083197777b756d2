"""Whether bytes are the ones the source holds: a source file's version (ETag, GCS md5/generation, mtime),
the MD5 a listing states where it states one, and downloads hashed (size, md5, sha256) on the way.

Nothing here knows the cache or the pull manifest; staging and pull decide what to compare.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path

_CHUNK = 8 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MD5 = re.compile(r"^[0-9a-f]{32}$")


def _signature(info: dict) -> str:
    """What identifies a source file's version, besides its size."""
    for k in ("ETag", "etag", "md5Hash", "LastModified", "mtime", "created"):
        if info.get(k) is not None:
            return f"{k}:{info[k]}"
    return ""


def _source_md5(info: dict) -> str | None:
    """The md5 a listing may state: an S3 ETag of 32 hex digits (a multipart ETag, ``<hex>-<parts>``, never is
    one), GCS md5Hash. An S3 ETag of that form is the content's MD5 only for an object that is neither SSE-KMS
    nor SSE-C encrypted, which a listing does not say: a mismatch is confirmed by :func:`etag_not_md5`."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"').lower()
    if _MD5.match(etag):
        return etag
    if info.get("md5Hash"):
        try:
            return base64.b64decode(info["md5Hash"]).hex()
        except ValueError:
            return None
    return None


def etag_not_md5(fs, path: str) -> str | None:
    """Why the ETag of the S3 object at ``path`` is not its content's MD5 (``"SSE-KMS (aws:kms)"``, ``"SSE-C"``),
    asked of the store (HEAD, with the storage options' SSE-C key when given); None when it is an MD5 or the
    store is not S3. Real S3 gives SSE-KMS and SSE-C objects ETags that are not MD5s (docs/models.md)."""
    call = getattr(fs, "call_s3", None)
    if call is None or not hasattr(fs, "split_path"):
        return None  # GCS md5Hash is the content's MD5 whatever the key; other stores state none
    bucket, key, _ = fs.split_path(path)
    return sse_reason(call("head_object", Bucket=bucket, Key=key))


def sse_reason(head: dict) -> str | None:
    """The encryption of a HEAD answer under which its ETag is not an MD5, or None (none, or SSE-S3)."""
    sse = str(head.get("ServerSideEncryption") or "")
    if sse.startswith("aws:kms"):
        return f"SSE-KMS ({sse})"
    if head.get("SSECustomerAlgorithm"):
        return "SSE-C"
    return None


def _download(fs, src: str, tmp: Path) -> tuple[int, str, str]:
    """Stream ``src`` into ``tmp``; returns (bytes, md5, sha256) computed on the way."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    size = 0
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with fs.open(src, "rb", block_size=64 << 20) as r, open(tmp, "wb") as w:
        while chunk := r.read(_CHUNK):
            md5.update(chunk)
            sha.update(chunk)
            w.write(chunk)
            size += len(chunk)
        w.flush()
        os.fsync(w.fileno())
    return size, md5.hexdigest(), sha.hexdigest()



def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a local file, read in chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def md5_of(path: str | os.PathLike) -> str:
    """md5 of a local file, read in chunks (compared with what a listing states)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
