"""The probe a run makes before it writes an output: does this store really honour conditional writes?

An S3-compatible server that ignores ``If-None-Match`` (or ``If-Match``) accepts every conditional PUT, which
silently turns "one shard, one commit" and the output lease into "last writer wins". So at acquire kbatch
creates ``_probe/<random>`` once, creates it again with other bytes (which must fail), and replaces it with
a version it never had (which must fail too); a store where either goes through is refused with
:class:`ConditionalWritesUnsupported` (a ``ConfigError``: exit 2) naming the server and the test. Then it
replaces and deletes the object with its right version, so that a local folder on a network filesystem, or
on one without locks, is refused here too (``local_store.py``), before the run writes anything. What each
store does: docs/output.md.
"""
from __future__ import annotations

import contextlib
import uuid

from kbatch.config import ConfigError
from kbatch.storage.conditional import ConditionalStore, PreconditionFailed

PROBE_PREFIX = "_probe"


class ConditionalWritesUnsupported(ConfigError):
    """The store accepted a write whose condition did not hold: kbatch cannot fence runs there."""


def _refusal(store: ConditionalStore, name: str, test: str) -> ConditionalWritesUnsupported:
    return ConditionalWritesUnsupported(
        f"output {store.url}: {store.server} does not honour conditional writes: {test} of {name} was "
        "accepted, where it must fail. kbatch's output lease and its one-commit-per-shard records depend on "
        "conditional writes, so two runs (or a late writer) could overwrite each other there. Use a store "
        "that implements them (AWS S3, GCS, MinIO and most current S3-compatible servers; "
        "docs/output.md#which-stores-work)")


def probe_conditional_writes(store: ConditionalStore) -> None:
    """Raise :class:`ConditionalWritesUnsupported` when ``store`` does not refuse a second create of one name
    or a replace with a stale version; a local store's own refusals (a network filesystem, a filesystem
    without locks: ``ConfigError``) come from its replace and delete, which the probe runs too."""
    check = getattr(store, "check_exclusive", None)
    if check is not None:
        check()
    name = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
    version = store.create(name, _nonce())
    try:
        try:
            store.create(name, _nonce())
        except PreconditionFailed:
            pass
        else:
            raise _refusal(store, name, "a second create-if-absent (If-None-Match: *, ifGenerationMatch=0)")
        try:
            store.replace(name, _nonce(), _stale(version))
        except PreconditionFailed:
            pass
        else:
            raise _refusal(store, name, "a replace-if-version with a version it never had (If-Match)")
        version = store.replace(name, _nonce(), version)
        with contextlib.suppress(PreconditionFailed):  # refused or not, the delete below must remove it
            store.delete(name, _stale(version))
        store.delete(name, version)
    finally:
        with contextlib.suppress(Exception):
            current = store.read(name)
            if current is not None:
                store.delete(name, current.version)


def _nonce() -> bytes:
    return f"kbatch probe {uuid.uuid4().hex}".encode()


def _stale(version: str) -> str:
    """A version of the same shape that the object never had."""
    v = str(version)
    if v.isdigit():  # a GCS generation
        return str(int(v) + 987654321)
    if v.startswith('"') and v.endswith('"'):  # an S3 ETag
        return '"' + "0" * 32 + '"'
    return "0:0:0:" + "0" * 16 if v.count(":") == 3 else "stale-" + v
