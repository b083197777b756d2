"""Hash- and range-partitioned spill files: whole-manifest questions answered in bounded memory.

"Is this id a duplicate?" and "does this id have records in the output?" are questions about every row at
once. Instead of a dict of every id in the driver (tens of bytes per row, gigabytes at ten million rows),
rows are written to local temp files partitioned by a hash of the id (:class:`Buckets`) and each partition
is answered alone: memory is one partition, whatever the size of the manifest.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc


def id_hash(ids: pa.Array) -> np.ndarray:
    """uint64 hash of each string (nulls hash like the empty string: callers drop them first)."""
    import pandas as pd

    values = ids.fill_null("").to_numpy(zero_copy_only=False)
    return pd.util.hash_array(values.astype(object), categorize=False)


def bucket_count(rows: int, per_bucket: int = 1 << 16) -> int:
    """A power of two in [1, 256] giving about ``per_bucket`` rows per bucket."""
    n = 1
    while n < 256 and rows > n * per_bucket:
        n *= 2
    return n


class Buckets:
    """``n`` append-only Arrow files of one schema in a temp folder; rows go to ``part[i]`` by the caller's
    choice (a hash of the id modulo ``n``, or a position range). Buffered: a partition's rows are written
    once ``flush_rows`` of them are waiting."""

    def __init__(self, folder: str, name: str, schema: pa.Schema, n: int, flush_rows: int = 8192):
        self.folder, self.name, self.schema, self.n = folder, name, schema, n
        self.flush_rows = flush_rows
        self._buf: list[list[pa.RecordBatch]] = [[] for _ in range(n)]
        self._buffered = [0] * n
        self._writers: dict[int, ipc.RecordBatchStreamWriter] = {}
        self.rows = 0

    def _path(self, i: int) -> str:
        return os.path.join(self.folder, f"{self.name}-{i:03d}.arrow")

    def add(self, table: pa.Table | pa.RecordBatch, part: np.ndarray) -> None:
        """Append the rows of ``table``; row ``k`` goes to partition ``part[k]``."""
        if len(part) == 0:
            return
        self.rows += len(part)
        if self.n == 1:
            self._append(0, table)
            return
        order = np.argsort(part, kind="stable")
        sorted_parts = part[order]
        bounds = np.flatnonzero(np.diff(sorted_parts)) + 1
        taken = table.take(pa.array(order))
        for chunk_start, chunk_end in zip(np.r_[0, bounds], np.r_[bounds, len(order)]):
            self._append(int(sorted_parts[chunk_start]), taken.slice(chunk_start, chunk_end - chunk_start))

    def _append(self, i: int, table) -> None:
        batches = table.to_batches() if isinstance(table, pa.Table) else [table]
        self._buf[i].extend(b for b in batches if b.num_rows)
        self._buffered[i] += table.num_rows
        if self._buffered[i] >= self.flush_rows:
            self._flush(i)

    def _flush(self, i: int) -> None:
        if not self._buf[i]:
            return
        w = self._writers.get(i)
        if w is None:
            w = self._writers[i] = ipc.new_stream(self._path(i), self.schema)
        for b in self._buf[i]:
            w.write_batch(b.cast(self.schema) if b.schema != self.schema else b)
        self._buf[i], self._buffered[i] = [], 0

    def close(self) -> None:
        for i in range(self.n):
            self._flush(i)
        for w in self._writers.values():
            w.close()
        self._writers.clear()

    def read(self, i: int) -> pa.Table:
        """Partition ``i`` (after :meth:`close`)."""
        path = self._path(i)
        if not os.path.exists(path):
            return self.schema.empty_table()
        with ipc.open_stream(path) as r:
            return r.read_all()


class SpillFolder:
    """A temp folder removed on exit (``with SpillFolder() as folder:``)."""

    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix="kbatch-spill-")
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
