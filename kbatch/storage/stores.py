"""Which conditional-write backend serves a location: ``conditional_store(url)`` and ``store_for(fs, root)``.

Local folders (``local_store.py``), ``memory://`` (``memory_store.py``), ``s3://`` (``s3_store.py``) and
``gs://`` (``gcs_store.py``); any other store is refused with :class:`Unsupported`. Callers never branch on
the backend: they get a ``ConditionalStore`` (``conditional.py``).
"""
from __future__ import annotations

from kbatch.storage.conditional import ConditionalStore
from kbatch.storage.gcs_store import GCSStore
from kbatch.storage.local_store import LocalStore
from kbatch.storage.memory_store import MemoryStore
from kbatch.storage.paths import _protocols, display_path, get_fs, is_local
from kbatch.storage.s3_store import S3Store


class Unsupported(ValueError):
    """This store offers no atomic create-if-absent / compare-and-swap, so kbatch cannot fence runs there."""


def store_for(fs, root: str) -> ConditionalStore:
    """The conditional-write store of folder ``root`` (a path of ``fs``, without protocol)."""
    protocols = _protocols(fs)
    if is_local(fs):
        return LocalStore(root)
    if "memory" in protocols:
        return MemoryStore(root)
    if protocols & {"s3", "s3a"} and hasattr(fs, "call_s3"):
        return S3Store(fs, root)
    if protocols & {"gs", "gcs"}:
        return GCSStore(fs, root)
    raise Unsupported(f"{display_path(fs, root)}: {'/'.join(sorted(protocols))} offers no conditional writes "
                      "kbatch can use (create-if-absent, replace-if-version); use a local disk, s3:// or gs://")


def conditional_store(url: str, storage_options: dict | None = None) -> ConditionalStore:
    """The conditional-write store rooted at ``url`` (a local path, ``file://``, ``memory://``, ``s3://``,
    ``gs://``). Raises :class:`Unsupported` for other stores."""
    fs, root = get_fs(url, storage_options)
    return store_for(fs, root)
