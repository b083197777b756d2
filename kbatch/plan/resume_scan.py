"""What this run does with each manifest row, decided before any model loads, in bounded memory.

:func:`scan` answers the whole-manifest questions for every row position and keeps the answers in one byte
per row (``Scan.states``):

1. the output's records: the metadata of every committed shard (id, row_hash, status, run_id), streamed
   shard by shard and spilled into buckets by a hash of the id (``kbatch.plan.spill_buckets``);
2. the manifest's ids: the ``id`` column only, streamed and spilled into the same buckets with positions;
3. bucket by bucket: duplicate ids (the first occurrence wins) and the join of ids with their records. An id
   with ok records is done; an id whose only records are errors is failed (the latest error counts). Records
   of ids that are not in this manifest are left alone: they never count (docs/faults.md);
4. rows that have records and may have changed since (the manifest files differ from the run that wrote
   them) are validated and compared with the ``row_hash`` of their records: an ok row that changed refuses
   the resume (exit 2, before any model loads); a failed row that changed, or any failed row with
   ``--retry-failed``, is rendered again, and its new records supersede the old errors for every reader.

Rows whose id is unusable (null, malformed) or a duplicate get error records under the synthetic id
``_row<position>``; those records are matched by position.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kbatch.output.job_file import RunOrder, runs_of
from kbatch.plan.manifest import ManifestSource
from kbatch.schema.rows import ID_RE
from kbatch.plan.spill_buckets import Buckets, SpillFolder, bucket_count, id_hash

log = logging.getLogger("kbatch")

# per-position states
NEW = 0  # no records: render (or fail validation)
SKIP_OK = 1  # has its images: skip
SKIP_FAILED = 2  # only error records, unchanged: skip (counts as failed)
RETRY = 3  # only error records, and changed or --retry-failed: render again
DUP = 4  # a later row with an id seen before: an error record under _row<position>
BADID = 5  # id null or malformed: validation gives it an error record under _row<position>
DONE_OK = 6  # (while scanning) ok records; to compare
DONE_ERR = 7  # (while scanning) only error records; to compare

RANGE = 1 << 18  # positions per range file of step 4
_SYNTH = "_row"

_MANIFEST_SCHEMA = pa.schema([("pos", pa.int64()), ("id", pa.string())])
_DONE_SCHEMA = pa.schema([("id", pa.string()), ("ok", pa.bool_()), ("row_hash", pa.string()),
                          ("run_id", pa.string()), ("image_index", pa.int32()), ("error", pa.string()),
                          ("filtered", pa.bool_())])  # ok: the row is done (an image, or filtered by quality.gate)
_CHECK_SCHEMA = pa.schema([("pos", pa.int64()), ("row_hash", pa.string())])


class ChangedRows(ValueError):
    """Rows with ok records whose manifest content changed (``ids``: the first few)."""

    def __init__(self, ids: list[str], count: int):
        self.ids, self.count = ids, count
        super().__init__(f"{count} rows changed since their records were written (ids: {ids[:5]}"
                         f"{' ...' if count > 5 else ''})")

    def __reduce__(self):  # picklable across Ray processes despite the 2-argument constructor
        return (type(self), (self.ids, self.count))


@dataclass
class Scan:
    states: np.ndarray  # uint8 per manifest position
    first_at: dict[int, int] = field(default_factory=dict)  # duplicate position -> first position of its id
    records_ids: int = 0  # distinct ids with committed records in the output (any manifest)
    checked: int = 0  # rows validated in step 4
    images: int = 0  # ok records of this manifest's ids
    duplicate_records: int = 0  # ok records of one (id, image_index) beyond the first (never expected)
    failed_by_reason: dict = field(default_factory=dict)  # rows whose only records are errors, by reason
    failed_examples: list = field(default_factory=list)  # a few (id, error)
    filtered: int = 0  # done rows of this manifest whose every image quality.gate filtered (no ok record)

    @property
    def total(self) -> int:
        return len(self.states)

    def count(self, *states: int) -> int:
        return int(np.isin(self.states, states).sum())

    @property
    def skipped_ok(self) -> int:
        return self.count(SKIP_OK, DONE_OK)

    @property
    def skipped_failed(self) -> int:
        return self.count(SKIP_FAILED, DONE_ERR)

    @property
    def to_render(self) -> int:
        return self.count(NEW, RETRY, DUP, BADID)


def done_records(output: str, storage_options: dict | None, *, workers: int = 16):
    """Record batches (id, ok, row_hash, run_id) of every committed shard of ``output``, streamed with a
    bounded number of shards read ahead."""
    from kbatch.output.writer import list_committed_shards, read_records_table

    shards = list_committed_shards(output, storage_options)

    def read(shard: str) -> pa.Table:
        t = read_records_table(output, ["id", "status", "row_hash", "run_id", "image_index", "error"],
                               storage_options, shards=[shard])
        filtered = pc.fill_null(pc.equal(t.column("status"), "filtered"), False)
        ok = pc.or_(pc.fill_null(pc.equal(t.column("status"), "ok"), False), filtered)
        return pa.table({"id": t.column("id"), "ok": ok, "row_hash": t.column("row_hash"),
                         "run_id": t.column("run_id"), "image_index": t.column("image_index"),
                         "error": t.column("error"), "filtered": filtered}, schema=_DONE_SCHEMA)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for shard in shards:
            pending.append(pool.submit(read, shard))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


def scan(source: ManifestSource, output: str | None = None, storage_options: dict | None = None, *,
         trusted_since: str | None = None, retry_failed: bool = False, check=None,
         runs: list[str] | None = None) -> Scan:
    """States of every manifest row against the records in ``output`` (None: a fresh output).

    ``runs``: the output's runs in the order they ran (``_job.json``'s ``runs``; None: read from the output):
    "later" means later in this list, never a larger run id (run ids start with their machine's clock).
    ``trusted_since``: records written by this run or later ones came from the same manifest files
    (unchanged stamp), so their rows need no check. ``check(cells: list[dict], positions, first_at) -> list[str]``
    gives the fingerprint each row would have now (step 4); without it, rows with records are not compared
    (``kbatch status``)."""
    order = RunOrder(runs if runs is not None or output is None else runs_of(output, storage_options))
    total = source.total
    states = np.zeros(total, dtype=np.uint8)
    out = Scan(states)
    nb = bucket_count(total)
    with SpillFolder() as folder:
        done = Buckets(folder, "done", _DONE_SCHEMA, nb)
        synthetic: dict[int, tuple[str, str, str]] = {}  # position -> (row_hash, run_id, error) of _row<pos>
        if output is not None:
            for t in done_records(output, storage_options):
                ids = t.column("id")
                is_synth = pc.fill_null(pc.starts_with(ids, _SYNTH), False)
                if pc.any(is_synth).as_py():
                    for rid, h, run, err in zip(*(t.filter(is_synth).column(c).to_pylist()
                                                  for c in ("id", "row_hash", "run_id", "error"))):
                        pos = _synthetic_pos(rid)
                        if pos is not None and pos < total and (pos not in synthetic
                                                                or order.key(run) >= order.key(synthetic[pos][1])):
                            synthetic[pos] = (h, run or "", err)
                    t = t.filter(pc.invert(is_synth))
                t = t.filter(pc.is_valid(t.column("id")))
                done.add(t, id_hash(t.column("id")) % nb)
        done.close()

        manifest = Buckets(folder, "manifest", _MANIFEST_SCHEMA, nb)
        for start, batch in source.batches(["id"], batch_size=65536):
            ids = batch.column("id").cast(pa.string())
            valid = pc.fill_null(pc.match_substring_regex(ids, ID_RE.pattern), False)
            positions = np.arange(start, start + batch.num_rows, dtype=np.int64)
            bad = positions[~np.asarray(valid)]
            states[bad] = BADID
            keep = pa.table({"pos": positions, "id": ids}).filter(valid)
            manifest.add(keep, id_hash(keep.column("id")) % nb)
        manifest.close()

        check_later = Buckets(folder, "check", _CHECK_SCHEMA, max(1, -(-total // RANGE)))
        for b in range(nb):
            _join(manifest.read(b), done.read(b), out, check_later, trusted_since, retry_failed, order)
        out.records_ids += len(synthetic)
        for pos, (h, run, err) in synthetic.items():
            if states[pos] in (DUP, BADID):
                _decide(out, check_later, np.array([pos]), False, [h], [run], trusted_since, retry_failed, order)
                _count_failure(out, f"{_SYNTH}{pos}", err)
        check_later.close()
        if check is not None and check_later.rows:
            _compare(source, out, check_later, check)
    return out


def _count_failure(out: Scan, rid: str, error) -> None:
    from kbatch.output.writer import reason_of

    error = None if error is None or error != error else str(error)
    reason = reason_of(error)
    out.failed_by_reason[reason] = out.failed_by_reason.get(reason, 0) + 1
    if len(out.failed_examples) < 5:
        out.failed_examples.append({"id": rid, "error": error})


def _synthetic_pos(rid: str) -> int | None:
    try:
        return int(rid[len(_SYNTH):])
    except ValueError:
        return None


def _join(m: pa.Table, d: pa.Table, out: Scan, check_later: Buckets, trusted_since, retry_failed,
          order: "RunOrder | None" = None) -> None:
    """One bucket: duplicates among the manifest's ids, and which ids have records."""
    if m.num_rows == 0:
        out.records_ids += len(set(d.column("id").to_pylist())) if d.num_rows else 0
        return
    mf = m.to_pandas().sort_values("pos", kind="stable")
    dup = mf.duplicated("id", keep="first").to_numpy()
    if dup.any():
        firsts = mf[~dup].set_index("id")["pos"]
        later = mf[dup]
        out.states[later["pos"].to_numpy()] = DUP
        out.first_at.update(zip(later["pos"].tolist(), firsts.loc[later["id"]].tolist()))
        mf = mf[~dup]
    if d.num_rows == 0:
        return
    df = d.to_pandas()
    # per id: any ok record makes it done; otherwise its latest error counts
    df["run_id"] = df["run_id"].fillna("")
    order = order or RunOrder([])
    df["_known"], df["_rank"] = zip(*(order.key(r)[:2] for r in df["run_id"])) if len(df) else ([], [])
    agg = df.sort_values(["ok", "_known", "_rank", "run_id"], kind="stable").groupby("id", sort=False).tail(1)
    out.records_ids += len(agg)
    j = mf.merge(agg, on="id", how="inner")
    if len(j):
        _decide(out, check_later, j["pos"].to_numpy(), j["ok"].to_numpy(), j["row_hash"].tolist(),
                j["run_id"].tolist(), trusted_since, retry_failed, order)
        ok_records = df[df["ok"] & ~df["filtered"] & df["id"].isin(mf["id"])]
        out.images += len(ok_records)
        if df["filtered"].any():  # rows whose records are all filtered (quality.gate): done, counted apart
            done_filtered = df[df["id"].isin(mf["id"]) & df["ok"]]
            out.filtered += int(done_filtered.groupby("id", sort=False)["filtered"].all().sum())
        out.duplicate_records += int(ok_records.duplicated(["id", "image_index"]).sum())
        for rid, err in zip(j.loc[~j["ok"], "id"], j.loc[~j["ok"], "error"]):
            _count_failure(out, rid, err)


def _decide(out: Scan, check_later: Buckets, pos: np.ndarray, ok, hashes, runs, trusted_since, retry_failed,
            order: "RunOrder | None" = None):
    ok = np.asarray(ok, dtype=bool)
    order = order or RunOrder([])
    trusted = np.array([order.at_or_after(r, trusted_since) for r in runs], dtype=bool)
    states = np.where(ok, SKIP_OK, RETRY if retry_failed else SKIP_FAILED).astype(np.uint8)
    # to compare: untrusted ok rows, and untrusted failed rows unless they are rendered again anyway
    compare = ~trusted & (ok | (not retry_failed))
    states[compare] = np.where(ok[compare], DONE_OK, DONE_ERR)
    out.states[pos] = states
    if compare.any():
        idx = np.flatnonzero(compare)
        t = pa.table({"pos": pos[idx], "row_hash": pa.array([hashes[i] for i in idx], pa.string())})
        check_later.add(t, pos[idx] // RANGE)


def _compare(source: ManifestSource, out: Scan, check_later: Buckets, check) -> None:
    """Step 4: rows with records, validated again and compared with their records' row_hash."""
    changed: list[str] = []
    n_changed = 0
    loaded, lookup_pos, lookup_hash = -1, np.empty(0, np.int64), []
    for start, batch in source.batches(batch_size=4096):
        positions = np.arange(start, start + batch.num_rows)
        st = out.states[start:start + batch.num_rows]
        todo = np.flatnonzero((st == DONE_OK) | (st == DONE_ERR))
        if not len(todo):
            continue
        rows = batch.take(pa.array(todo)).to_pylist()
        now = check(rows, positions[todo], out.first_at)
        out.checked += len(todo)
        for k, i in enumerate(todo):
            p = int(positions[i])
            r = p // RANGE
            if r != loaded:
                t = check_later.read(r).sort_by("pos")
                lookup_pos, lookup_hash, loaded = t.column("pos").to_numpy(), t.column("row_hash").to_pylist(), r
            was = lookup_hash[int(np.searchsorted(lookup_pos, p))]
            same = was is None or was == now[k]  # None: records from before row hashes of invalid rows
            if out.states[p] == DONE_OK:
                if same:
                    out.states[p] = SKIP_OK
                else:
                    n_changed += 1
                    if len(changed) < 5:
                        changed.append(rows[k].get("id"))
            else:
                out.states[p] = SKIP_FAILED if same else RETRY
    if n_changed:
        raise ChangedRows(changed, n_changed)
