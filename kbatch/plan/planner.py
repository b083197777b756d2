"""The manifest stream: rows read, validated and batched a window at a time.

The planner reads the manifest in record batches, skips the rows the scan (``kbatch.plan.resume_scan``) found done,
validates the others and collects ``resources.plan_window`` valid rows into a window. A window is sorted by
(decoder key, prior key) and cut into prior batches, so rows that can share forward passes meet, without a
global sort (memory: one window, whatever the manifest). Invalid rows become error records at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa

from kbatch.config import JobConfig, batch_of
from kbatch.plan.resume_scan import BADID, DUP, NEW, RETRY, Scan
from kbatch.plan.manifest import ManifestSource
from kbatch.schema.rows import Row
from kbatch.schema.records import error_record
from kbatch.plan.validate import RowError, synthetic_id, validate_record

_TO_READ = np.array([NEW, RETRY, DUP, BADID], dtype=np.uint8)


def images(rows) -> int:
    """Images the stages render for ``rows`` (``quality.best_of`` candidates included)."""
    return sum(r.renders for r in rows)


def chunk(rows: list[Row], key, max_images: int) -> list[list[Row]]:
    """Consecutive runs of rows with equal ``key(row)``, each at most ``max_images`` images (>= 1 row)."""
    out: list[list[Row]] = []
    cur: list[Row] = []
    k_cur = None
    n_cur = 0
    for r in rows:
        k = key(r)
        if cur and (k != k_cur or n_cur + r.renders > max_images):
            out.append(cur)
            cur, n_cur = [], 0
        if not cur:
            k_cur = k
        cur.append(r)
        n_cur += r.renders
    if cur:
        out.append(cur)
    return out


def sort_key(r: Row) -> tuple:
    """Group rows that can share forward passes: decoder key first (the expensive stage), then prior key."""
    return (repr(r.decoder_key()), repr(r.prior_key()))


def invalid_record(err: RowError, cells: dict, run_id: str) -> dict:
    """The error record of a row that failed validation (or has an unusable or duplicate id)."""
    base = {"id": err.id, "mode": _str(cells.get("mode")), "prompt": _str(cells.get("prompt")),
            "negative_prompt": _str(cells.get("negative_prompt")), "run_id": run_id, "row_hash": err.raw_hash}
    return error_record(base, err.message)


def _str(v):
    return v if isinstance(v, str) else None


@dataclass
class Window:
    """What the planner hands the driver: prior batches (lists of rows sharing a prior key, sorted by
    decoder key), error records of invalid rows, and per row what a stage needs besides the ``Row``:
    ``extra[id]`` = the manifest cells of a ``stage: prior`` row, or the location of a ``stage: decoder``
    row's stored embeddings."""

    batches: list[list[Row]] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    rows: int = 0  # manifest rows this window accounts for (valid + invalid)


class Planner:
    """Streams ``source`` (after ``scan``) as windows. ``validate(cells, position)`` is also what the scan
    uses to check rows that have records, so both see a row the same way."""

    def __init__(self, cfg: JobConfig, source: ManifestSource, scan: Scan, run_id: str):
        self.cfg, self.source, self.scan, self.run_id = cfg, source, scan, run_id
        self.columns = set(source.columns)
        self._stream: Iterator | None = None
        self.exhausted = False
        self.read_rows = 0  # manifest rows consumed (skipped ones included)
        self.windows = 0

    # -- one row ----------------------------------------------------------------------------------------
    def validate(self, cells: dict, position: int, first_at: dict | None = None) -> Row | RowError:
        interpolated = False
        if self.cfg.stage == "decoder" and cells.get("mode") == "interpolate":
            # an interpolate row decodes like text2img: its mix was used up by the prior
            cells, interpolated = {**cells, "mode": "text2img"}, True
        first_at = self.scan.first_at if first_at is None else first_at
        out = validate_record(cells, position, self.cfg, self.source.base_uri, self.columns, first_at.get(position))
        if interpolated and isinstance(out, Row):
            out.mode = "interpolate"
            out.row_hash = out.fingerprint()
        if isinstance(out, Row):  # quality.best_of: the row's images are rendered with k candidate seeds
            out.candidates = self.cfg.quality.best_of
        return out

    def fingerprints(self, rows: list[dict], positions, first_at: dict) -> list[str]:
        """What the scan compares with the records' row_hash (``index.scan(check=...)``)."""
        out = []
        for cells, p in zip(rows, positions):
            v = self.validate(cells, int(p), first_at)
            out.append(v.row_hash if isinstance(v, Row) else v.raw_hash)
        return out

    # -- the stream ---------------------------------------------------------------------------------------
    def _rows(self) -> Iterator[tuple[int, dict | None]]:
        """(position, cells) of the rows this run renders; (position, None) for a skipped stretch."""
        states = self.scan.states
        for start, batch in self.source.batches(batch_size=4096):
            st = states[start:start + batch.num_rows]
            todo = np.flatnonzero(np.isin(st, _TO_READ))
            if len(todo) == batch.num_rows:
                for k, cells in enumerate(batch.to_pylist()):
                    yield start + k, cells
            elif len(todo):
                for k, cells in zip(todo, batch.take(pa.array(todo)).to_pylist()):
                    yield start + int(k), cells
            self.read_rows += batch.num_rows - len(todo)

    def next_window(self) -> Window | None:
        """The next window, or None at the end of the manifest."""
        if self.exhausted:
            return None
        if self._stream is None:
            self._stream = self._rows()
        w = Window()
        valid: list[Row] = []
        limit = self.cfg.resources.plan_window
        for pos, cells in self._stream:
            self.read_rows += 1
            w.rows += 1
            out = self.validate(cells, pos)
            if isinstance(out, RowError):
                if out.id is None:
                    out.id = synthetic_id(pos)
                w.errors.append(invalid_record(out, cells, self.run_id))
            else:
                valid.append(out)
                self._extra(w, out, cells, pos)
            if len(valid) >= limit:
                break
        else:
            self.exhausted = True
        valid.sort(key=sort_key)
        w.batches = self._cut(valid)
        self.windows += 1
        return w if (w.rows or not self.exhausted) else None

    def _extra(self, w: Window, row: Row, cells: dict, pos: int):
        if self.cfg.stage == "prior":
            from kbatch.output.embeddings import cells as prior_cells

            w.extra[row.id] = prior_cells(row, cells)
        elif self.cfg.stage == "decoder":
            uri, index = self.source.locate(pos)
            w.extra[row.id] = (uri, index, row.id)

    def _cut(self, rows: list[Row]) -> list[list[Row]]:
        res = self.cfg.resources
        if self.cfg.stage == "decoder":  # stored embeddings are read in decoder batches
            return chunk(rows, Row.decoder_key, batch_of(res.decoder))
        return chunk(rows, Row.prior_key, res.prior.batch_size)
