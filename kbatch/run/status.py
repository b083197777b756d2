"""Summary of an output location: rows done / failed (by reason) / missing, and whether the run is complete.

Counts are for the ids of the manifest the last run was given (docs/faults.md), when that manifest can still be
read: the same scan a run does before it starts (``kbatch.plan.resume_scan``), in bounded memory. Records of ids that
are not in that manifest are left alone and reported apart. Without a readable manifest (an in-memory
DataFrame, a deleted file) the records themselves are counted. Only committed shards count, and a row
rendered again supersedes its old error records. A run in progress shows its ``progress`` and who holds the
output's lease, and on a cluster shared with other kbatch jobs its place among them (``_job.json``'s
``schedule``: ``QUEUED`` with its position and the runs ahead, or its GPUs held / allotted; docs/clusters.md). The output is complete when the completion marker ``_SUCCESS`` names the run ``_job.json`` names, that run
ended complete, and no row is missing (docs/output.md).
"""
from __future__ import annotations

import time
from typing import Any

from kbatch import storage
from kbatch.output.job_file import JOB_FILE, SUCCESS_FILE
from kbatch.output.markers import complete as complete_by_markers, read_marker
from kbatch.output.writer import list_committed_shards, read_records, reason_of


def _uncommitted(fs, base: str, committed: set[str]) -> list[str]:
    """Shards with data, metadata or stats objects but no commit record (a write died midway)."""
    names: set[str] = set()
    names |= set(storage.list_names(fs, storage.join(base, "meta"), ".parquet"))
    names |= set(storage.list_names(fs, storage.join(base, "stats"), ".json"))
    names |= set(storage.list_names(fs, storage.join(base, "data"), ".parquet"))
    names |= set(storage.list_names(fs, storage.join(base, "tars"), ".tar"))
    names |= set(storage.list_names(fs, storage.join(base, "images"), dirs=True))
    from kbatch.output.commits import shard_of  # objects are named <shard>~<attempt>

    return sorted({shard_of(n) for n in names} - committed)


def _manifest_of(job: dict | None, storage_options) -> tuple[Any, str]:
    """(ManifestSource of the last run's manifest, or None; how the rows are counted)."""
    if not job or not job.get("manifest") or str(job["manifest"]).startswith("<"):
        return None, "records (the last run's manifest was not a file: counts are of the records found)"
    uri = job["manifest"]
    try:
        if (job.get("config") or {}).get("stage") == "decoder":
            from kbatch.plan.manifest import embeddings_source

            return embeddings_source(uri, storage_options), f"manifest {uri}"
        from kbatch.plan.manifest import ManifestSource

        return ManifestSource.open(uri, storage_options), f"manifest {uri}"
    except Exception as e:  # noqa: BLE001 - gone, moved, no credentials: count the records instead
        return None, f"records (manifest {uri} cannot be read: {type(e).__name__}: {e})"


def summarize(root: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Counts of an output location (see module docstring); plain JSON-able values."""
    from kbatch.output.lease import read_lease
    from kbatch.run.watch import schedule_of

    fs, base = storage.get_fs(root, storage_options)
    job = storage.read_json(root, JOB_FILE, storage_options)
    committed = list_committed_shards(root, storage_options)
    # _SUCCESS counts only when it names the run of _job.json, complete (kbatch.output.markers)
    success = complete_by_markers(job, read_marker(root, SUCCESS_FILE, storage_options))
    source, basis = _manifest_of(job, storage_options)
    out: dict[str, Any] = {"root": root, "run_id": (job or {}).get("run_id"), "counted_against": basis}
    if source is not None:
        out.update(_from_manifest(source, root, storage_options))
    else:
        out.update(_from_records(root, storage_options, job))
    uncommitted = _uncommitted(fs, base, set(committed))
    lease = read_lease(root, storage_options)
    running = bool(job and job.get("status") == "running" and lease and lease.get("run_id") == job.get("run_id"))
    out.update({
        "shards": len(committed),
        "uncommitted_shards": len(uncommitted),
        "uncommitted_shard_names": uncommitted[:20],
        "success_marker": bool(success),
        "complete": bool(success and out["rows_missing"] == 0),
        "running": running,
        "progress": (job or {}).get("progress"),
        "schedule": schedule_of(job) if running else None,
        "queued": bool(running and (schedule_of(job) or {}).get("state") == "QUEUED"),
        "lease": lease,
        "job": job,
        # read only where scores can be: the job's meaning names its quality settings (one per output)
        "clip_score": (score_summary(root, storage_options, committed)
                       if job is None or (job.get("meaning") or {}).get("quality") else None),
        "gate": gate_summary(root, storage_options, committed, ((job or {}).get("meaning") or {}).get("quality")),
    })
    return out


def gate_summary(root: str, storage_options: dict | None, shards: list[str], quality: dict | None) -> dict | None:
    """quality.gate: how well the predicted score (of the prior's embedding) predicts the final one (of the
    image as written) over the decoded images that have both: count and Pearson correlation; None without a
    gate. Reads two columns."""
    import numpy as np

    from kbatch.models.heads import gate_label
    from kbatch.output.writer import read_records_table

    gate = (quality or {}).get("gate")
    if not gate:
        return None
    final = "clip_score" if gate.get("head") == "clip_score" else f"score_{gate.get('head')}"
    t = read_records_table(root, ["predicted_score", final], storage_options, shards=shards)
    p = np.asarray(t.column("predicted_score").to_numpy(zero_copy_only=False), np.float64)
    f = np.asarray(t.column(final).to_numpy(zero_copy_only=False), np.float64)
    both = np.isfinite(p) & np.isfinite(f)
    out = {"gate": gate_label(gate.get("head"), gate.get("min")), "final": final, "images": int(both.sum()),
           "correlation": None}
    if both.sum() >= 3 and np.std(p[both]) > 0 and np.std(f[both]) > 0:
        out["correlation"] = round(float(np.corrcoef(p[both], f[both])[0, 1]), 4)
    return out


SCORE_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def score_summary(root: str, storage_options: dict | None = None, shards: list[str] | None = None) -> dict | None:
    """The distribution of ``clip_score`` over the committed images (``quality.clip_score``): count, mean,
    min, max and quantiles (``SCORE_QUANTILES``), for choosing a filter threshold; None when no image has a
    score. Reads one column (8 bytes an image)."""
    import numpy as np

    from kbatch.output.writer import read_records_table

    t = read_records_table(root, ["clip_score"], storage_options, shards=shards)
    v = t.column("clip_score").drop_null().to_numpy() if t.num_rows else np.zeros(0)
    if not len(v):
        return None
    qs = np.quantile(v, SCORE_QUANTILES)
    return {"images": int(len(v)), "mean": round(float(v.mean()), 4), "min": round(float(v.min()), 4),
            "max": round(float(v.max()), 4),
            "quantiles": {f"p{round(q * 100):02d}": round(float(x), 4) for q, x in zip(SCORE_QUANTILES, qs)}}


def _from_manifest(source, root: str, storage_options) -> dict:
    from kbatch.plan.resume_scan import DONE_ERR, DONE_OK, SKIP_FAILED, SKIP_OK, scan

    s = scan(source, root, storage_options)
    ok, failed = s.count(SKIP_OK, DONE_OK), s.count(SKIP_FAILED, DONE_ERR)
    return {"rows_total": s.total, "rows_done": ok + failed, "rows_ok": ok - s.filtered, "rows_failed": failed,
            "rows_filtered": s.filtered,
            "rows_missing": s.total - ok - failed, "images": s.images,
            "failed_by_reason": dict(sorted(s.failed_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
            "failed_examples": s.failed_examples, "duplicate_records": s.duplicate_records,
            "records_not_in_manifest": max(0, s.records_ids - ok - failed)}


def _from_records(root: str, storage_options, job: dict | None) -> dict:
    """Counts from the records alone (every committed record in memory: for outputs whose manifest is
    gone; a run's own manifest is counted by ``_from_manifest``)."""
    df = read_records(root, columns=["id", "image_index", "status", "error"], storage_options=storage_options)
    rows_done = rows_ok = rows_filtered = images = duplicates = 0
    failed_by_reason: dict[str, int] = {}
    failed_examples: list[dict] = []
    if len(df):
        images = int((df["status"] == "ok").sum())
        is_ok = df["status"].isin(["ok", "filtered"])  # filtered (quality.gate): done, counted apart
        any_ok = is_ok.groupby(df["id"]).any()
        rows_done = int(len(any_ok))
        rows_filtered = int((df["status"] == "filtered").groupby(df["id"]).all().sum())
        rows_ok = int(any_ok.sum()) - rows_filtered
        err = df[~is_ok & ~df["id"].isin(set(any_ok.index[any_ok.values]))].drop_duplicates("id", keep="last")
        for rid, e in zip(err["id"].tolist(), err["error"].tolist()):
            e = None if e is None or e != e else str(e)
            r = reason_of(e)
            failed_by_reason[r] = failed_by_reason.get(r, 0) + 1
            if len(failed_examples) < 5:
                failed_examples.append({"id": str(rid), "error": e})
        duplicates = int(df[is_ok].duplicated(["id", "image_index"]).sum())
    total = None
    if job is not None and job.get("total_rows") is not None:
        try:
            total = int(job["total_rows"])
        except (TypeError, ValueError):
            total = None
    return {"rows_total": total, "rows_done": rows_done, "rows_ok": rows_ok,
            "rows_failed": rows_done - rows_ok - rows_filtered, "rows_filtered": rows_filtered,
            "rows_missing": max(total - rows_done, 0) if total is not None else None, "images": images,
            "failed_by_reason": dict(sorted(failed_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
            "failed_examples": failed_examples, "duplicate_records": duplicates, "records_not_in_manifest": None}


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
    lines.append(f"counted:  against {s.get('counted_against')}")
    lines.append(f"rows:     {s.get('rows_done', 0)} done of {total if total is not None else '? (no _job.json total)'}")
    lines.append(f"  ok:      {s.get('rows_ok', 0)}")
    if s.get("rows_filtered"):
        gate = (s.get("gate") or {}).get("gate")
        lines.append(f"  filtered: {s['rows_filtered']} (every image below quality.gate{' ' + gate if gate else ''}; "
                     "not failures: --retry-failed leaves them)")
    lines.append(f"  failed:  {s.get('rows_failed', 0)}")
    for reason, n in (s.get("failed_by_reason") or {}).items():
        lines.append(f"    {n:>8}  {reason}")
    for ex in s.get("failed_examples") or []:
        lines.append(f"    e.g. {ex['id']}: {ex['error']}")
    missing = s.get("rows_missing")
    lines.append(f"  missing: {missing if missing is not None else 'unknown'}")
    if s.get("records_not_in_manifest"):
        lines.append(f"  (and {s['records_not_in_manifest']} ids with records that are not in this manifest: "
                     "left alone, not counted)")
    lines.append(f"images:   {s.get('images', 0)}")
    cs = s.get("clip_score")
    if cs:
        q = cs["quantiles"]
        lines.append(f"clip_score: {cs['images']} scored images, mean {cs['mean']:.2f}, min {cs['min']:.2f}, "
                     f"max {cs['max']:.2f}")
        lines.append("  quantiles: " + "  ".join(f"{k} {v:.2f}" for k, v in q.items()))
    g = s.get("gate")
    if g:
        r = g.get("correlation")
        lines.append(f"gate:     {g['gate']}: predicted vs final {g['final']} over {g['images']} decoded images: "
                     f"correlation {'n/a' if r is None else f'{r:.3f}'}")
    lines.append(f"shards:   {s.get('shards', 0)} committed, {s.get('uncommitted_shards', 0)} uncommitted"
                 + (" (a writer died before committing; a rerun rewrites them)" if s.get("uncommitted_shards") else ""))
    if s.get("duplicate_records"):
        lines.append(f"warning:  {s['duplicate_records']} duplicate (id, image_index) records")
    unseen = job.get("unseen_shards") or []
    if unseen:
        lines.append(f"warning:  the last run committed {len(unseen)} shard(s) this location does not hold "
                     f"(e.g. {unseen[0]}): written on another node's local disk? Use shared or object storage")
    if job.get("error"):
        lines.append(f"stopped:  {job['error']}")
    progress, lease = s.get("progress") or {}, s.get("lease") or {}
    if s.get("running"):
        age = time.time() - float(lease.get("renewed_epoch") or 0)
        eta = progress.get("eta_seconds")
        lines.append(f"running:  {progress.get('rows_done', '?')}/{progress.get('rows_total', '?')} rows, "
                     f"{progress.get('images_per_second', 0):.2f} img/s, ETA {f'{eta:.0f}s' if eta is not None else '?'} "
                     f"(progress at {progress.get('updated', '?')})")
        lines.append(f"          held by run {lease.get('run_id')} on {lease.get('host')} pid {lease.get('pid')}, "
                     f"lease renewed {age:.0f} s ago (ttl {lease.get('ttl')} s)")
        sched = s.get("schedule")
        if sched:
            from kbatch.run.watch import queue_text, schedule_line

            lines.append(f"cluster:  {sched['state']}" + (f", {queue_text(sched)}" if s.get("queued") else "")
                         + f"; {schedule_line(sched)}")
        queues = progress.get("queues") or {}
        if queues:
            lines.append("queues:   " + ", ".join(f"{k} {v}" for k, v in queues.items() if k != "replicas"))
            if queues.get("replicas"):
                lines.append("replicas: " + ", ".join(f"{k} {v.get('running')} running + {v.get('pending')} pending"
                                                     for k, v in queues["replicas"].items()))
    if s.get("complete"):
        state = "COMPLETE"
    elif s.get("queued"):
        state = "QUEUED (waiting for GPUs behind other kbatch jobs on its cluster: `kbatch jobs` shows the queue)"
    elif s.get("running"):
        state = "RUNNING"
    elif not s.get("success_marker") and (missing == 0):
        state = ("INCOMPLETE (all rows have records, but the completion marker _SUCCESS is missing or is not "
                 "the one of the run _job.json names)")
    else:
        state = "INCOMPLETE"
    lines.append(f"status:   {state}")
    return "\n".join(lines)
