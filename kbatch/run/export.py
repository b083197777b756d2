"""``kbatch export OUTPUT DEST`` / ``kbatch.export(...)`` (docs/export.md): the ok images of an output whose
records match a pandas expression, streamed to webdataset tars, Parquet shards or a ``datasets`` folder,
with the embeddings beside them in the clip-retrieval layout and near-duplicates dropped on request.

The driver reads the output one source shard at a time (records and embeddings; never images), keeps the
ok records that match ``where`` (``DataFrame.eval`` per shard), drops near-duplicates (``run/dedup.py``), and
cuts what is left into export shards of ``shard_size`` samples, in the output's shard order: the same output
and arguments always give the same shards. Each export shard (its records and embeddings) is written by
``output/export_formats.py``: as a Ray task when Ray is connected (bounded in flight), else in this process.
``DEST/_export.json`` names the arguments, the source (its committed shards), the finished shards and the
counts: a rerun with the same arguments skips the finished shards; other arguments are refused, naming them.
Memory: one source shard, the export shards in flight, and the dedup index (4 x D bytes per kept image).
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kbatch import storage
from kbatch.config import ConfigError
from kbatch.output import commits
from kbatch.output.export_formats import (FORMATS, PROGRESS_FILE, ExportSpec, ShardWritten, data_name,
                                          remove_temps, write_card, write_export_shard)
from kbatch.output.job_file import JOB_FILE, now_iso
from kbatch.output.image_embeddings import iter_shard_embeddings
from kbatch.output.writer import pandas_types_mapper
from kbatch.schema.records import RECORD_SCHEMA

EXIT_OK, EXIT_CONFIG, EXIT_INCOMPLETE = 0, 2, 3
SAVE_EVERY = 5.0  # seconds between rewrites of _export.json while shards finish (and at the end)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ExportError(ConfigError):
    """An export refused before writing (bad expression, other arguments than DEST's export, ...): exit 2."""


@dataclass
class ExportResult:
    dest: str
    format: str
    shards: int = 0  # export shards in DEST
    written: int = 0  # written by this call
    resumed: int = 0  # found finished in DEST
    images: int = 0  # samples in DEST
    scanned: int = 0  # ok records read from the output
    matched: int = 0  # of those, matching ``where``
    duplicates: int = 0  # of those, dropped by ``dedup``
    bytes: int = 0  # written by this call
    seconds: float = 0.0
    embeddings: bool = False
    exit_code: int = EXIT_OK

    def summary_line(self) -> str:
        dup = f", {self.duplicates} near-duplicates dropped" if self.duplicates else ""
        return (f"kbatch export: {self.images} images in {self.shards} {self.format} shards ({self.written} "
                f"written, {self.resumed} already there); {self.matched} of {self.scanned} ok images matched"
                f"{dup}; {self.seconds:.1f}s")


@dataclass
class _Unit:
    index: int
    records: pa.Table
    embeddings: np.ndarray | None


@dataclass
class _Counts:
    scanned: int = 0
    matched: int = 0
    duplicates: int = 0
    source_shards: int = 0
    embeddings: bool | None = None  # None: no ok record seen yet


# ---------------------------------------------------------------------------------------------- the source
def source_shards(output: str, storage_options: dict | None) -> dict[str, str]:
    """``{shard: metadata file its commit names}`` of the output's committed shards, in order."""
    fs, root = storage.get_fs(output, storage_options)
    return {s: commits.meta_file(s, rec) for s, rec in commits.read_all(fs, root).items()}


def _fingerprint(shards: dict[str, str]) -> str:
    h = hashlib.sha256()
    for s, meta in shards.items():
        h.update(f"{s}\0{meta}\n".encode())
    return h.hexdigest()


def iter_source(output: str, storage_options: dict | None) -> Iterator[tuple[pa.Table, np.ndarray | None]]:
    """Per committed shard: its standing records and their embeddings row by row (None: the output has none;
    ``output/image_embeddings.py``)."""
    return iter_shard_embeddings(output, storage_options)


# ---------------------------------------------------------------------------------------------- where
def _columns_message(columns: list[str]) -> str:
    return "columns: " + ", ".join(columns)


def check_where(where: str, schema: pa.Schema) -> None:
    """Refuse an expression that does not parse, names an unknown column or gives no True/False per record
    (evaluated on no records of this schema)."""
    _match(where, schema.empty_table().to_pandas(types_mapper=pandas_types_mapper()), schema.names)


def _match(where: str, df, columns: list[str]) -> np.ndarray:
    import pandas as pd

    try:
        out = df.eval(where, engine="python", local_dict={}, global_dict={})
    except pd.errors.UndefinedVariableError as e:
        raise ExportError(f"--where {where!r}: {e}; {_columns_message(columns)}") from None
    except Exception as e:  # noqa: BLE001  (syntax, types, unsupported functions: pandas' own words)
        raise ExportError(f"--where {where!r}: {type(e).__name__}: {e}; {_columns_message(columns)}") from None
    if isinstance(out, pd.DataFrame) or not isinstance(out, pd.Series) or not (
            pd.api.types.is_bool_dtype(out.dtype) or (len(out) == 0 and out.dtype == object)):
        kind = type(out).__name__ if not isinstance(out, pd.Series) else f"a {out.dtype} column"
        raise ExportError(f"--where {where!r} must give True or False for each record, it gives {kind} "
                          f"(e.g. 'clip_score > 28 and score_aesthetic > 6'); {_columns_message(columns)}")
    return out.fillna(False).to_numpy(dtype=bool)


def match_records(where: str | None, table: pa.Table) -> np.ndarray:
    """Which records of ``table`` match ``where`` (all: None)."""
    if not where:
        return np.ones(table.num_rows, dtype=bool)
    names = [c for c in table.column_names if c in set(_NAME.findall(where))]  # only the columns it names
    df = table.select(names).to_pandas(types_mapper=pandas_types_mapper())
    if not names:
        import pandas as pd

        df = pd.DataFrame(index=range(table.num_rows))
    return _match(where, df, table.column_names)


# ---------------------------------------------------------------------------------------------- the plan
def plan(chunks: Iterator[tuple[pa.Table, np.ndarray | None]], where: str | None, dedup: float | None,
         shard_size: int, shards: set[str], counts: _Counts) -> Iterator[_Unit]:
    """Export shards of ``shard_size`` samples (the last one fewer) from the source chunks, in order."""
    from kbatch.run.dedup import NearDuplicates

    near = NearDuplicates(dedup) if dedup is not None else None
    tables: list[pa.Table] = []
    embs: list[np.ndarray | None] = []
    pending = index = 0

    def cut(n: int) -> _Unit:
        nonlocal tables, embs, pending, index
        t = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        e = None if embs[0] is None else np.concatenate(embs) if len(embs) > 1 else embs[0]
        unit = _Unit(index, t.slice(0, n), None if e is None else e[:n])
        index += 1
        pending -= n
        tables = [t.slice(n)] if pending else []
        embs = [None if e is None else e[n:]] if pending else []
        return unit

    for table, emb in chunks:
        keep = np.asarray(pc.fill_null(pc.equal(table.column("status"), "ok"), False), dtype=bool)
        if "shard" in table.column_names:  # shards committed after the export began are left out
            inside = np.array([s in shards for s in table.column("shard").to_pylist()], dtype=bool)
            keep &= inside
            counts.source_shards += 1 if inside.any() else 0
        if not keep.any():
            continue
        idx = np.flatnonzero(keep)
        t, e = table.take(idx), None if emb is None else np.asarray(emb)[idx]
        counts.scanned += t.num_rows
        if counts.embeddings is None:
            counts.embeddings = e is not None
            if near is not None and e is None:
                raise ExportError("--dedup needs image embeddings and this output has none: render it with "
                                  "quality.image_embeddings: true (docs/quality.md)")
        elif counts.embeddings != (e is not None):
            raise ValueError("some shards of the output have embeddings and some do not")
        m = match_records(where, t)
        if not m.all():
            t, e = t.filter(pa.array(m)), None if e is None else e[m]
        counts.matched += t.num_rows
        if near is not None and t.num_rows:
            k = near.keep(e)
            counts.duplicates += int((~k).sum())
            if not k.all():
                t, e = t.filter(pa.array(k)), e[k]
        if not t.num_rows:
            continue
        tables.append(t)
        embs.append(e)
        pending += t.num_rows
        while pending >= shard_size:
            yield cut(shard_size)
    if pending:
        yield cut(pending)


# ---------------------------------------------------------------------------------------------- progress
class _Bar:
    """tqdm in a terminal (``auto``, ``bar``), a log line every 30 s (``log``), nothing (``off``)."""

    def __init__(self, mode: str, done_images: int):
        from kbatch.run.progress import _interactive

        if mode == "auto":
            mode = "bar" if _interactive() else "log"
        self.mode, self.images, self.last = mode, done_images, time.monotonic()
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=None, initial=done_images, unit="img", desc="kbatch export", dynamic_ncols=True)

    def update(self, images: int, counts: _Counts, total_shards: int, planned: int):
        self.images += images
        if self.bar is not None:  # the total as estimated from the share of source shards planned so far
            est = planned * total_shards / counts.source_shards if counts.source_shards else planned
            self.bar.total = max(int(est), self.images)
            self.bar.set_postfix_str(f"source shards {counts.source_shards}/{total_shards}, matched "
                                     f"{counts.matched}/{counts.scanned}"
                                     + (f", {counts.duplicates} duplicates" if counts.duplicates else ""),
                                     refresh=False)
            self.bar.update(images)
        elif self.mode == "log" and time.monotonic() - self.last >= 30:
            self.last = time.monotonic()
            print(f"kbatch export: {self.images} images written; source shards {counts.source_shards}/"
                  f"{total_shards}, matched {counts.matched}/{counts.scanned}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------- running
def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # not imported: not connected (and importing it costs seconds)
    return ray is not None and ray.is_initialized()


class _Runner:
    """Export shards written in this process, or as Ray tasks (at most ``in_flight`` at once)."""

    def __init__(self, spec: ExportSpec, in_flight: int | None, use_ray: bool | None):
        self.spec = spec
        self.ray = None
        self.futures: dict = {}
        in_memory = storage.process_local(spec.dest) or storage.process_local(spec.source)  # memory://: here only
        if use_ray or (use_ray is None and _ray_connected() and not in_memory):
            import ray

            if not ray.is_initialized():
                raise ExportError("ray=True needs a connected Ray (ray.init(...) first)")
            self.ray = ray
            cpus = int(ray.cluster_resources().get("CPU", 1))
            self.limit = max(1, in_flight or min(64, 2 * cpus))
            options: dict = {"num_cpus": 1, "max_retries": 2}
            if storage.node_local(spec.dest) or storage.node_local(spec.source):
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                # a local folder is on this node only (a shared mount is on all: still correct here)
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                    node_id=ray.get_runtime_context().get_node_id(), soft=False)
            self.task = ray.remote(write_export_shard).options(**options)
        else:
            self.limit = 1

    def submit(self, unit: _Unit) -> list[ShardWritten]:
        """Start ``unit``; returns the shards that finished meanwhile (waiting while ``limit`` are out)."""
        if self.ray is None:
            return [write_export_shard(self.spec, unit.index, unit.records, unit.embeddings)]
        records = unit.records.take(pa.array(np.arange(unit.records.num_rows)))  # its own buffers: a pickled
        # slice carries the whole buffers it points into
        self.futures[self.task.remote(self.spec, unit.index, records, unit.embeddings)] = unit.index
        return self._collect(block=len(self.futures) >= self.limit)

    def _collect(self, block: bool) -> list[ShardWritten]:
        if not self.futures:
            return []
        ready, _ = self.ray.wait(list(self.futures), num_returns=1 if block else len(self.futures),
                                 timeout=None if block else 0)
        out = []
        for ref in ready:
            self.futures.pop(ref)
            out.append(self.ray.get(ref))
        return out

    def drain(self) -> Iterator[ShardWritten]:
        while self.futures:
            yield from self._collect(block=True)

    def cancel(self):
        if self.ray is not None:
            for ref in list(self.futures):
                self.ray.cancel(ref)
            self.futures.clear()


def _same_place(a: str, b: str) -> bool:
    if storage.node_local(a) and storage.node_local(b):
        a, b = os.path.realpath(storage.absolute_local(a)), os.path.realpath(storage.absolute_local(b))
        return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")
    return a.rstrip("/") == b.rstrip("/")


def _check_dest(dest: str, output: str, so: dict | None, args: dict, fingerprint: str, n_source: int,
                overwrite: bool) -> dict | None:
    """The progress record of an earlier export into ``dest`` with these arguments (None: a new export).
    Refuses a DEST inside OUTPUT (or the reverse), a non-empty DEST that holds no kbatch export, and an
    export with other arguments or of an output that changed since (unless ``overwrite``)."""
    if _same_place(dest, output):
        raise ExportError(f"DEST {dest} and OUTPUT {output} overlap: export to a folder outside the output")
    fs, root = storage.get_fs(dest, so)
    previous = storage.read_json(dest, PROGRESS_FILE, so)
    if previous is None:
        try:
            entries = [e for e in fs.ls(root, detail=False)] if fs.exists(root) else []
        except FileNotFoundError:
            entries = []
        if entries:
            raise ExportError(f"DEST {dest} is not empty and holds no kbatch export ({PROGRESS_FILE}): export to "
                              "an empty or new folder")
        return None
    if overwrite:
        _remove_export(fs, root)
        return None
    old = previous.get("args") or {}
    differ = [f"{k}: {old.get(k)!r} then, {args[k]!r} now" for k in args if old.get(k) != args[k]]
    if differ:
        raise ExportError(f"DEST {dest} holds an export made with other arguments ({'; '.join(differ)}): rerun "
                          "with the same arguments to resume it, export to a new DEST, or pass --overwrite")
    if previous.get("source_fingerprint") != fingerprint:
        raise ExportError(f"OUTPUT {output} changed since the export into {dest} began ("
                          f"{previous.get('source_shards')} committed shards then, {n_source} now): export to "
                          "a new DEST, or pass --overwrite")
    return previous


def _remove_export(fs, root: str) -> None:
    """Delete what an export wrote in DEST (its data files, embeddings, card and progress record)."""
    for name in ("data", "embeddings"):
        p = storage.join(root, name)
        if fs.exists(p):
            fs.rm(p, recursive=True)
    for p in fs.ls(root, detail=False) if fs.exists(root) else []:
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if re.fullmatch(r"\d{5,}\.tar", base) or base in ("README.md", PROGRESS_FILE) or ".export-tmp-" in base:
            fs.rm(p)


def export(output: str, dest: str, where: str | None = None, *, format: str = "webdataset",
           dedup: float | None = None, shard_size: int = 1000, storage_options: dict | None = None,
           progress: str = "auto", max_in_flight: int | None = None, overwrite: bool = False,
           ray: bool | None = None) -> ExportResult:
    """Export the ok images of ``output`` whose records match ``where`` (a pandas expression over the record
    columns, e.g. ``"clip_score > 28 and score_aesthetic > 6"``; None: all) into ``dest`` as ``format``
    (``webdataset``, ``parquet`` or ``hf``), ``shard_size`` samples per shard, the embeddings beside them
    when the output has them; ``dedup``: drop images whose embedding cosine with an earlier kept one is >=
    it. Resumes an interrupted export into ``dest`` made with the same arguments. ``ray``: write the shards
    as Ray tasks (None: when Ray is connected; False: in this process). Raises ``ExportError`` (a
    ``ConfigError``: exit 2) before writing for a bad expression, format, DEST or arguments that differ from
    DEST's export. ``storage_options`` open both ``output`` and ``dest``."""
    t0 = time.perf_counter()
    so = dict(storage_options or {}) or None
    if format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}; got {format!r}")
    if progress not in ("auto", "bar", "log", "off"):
        raise ExportError(f"progress must be one of auto, bar, log, off; got {progress!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ExportError(f"--shard-size must be an integer >= 1, got {shard_size!r}")
    if dedup is not None:
        from kbatch.run.dedup import NearDuplicates

        NearDuplicates(dedup)  # the cosine's range and faiss, before anything is read
    where = (where or "").strip() or None
    output, dest = storage.absolute_local(str(output)), storage.absolute_local(str(dest))  # Ray tasks: other cwd
    job = storage.read_json(output, JOB_FILE, so)
    shards = source_shards(output, so)
    if job is None and not shards:
        raise ExportError(f"OUTPUT {output} holds no kbatch output (no {JOB_FILE}, no committed shard)")
    if job and (job.get("config") or {}).get("stage") == "prior":
        raise ExportError(f"OUTPUT {output} holds prior embeddings (stage: prior), no images: render them with "
                          "stage: decoder first (docs/output.md)")
    args = {"where": where, "format": format, "dedup": dedup, "shard_size": shard_size}
    fingerprint = _fingerprint(shards)
    chunks = iter_source(output, so)
    first = next(chunks, None)
    if where:
        check_where(where, first[0].schema if first is not None else RECORD_SCHEMA)
    previous = _check_dest(dest, output, so, args, fingerprint, len(shards), overwrite)
    done: dict[int, int] = {int(k): int(v) for k, v in ((previous or {}).get("done") or {}).items()}
    started = (previous or {}).get("started") or now_iso()
    mtime = int((previous or {}).get("mtime") or time.time())
    counts = _Counts()
    units = plan(_chain(first, chunks), where, dedup, shard_size, set(shards), counts)
    first_unit = next(units, None)  # the expression has met real records before anything is written
    runner = _Runner(ExportSpec(source=output, dest=dest, format=format, storage_options=dict(so or {}),
                                mtime=mtime), max_in_flight, ray)
    if format == "hf":
        write_card(dest, so)
    remove_temps(dest, so)
    record = {"kbatch_export": 1, "source": output, "args": args, "source_fingerprint": fingerprint,
              "source_shards": len(shards), "started": started, "mtime": mtime, "status": "running",
              "done": {str(k): v for k, v in sorted(done.items())}}
    storage.write_json_atomic(dest, PROGRESS_FILE, record, so)
    result = ExportResult(dest=dest, format=format)
    bar = _Bar(progress, sum(done.values()))
    planned = sum(done.values())
    last_save = time.monotonic()

    def finished(items: list[ShardWritten]):
        nonlocal last_save
        for w in items:
            done[w.index] = w.images
            result.written += 1
            result.bytes += w.bytes
            bar.update(w.images, counts, len(shards), planned)
        if items and time.monotonic() - last_save >= SAVE_EVERY:
            _save(dest, so, record, done, counts, "running")
            last_save = time.monotonic()

    status = "incomplete"
    try:
        for unit in _chain(first_unit, units):
            if unit.index in done:
                result.resumed += 1
                continue
            planned += unit.records.num_rows
            finished(runner.submit(unit))
        finished(list(runner.drain()))
        status = "complete"
    finally:
        runner.cancel()
        bar.close()
        _save(dest, so, record, done, counts, status)
    n_shards = (max(done) + 1) if done else 0
    result.shards, result.images = n_shards, sum(done.values())
    result.scanned, result.matched, result.duplicates = counts.scanned, counts.matched, counts.duplicates
    result.embeddings = bool(counts.embeddings)
    result.seconds = time.perf_counter() - t0
    return result


def _chain(first, rest):
    if first is not None:
        yield first
    yield from rest


def _save(dest: str, so: dict | None, record: dict, done: dict[int, int], counts: _Counts, status: str):
    record.update(status=status, updated=now_iso(), done={str(k): v for k, v in sorted(done.items())},
                  counts={"shards": len(done), "images": sum(done.values()), "scanned": counts.scanned,
                          "matched": counts.matched, "duplicates": counts.duplicates,
                          "embeddings": bool(counts.embeddings)})
    storage.write_json_atomic(dest, PROGRESS_FILE, record, so)


__all__ = ["ExportError", "ExportResult", "export", "data_name"]
