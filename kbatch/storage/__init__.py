"""kbatch's storage layer: local paths and fsspec URLs (``s3://``, ``gs://``, ``memory://``, ...), whole-file
writes readers see complete or not at all, and the one conditional-write interface the output protocol uses.

The package, by idea (every name is re-exported here, so ``from kbatch.storage import X`` and
``storage.X`` work for all of them):

- ``paths.py``: URLs, protocols, joining and listing names below a root;
- ``atomic.py``: atomic replace and exclusive create of whole files; their folders synced before a commit;
- ``json_files.py``: small (JSON) files by name below an output root;
- ``conditional.py``: read with version, create-if-absent, replace-if-version, delete-if-version; the
  lost-answer rule; backends ``local_store.py``, ``memory_store.py``, ``s3_store.py``, ``gcs_store.py``;
- ``stores.py``: ``conditional_store(url)``, the backend of a location;
- ``probe.py``: the check, before a run writes, that the store honours conditional writes.

Which stores work and what kbatch checks: docs/output.md.
"""
from __future__ import annotations

from kbatch.storage.atomic import sync_folders, write_bytes_atomic, write_exclusive, write_synced
from kbatch.storage.conditional import ConditionalStore, PreconditionFailed, Versioned
from kbatch.storage.json_files import (dumps_json, exists, read_bytes, read_json, remove, to_jsonable,
                                       write_json_atomic)
from kbatch.storage.memory_store import MEMORY_LOCK
from kbatch.storage.paths import (TMP_MARK, absolute_if_exists, absolute_local, check_relative, display_path,
                                  get_fs, is_local, join, list_names, node_local, process_local,
                                  protocol_problem, renames_atomically)
from kbatch.storage.probe import ConditionalWritesUnsupported, probe_conditional_writes
from kbatch.storage.s3_store import s3_conflict, s3_error
from kbatch.storage.stores import Unsupported, conditional_store, store_for

__all__ = [
    "ConditionalStore", "ConditionalWritesUnsupported", "MEMORY_LOCK", "PreconditionFailed",
    "TMP_MARK", "Unsupported", "Versioned", "absolute_if_exists", "absolute_local", "check_relative",
    "conditional_store", "display_path", "dumps_json", "exists", "get_fs", "is_local", "join",
    "list_names", "node_local", "probe_conditional_writes", "process_local", "protocol_problem", "read_bytes",
    "read_json", "remove", "renames_atomically", "s3_conflict", "s3_error", "store_for", "sync_folders",
    "to_jsonable", "write_bytes_atomic", "write_exclusive", "write_json_atomic", "write_synced",
]
