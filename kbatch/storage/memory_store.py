"""The conditional-write backend of ``memory://`` (fsspec's in-process store): for tests and ``memory://`` outputs.

The objects are fsspec's own memory files, so plain readers (``kbatch.storage.read_json``) see them; every
check-and-set runs under :data:`MEMORY_LOCK`, one lock for the whole process as fsspec's store is one
dictionary for the whole process. A version is a per-name write counter plus the content's hash, so a plain
overwrite of the object (outside this store) changes its version too. Interface: ``conditional.py``.
"""
from __future__ import annotations

import hashlib
import posixpath
import threading
import time

from fsspec.implementations.memory import MemoryFileSystem

from kbatch.storage.conditional import BaseStore, PreconditionFailed, Versioned

# fsspec's memory:// store is process-global (a class attribute), so the guard that makes its check-and-set
# atomic between threads has to be as well.
MEMORY_LOCK = threading.Lock()

_WRITES: dict[str, tuple[int, float]] = {}  # path -> (writes through a MemoryStore, when), under MEMORY_LOCK
_COUNTER = [0]


class MemoryStore(BaseStore):
    """Conditional writes on ``memory://<root>``."""

    def __init__(self, root: str):
        self.fs = MemoryFileSystem()
        self.root = "/" + str(root).split("://", 1)[-1].strip("/")
        self.url = "memory:/" + self.root
        self.server = f"this process's memory ({self.url})"

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def _current(self, path: str) -> Versioned | None:
        try:
            data = bytes(self.fs.cat_file(path))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        count, when = _WRITES.get(path, (0, None))
        return Versioned(data, f"{count}-{hashlib.sha256(data).hexdigest()[:16]}", when)

    def _put(self, path: str, data: bytes) -> str:
        _COUNTER[0] += 1
        self.fs.pipe_file(path, data)
        _WRITES[path] = (_COUNTER[0], time.time())
        return self._current(path).version

    def _read(self, name: str) -> Versioned | None:
        with MEMORY_LOCK:
            return self._current(self._path(name))

    def _create(self, name: str, data: bytes) -> str:
        path = self._path(name)
        with MEMORY_LOCK:
            if self._current(path) is not None:
                raise PreconditionFailed(f"{self.url}/{name} exists")
            return self._put(path, data)

    def _replace(self, name: str, data: bytes, version: str) -> str:
        path = self._path(name)
        with MEMORY_LOCK:
            current = self._current(path)
            if current is None or current.version != version:
                raise PreconditionFailed(f"{self.url}/{name} is not at version {version}")
            return self._put(path, data)

    def _delete(self, name: str, version: str) -> None:
        path = self._path(name)
        with MEMORY_LOCK:
            current = self._current(path)
            if current is None:
                return
            if current.version != version:
                raise PreconditionFailed(f"{self.url}/{name} is not at version {version}")
            self.fs.rm_file(path)
            _WRITES.pop(path, None)

    def list(self, prefix: str = "") -> list[str]:
        with MEMORY_LOCK:
            paths = [p for p in self.fs.store if p.startswith(self.root + "/")]
        names = [p[len(self.root) + 1:] for p in paths]
        return sorted(n for n in names if n.startswith(prefix))
