"""Retries of transient errors (timeouts, dropped connections, HTTP 408/429/5xx, S3 throttling) with
exponential backoff and jitter; everything else is permanent and raised at once.

Why: one 429 or dropped connection at an actor's start must not retire the actor (docs/models.md).
"""
from __future__ import annotations

import errno
import logging
import os
import random
import time
from typing import Callable

log = logging.getLogger("kbatch")

_PERMANENT_NAMES = {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "RemoteEntryNotFoundError",
                    "EntryNotFoundError", "DisabledRepoError", "HFValidationError", "OfflineModeIsEnabled",
                    "NotASafetensorsRepoError", "NoCredentialsError", "PartialCredentialsError", "ConfigError",
                    "NotEnoughSpace", "PullInProgress"}
_TRANSIENT_NAMES = {"TransportError", "TimeoutException", "EndpointConnectionError", "ConnectionClosedError",
                    "ReadTimeoutError", "ConnectTimeoutError", "HTTPClientError", "ClientConnectionError",
                    "ServerDisconnectedError", "ClientPayloadError", "IncompleteRead", "ChunkedEncodingError",
                    "ChecksumMismatch"}
_TRANSIENT_AWS_CODES = {"Throttling", "ThrottlingException", "ThrottledException", "SlowDown", "RequestTimeout",
                        "RequestTimeoutException", "InternalError", "ServiceUnavailable", "RequestLimitExceeded",
                        "TooManyRequests", "TooManyRequestsException", "500", "502", "503", "504"}
_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EISDIR,
                     errno.ENOTDIR, errno.EINVAL, errno.ENOSYS, errno.ENAMETOOLONG, getattr(errno, "EDQUOT", -1)}


def _chain(exc: BaseException):
    seen = []
    while exc is not None and len(seen) < 12 and all(exc is not s for s in seen):
        seen.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return seen


def _aws_code(exc) -> str | None:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return (resp.get("Error") or {}).get("Code")
    return None


def _http_status(exc) -> int | None:
    for holder in (exc, getattr(exc, "response", None)):
        if holder is None or isinstance(holder, dict):
            continue
        for attr in ("status_code", "status"):
            value = getattr(holder, attr, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        value = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return value if isinstance(value, int) else None
    return None


def _verdict(exc: BaseException) -> bool | None:
    """True: transient, False: permanent, None: this exception alone does not say."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "LocalEntryNotFoundError" in names:  # the hub was unreachable and the file is not cached
        from huggingface_hub import constants

        return not constants.HF_HUB_OFFLINE
    if names & _PERMANENT_NAMES:
        return False
    code = _aws_code(exc)
    if code:
        return code in _TRANSIENT_AWS_CODES
    status = _http_status(exc)
    if status is not None:
        return status in (408, 429) or status >= 500
    if names & _TRANSIENT_NAMES:
        return True
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    if isinstance(exc, OSError):
        return None if exc.errno is None else exc.errno not in _PERMANENT_ERRNOS
    if isinstance(exc, (ValueError, TypeError, KeyError, AttributeError, ImportError, NotImplementedError,
                        MemoryError)):
        return False
    return None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: timeouts, dropped connections, HTTP 408/429/5xx, S3 throttling. Anything in the exception's
    chain that says "permanent" (not found, gated, no access, bad model, full disk) wins, since diffusers wraps
    hub errors in a plain ``OSError``; an error nothing says anything about is permanent."""
    verdicts = [_verdict(e) for e in _chain(exc)]
    return False not in verdicts and True in verdicts


def _retry_after(exc) -> float | None:
    for e in _chain(exc):
        headers = getattr(getattr(e, "response", None), "headers", None)
        try:
            value = headers.get("Retry-After") if headers is not None else None
            if value is not None:
                return float(value)
        except (TypeError, ValueError, AttributeError):
            pass
    return None


def with_retries(fn: Callable, *, what: str, attempts: int = 4, base_delay: float = 2.0, max_delay: float = 60.0,
                 sleep: Callable[[float], None] | None = None):
    """``fn()``, retried on transient errors with exponential backoff and jitter (``base_delay * 2**k``, times
    0.5-1.5, or the server's Retry-After, at most ``max_delay``). Permanent errors and the last attempt's error
    are raised as they are. Why: one 429 or dropped connection at actor start must not retire the actor."""
    jitter = random.Random(os.urandom(8))  # own generator: a worker that seeds `random` must not sync retries
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= attempts or not is_transient(exc):
                raise
            delay = _retry_after(exc)
            if delay is None:
                delay = base_delay * 2 ** (attempt - 1) * jitter.uniform(0.5, 1.5)
            delay = min(max_delay, max(0.0, delay))
            log.warning("%s failed (attempt %d of %d: %s: %s); retrying in %.1f s", what, attempt, attempts,
                        type(exc).__name__, exc, delay)
            (sleep or time.sleep)(delay)
