"""Summary of an output location: rows done / failed (by reason) / missing, and whether the run is complete.

Only committed shards count (a shard without ``_commits/<shard>.json`` is reported as uncommitted). The run is
complete when the completion marker ``_SUCCESS`` exists and no manifest row is missing.
"""
from __future__ import annotations

from typing import Any

from . import storage
from .writer import list_committed_shards, read_records, reason_of

SUCCESS_MARKER = "_SUCCESS"
JOB_FILE = "_job.json"


def _uncommitted(fs, base: str, committed: set[str]) -> list[str]:
    """Shards with data, metadata or stats objects but no commit record (a write died midway)."""
    names: set[str] = set()
    names |= set(storage.list_names(fs, storage.join(base, "meta"), ".parquet"))
    names |= set(storage.list_names(fs, storage.join(base, "stats"), ".json"))
    names |= set(storage.list_names(fs, storage.join(base, "data"), ".parquet"))
    names |= set(storage.list_names(fs, storage.join(base, "tars"), ".tar"))
    names |= set(storage.list_names(fs, storage.join(base, "images"), dirs=True))
    return sorted(names - committed)


def summarize(root: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Counts of an output location (see module docstring); plain JSON-able values."""
    fs, base = storage.get_fs(root, storage_options)
    job = storage.read_json(root, JOB_FILE, storage_options)
    committed = list_committed_shards(root, storage_options)
    df = read_records(root, columns=["id", "image_index", "status", "error"], storage_options=storage_options)
    success = storage.exists(root, SUCCESS_MARKER, storage_options)

    rows_done = rows_ok = images = 0
    failed_by_reason: dict[str, int] = {}
    failed_examples: list[dict] = []
    duplicates = 0
    if len(df):
        is_ok = df["status"] == "ok"
        images = int(is_ok.sum())
        all_ok = is_ok.groupby(df["id"]).all()
        rows_done = int(len(all_ok))
        rows_ok = int(all_ok.sum())
        failed_ids = set(all_ok.index[~all_ok.values])
        if failed_ids:
            err = df[df["id"].isin(failed_ids) & ~is_ok].drop_duplicates("id")
            for rid, e in zip(err["id"].tolist(), err["error"].tolist()):
                e = None if e is None or e != e else str(e)
                r = reason_of(e)
                failed_by_reason[r] = failed_by_reason.get(r, 0) + 1
                if len(failed_examples) < 5:
                    failed_examples.append({"id": str(rid), "error": e})
            # failed ids whose only non-ok records lack an error record still count
            missing_reason = len(failed_ids) - int(err["id"].nunique())
            if missing_reason > 0:
                failed_by_reason["unknown"] = failed_by_reason.get("unknown", 0) + missing_reason
        duplicates = int(df.duplicated(["id", "image_index"]).sum())
    rows_failed = rows_done - rows_ok

    total = None
    if job is not None and job.get("total_rows") is not None:
        try:
            total = int(job["total_rows"])
        except (TypeError, ValueError):
            total = None
    rows_missing = max(total - rows_done, 0) if total is not None else None
    uncommitted = _uncommitted(fs, base, set(committed))
    return {
        "root": root,
        "run_id": (job or {}).get("run_id"),
        "rows_total": total,
        "rows_done": rows_done,
        "rows_ok": rows_ok,
        "rows_failed": rows_failed,
        "failed_by_reason": dict(sorted(failed_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        "failed_examples": failed_examples,
        "rows_missing": rows_missing,
        "images": images,
        "shards": len(committed),
        "uncommitted_shards": len(uncommitted),
        "uncommitted_shard_names": uncommitted[:20],
        "duplicate_records": duplicates,
        "success_marker": bool(success),
        "complete": bool(success and rows_missing == 0),
        "job": job,
    }


def format_summary(summary: dict) -> str:
    """Readable multi-line text of :func:`summarize`'s result."""
    s = summary
    total = s.get("rows_total")
    lines = [f"output:   {s.get('root')}"]
    job = s.get("job") or {}
    if s.get("run_id"):
        lines.append(f"run:      {s['run_id']}")
    if job.get("started") or job.get("finished"):
        lines.append(f"started:  {job.get('started') or '-'}   finished: {job.get('finished') or '-'}")
    lines.append(f"rows:     {s.get('rows_done', 0)} done of {total if total is not None else '? (no _job.json total)'}")
    lines.append(f"  ok:      {s.get('rows_ok', 0)}")
    lines.append(f"  failed:  {s.get('rows_failed', 0)}")
    for reason, n in (s.get("failed_by_reason") or {}).items():
        lines.append(f"    {n:>8}  {reason}")
    for ex in s.get("failed_examples") or []:
        lines.append(f"    e.g. {ex['id']}: {ex['error']}")
    missing = s.get("rows_missing")
    lines.append(f"  missing: {missing if missing is not None else 'unknown'}")
    lines.append(f"images:   {s.get('images', 0)}")
    lines.append(f"shards:   {s.get('shards', 0)} committed, {s.get('uncommitted_shards', 0)} uncommitted"
                 + (" (a writer died before committing; a rerun rewrites them)" if s.get("uncommitted_shards") else ""))
    if s.get("duplicate_records"):
        lines.append(f"warning:  {s['duplicate_records']} duplicate (id, image_index) records")
    unseen = job.get("unseen_shards") or []
    if unseen:
        lines.append(f"warning:  the last run committed {len(unseen)} shard(s) this location does not hold "
                     f"(e.g. {unseen[0]}): written on another node's local disk? Use shared or object storage")
    if s.get("complete"):
        state = "COMPLETE"
    elif not s.get("success_marker") and (missing == 0):
        state = "INCOMPLETE (all rows have records, but the completion marker _SUCCESS is missing)"
    else:
        state = "INCOMPLETE"
    lines.append(f"status:   {state}")
    return "\n".join(lines)
