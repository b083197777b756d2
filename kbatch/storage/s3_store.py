"""The conditional-write backend of S3 and S3-compatible servers: ``If-None-Match: *`` / ``If-Match: <etag>``.

- **create**: ``PutObject`` with ``If-None-Match: *`` (412 or 409 when the key exists);
- **replace**: ``PutObject`` with ``If-Match: <etag>``;
- **delete**: ``DeleteObject`` with ``If-Match: <etag>``; a server without conditional deletes (400/501) gets
  read, compare, delete: a short window in which a replace between our read and our delete is lost. kbatch
  deletes conditionally only what a run itself owns (its lease at the end), so the window is documented,
  not closed.
- the version is the ETag, read from the same ``GetObject`` answer as the bytes.

A server that ignores ``If-None-Match`` would turn every create into "last writer wins": ``probe.py`` checks
it before a run writes anything. Lost answers (a 500 after the write landed, retried into a 412) are settled
by ``conditional.py``'s rule. Interface: ``conditional.py``; which stores work: docs/output.md.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os

from kbatch.storage.conditional import BaseStore, PreconditionFailed, Versioned


def s3_error(exc: BaseException) -> tuple[str | None, int | None]:
    """``(code, http status)`` of the botocore error behind an s3fs exception (s3fs translates them, keeping
    the original as ``__cause__``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            err = response.get("Error") or {}
            return err.get("Code"), (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        exc = exc.__cause__ or exc.__context__
    return None, None


def s3_conflict(exc: BaseException) -> bool:
    """A conditional S3 write lost: 412 PreconditionFailed / 409 ConditionalRequestConflict."""
    if isinstance(exc, FileExistsError):  # s3fs's translation of If-None-Match failing
        return True
    code, status = s3_error(exc)
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412


def s3_missing(exc: BaseException) -> bool:
    """The object (or key) is not there: 404 / NoSuchKey."""
    code, status = s3_error(exc)
    return isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "404") or status == 404


def s3_endpoint(fs) -> str:
    """The endpoint an s3fs instance talks to (its client's once connected, else its settings, else the
    ``AWS_ENDPOINT_URL*`` environment; AWS's own when none is configured)."""
    client = getattr(fs, "_s3", None)
    url = getattr(getattr(client, "meta", None), "endpoint_url", None)
    url = url or getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    url = url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return str(url) if url else "AWS S3 (s3.amazonaws.com)"


def _epoch(value) -> float | None:
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.timestamp()
    return None


class S3Store(BaseStore):
    """Conditional writes under ``s3://<root>`` through a synchronous s3fs instance ``fs``."""

    def __init__(self, fs, root: str):
        if getattr(fs, "asynchronous", False):
            raise ValueError("kbatch's conditional writes need a synchronous s3fs instance")
        self.fs = fs
        self.root = str(root).strip("/")
        self.url = f"s3://{self.root}"

    @property
    def server(self) -> str:
        return f"S3 endpoint {s3_endpoint(self.fs)}"

    def _where(self, name: str) -> dict:
        bucket, key, _ = self.fs.split_path(f"{self.root}/{name}")
        return {"Bucket": bucket, "Key": key}

    def _invalidate(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(f"{self.root}/{name}")

    def _read(self, name: str) -> Versioned | None:
        from fsspec.asyn import sync

        where = self._where(name)

        async def get():  # the body streams on s3fs's event loop, so read it there
            resp = await self.fs._call_s3("get_object", **where)
            body = resp["Body"]
            try:
                return resp, await body.read()
            finally:
                with contextlib.suppress(Exception):
                    body.close()

        try:  # bytes, etag and time from one answer, so that they belong together
            resp, raw = sync(self.fs.loop, get)
        except Exception as e:  # noqa: BLE001
            if s3_missing(e):
                return None
            raise
        return Versioned(bytes(raw), str(resp.get("ETag")), _epoch(resp.get("LastModified")))

    def _put(self, name: str, data: bytes, **condition) -> str:
        try:
            resp = self.fs.call_s3("put_object", Body=data, **self._where(name), **condition)
        except Exception as e:  # noqa: BLE001
            if s3_conflict(e) or (condition.get("IfMatch") and s3_missing(e)):
                raise PreconditionFailed(f"{self.url}/{name}: {condition} failed") from None
            raise
        finally:
            self._invalidate(name)
        return str(resp.get("ETag"))

    def _create(self, name: str, data: bytes) -> str:
        return self._put(name, data, IfNoneMatch="*")

    def _replace(self, name: str, data: bytes, version: str) -> str:
        return self._put(name, data, IfMatch=version)

    def _delete(self, name: str, version: str) -> None:
        try:
            self.fs.call_s3("delete_object", **self._where(name), IfMatch=version)
        except Exception as e:  # noqa: BLE001
            if s3_missing(e):
                return
            if s3_conflict(e):
                raise PreconditionFailed(f"{self.url}/{name} is not at version {version}") from None
            code, status = s3_error(e)
            if status not in (400, 501) and code not in ("NotImplemented", "InvalidArgument"):
                raise
            # a server without conditional DELETE: compare, then delete (module docstring)
            current = self._read(name)
            if current is None:
                return
            if current.version != version:
                raise PreconditionFailed(f"{self.url}/{name} is not at version {version}") from None
            self.fs.call_s3("delete_object", **self._where(name))
        finally:
            self._invalidate(name)

    def list(self, prefix: str = "") -> list[str]:
        bucket, key, _ = self.fs.split_path(self.root)
        base = f"{key}/" if key else ""
        names, token = [], None
        while True:
            kw = {"Bucket": bucket, "Prefix": base + prefix}
            if token:
                kw["ContinuationToken"] = token
            resp = self.fs.call_s3("list_objects_v2", **kw)
            names += [o["Key"][len(base):] for o in resp.get("Contents", [])]
            if not resp.get("IsTruncated"):
                break
            token = resp.get("NextContinuationToken")
        return sorted(n for n in names if n and not n.endswith("/"))
