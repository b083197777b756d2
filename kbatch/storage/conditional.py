"""Conditional writes: the one interface the lease, the commit records, ``_job.json`` and ``_SUCCESS`` use.

A :class:`ConditionalStore` is rooted at a URL and offers, for names relative to that root:

- ``read(name)``: the object's bytes with an opaque version (:class:`Versioned`), or None when absent;
- ``create(name, data)``: create-if-absent, returns the new version;
- ``replace(name, data, version)``: replace-if-version, returns the new version;
- ``delete(name, version)``: delete-if-version (an absent object counts as deleted);
- ``list(prefix)``: the names that start with ``prefix`` (a plain string prefix: a folder ends with ``/``),
  sorted, relative to the root with the prefix included (``list("_inflight/")`` -> ``["_inflight/a.json"]``);
  ``[]`` for an absent prefix. Temp and lock files of the local backend are never listed.

A condition that does not hold raises :class:`PreconditionFailed`. Backends: ``local_store.py`` (exclusive
``link()``, renames under a lock, fsync of the file and its folder), ``s3_store.py`` (``If-None-Match`` /
``If-Match``), ``gcs_store.py`` (generation preconditions), ``memory_store.py``; ``conditional_store(url)``
in this package picks one. Which stores work and what kbatch checks: docs/output.md.

**Lost answers.** A write can land on the server while its answer is lost (a reset connection, a 500 after
the write); the retry (ours, or the client library's own) then fails its condition against our own write.
Rule: *a create or replace whose condition fails, but whose name now holds exactly the bytes it wrote,
succeeded* (and returns the version read). Callers make their bytes unique to the write (a token or nonce
in the data), so equal bytes mean our write. A delete retried after a lost answer finds nothing: done.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

#: transient-error retries of one create / replace / delete (the client libraries retry too)
ATTEMPTS = 5


@dataclass(frozen=True)
class Versioned:
    """An object as read: its bytes, an opaque version to condition on (an S3 ETag, a GCS generation, a
    local file's identity and content hash, a memory counter) and its modification time in epoch seconds
    by the store's clock (None if unknown)."""
    data: bytes
    version: str
    modified: float | None = None

    def json_object(self) -> dict | None:
        """The bytes as a JSON object; None for anything else (half-written, corrupt, foreign)."""
        import json

        try:
            obj = json.loads(self.data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None


class PreconditionFailed(Exception):
    """A conditional write lost: the name exists (create), or holds another version (replace, delete)."""


@runtime_checkable
class ConditionalStore(Protocol):
    url: str  #: the root, e.g. "s3://bucket/out", "/path/out", "gs://b/out", "memory://x"
    server: str  #: where the objects live, for messages: "S3 endpoint http://...", "local disk /path", ...

    def read(self, name: str) -> Versioned | None: ...

    def create(self, name: str, data: bytes) -> str: ...

    def replace(self, name: str, data: bytes, version: str) -> str: ...

    def delete(self, name: str, version: str) -> None: ...

    def list(self, prefix: str = "") -> list[str]: ...


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying: a connection reset or timeout, or an HTTP 429 / 5xx answer."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        status = None
        response = getattr(exc, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        code = getattr(exc, "code", None)  # gcsfs HttpError
        if status is None and isinstance(code, int):
            status = code
        if isinstance(status, int) and (status == 429 or 500 <= status < 600):
            return True
        name = type(exc).__name__
        if name in ("ServerDisconnectedError", "ClientOSError", "ClientConnectionError", "ProxyError",
                    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class BaseStore:
    """What every backend shares: relative-name checks, transient-error retries and the lost-answer rule.
    A backend implements ``_read``, ``_create``, ``_replace``, ``_delete`` (raising
    :class:`PreconditionFailed`) and ``list``."""

    url: str = ""
    server: str = ""
    attempts: int = ATTEMPTS

    # -- what a backend implements
    def _read(self, name: str) -> Versioned | None:
        raise NotImplementedError

    def _create(self, name: str, data: bytes) -> str:
        raise NotImplementedError

    def _replace(self, name: str, data: bytes, version: str) -> str:
        raise NotImplementedError

    def _delete(self, name: str, version: str) -> None:
        raise NotImplementedError

    def _transient(self, exc: BaseException) -> bool:
        return is_transient(exc)

    # -- the interface
    def read(self, name: str) -> Versioned | None:
        name = _relative(name)
        return self._retrying(lambda: self._read(name))

    def create(self, name: str, data: bytes) -> str:
        name, data = _relative(name), bytes(data)
        return self._write(name, data, lambda: self._create(name, data))

    def replace(self, name: str, data: bytes, version: str) -> str:
        name, data = _relative(name), bytes(data)
        if not version:
            raise ValueError(f"replace {name!r}: empty version")
        return self._write(name, data, lambda: self._replace(name, data, str(version)))

    def delete(self, name: str, version: str) -> None:
        name = _relative(name)
        if not version:
            raise ValueError(f"delete {name!r}: empty version")
        self._retrying(lambda: self._delete(name, str(version)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- the rules
    def _write(self, name: str, data: bytes, attempt: Callable[[], str]) -> str:
        try:
            return self._retrying(attempt)
        except PreconditionFailed:
            # The lost-answer rule (module docstring): our own bytes in place mean our write landed.
            current = self._retrying(lambda: self._read(name))
            if current is not None and current.data == data:
                return current.version
            raise

    def _retrying(self, call: Callable):
        for i in range(self.attempts):
            try:
                return call()
            except PreconditionFailed:
                raise
            except Exception as e:  # noqa: BLE001
                if i + 1 >= self.attempts or not self._transient(e):
                    raise
                time.sleep(min(2.0, 0.05 * 2 ** i) * (0.5 + random.random()))
        raise AssertionError("unreachable")


def _relative(name: str) -> str:
    n = str(name)
    if not n or n.startswith("/") or "\\" in n or "://" in n or any(p in ("", ".", "..") for p in n.split("/")):
        raise ValueError(f"invalid relative name {name!r}")
    return n
