"""Issue "Ten million rows": the streaming driver on the simulated models (docs/clusters.md, simulated models).

Fast checks of the properties that make a large job possible: the driver's memory does not grow with the
manifest, every queue between stages stays within its bound (the prior stops when the decoders' backlog is
full), embeddings and images never reach the driver, the manifest is read piece by piece, and progress is
written while the job runs.
"""
import json
import threading
import time
import tracemalloc

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import kbatch
from kbatch.config import from_dict
from kbatch.plan.resume_scan import scan
from kbatch.plan.manifest import ManifestSource
from kbatch.plan.planner import Planner


def sim_config(out, **over):
    from kbatch.config import deep_merge

    base = {"models": {"prior": "sim", "decoder": "sim"},
            "output": {"path": str(out), "rows_per_shard": 200, "gallery": False, "format": "parquet"},
            "defaults": {"height": 64, "width": 64}, "progress": "off",
            "resources": {"prior": {"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": 32},
                          "decoder": {"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": 32},
                          "colocate": False, "plan_window": 256}}
    return deep_merge(base, over)


def frame(n, prefix="r"):
    return pd.DataFrame({"id": [f"{prefix}{i:06d}" for i in range(n)], "prompt": [f"thing {i}" for i in range(n)]})


def _job(out):
    with open(f"{out}/_job.json") as fh:
        return json.load(fh)


def test_driver_memory_does_not_grow_with_rows(ray_session, tmp_path):
    """Python memory the driver allocates during a run (tracemalloc peak, after a warm-up run) for a manifest
    5x larger stays within 15% (+ 1 MiB) of the smaller one's: no per-row state is kept."""
    peaks = {}
    kbatch.render(frame(300), str(tmp_path / "warm"), sim_config(tmp_path / "warm"))  # imports, Ray, actors
    for n in (2000, 10000):
        df = frame(n)
        table = pa.Table.from_pandas(df, preserve_index=False)
        del df
        tracemalloc.start()
        res = kbatch.render(table, str(tmp_path / f"o{n}"), sim_config(tmp_path / f"o{n}"))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert res.run.complete and res.run.rows_ok == n
        del res
    assert peaks[10000] <= peaks[2000] * 1.15 + 2**20, peaks


def test_bounded_queues_and_the_prior_waits_for_slow_decoders(ray_session, tmp_path):
    """A fast prior and a slow decoder: the embeddings waiting for the decoders never exceed
    resources.prior_ahead decoder batches (plus the one batch always allowed), rows read ahead never exceed
    two plan windows, and the run still completes."""
    cfg = sim_config(tmp_path / "o", models={"sim": {"decoder_seconds_per_image": 0.004}},
                     resources={"decoder": {"batch_size": 8}, "prior": {"batch_size": 8}, "prior_ahead": 2,
                                "plan_window": 64},
                     output={"rows_per_shard": 32})
    res = kbatch.render(frame(600), str(tmp_path / "o"), cfg)
    assert res.run.complete and res.run.rows_ok == 600
    high = _job(tmp_path / "o")["driver"]["high_water"]
    assert 0 < high["ahead_images"] <= 2 * 1 * 8 + 8, high  # prior_ahead x decoders x batch + one batch
    assert high["before_prior"] <= 2 * 64 + 64, high  # two windows, plus the one being read
    assert high["pending_writes"] <= 2 and high["shards_waiting"] <= 1, high
    # finished rows wait for a writer in one shard buffer: a shard, plus what decoders had in flight
    assert high["shard_buffer"] <= 32 + 2 * 8, high


def test_embeddings_and_images_never_reach_the_driver(ray_session, tmp_path, monkeypatch):
    """Everything the driver fetches is a small status, a writer's stats or a replica's ready() answer."""
    import ray

    from kbatch.schema.payloads import DecoderOutput, PriorOutput
    from kbatch.models.actors import Status
    from kbatch.output.writer import ShardStats

    got = []
    real_get = ray.get

    def spy(refs, *a, **kw):
        value = real_get(refs, *a, **kw)
        got.append(value)
        return value

    monkeypatch.setattr(ray, "get", spy)
    res = kbatch.render(frame(200), str(tmp_path / "o"), sim_config(tmp_path / "o"))
    monkeypatch.undo()
    assert res.run.complete and res.run.rows_ok == 200
    kinds = {type(v).__name__ for v in got}
    assert got and kinds <= {"Status", "ShardStats", "dict", "tuple"}, kinds
    flat = [x for v in got for x in (v if isinstance(v, (list, tuple)) else [v])]
    assert not any(isinstance(x, (PriorOutput, DecoderOutput, np.ndarray)) for x in flat)
    assert any(isinstance(v, Status) for v in got) and any(isinstance(v, ShardStats) for v in got)
    # the records name the simulated models and the embeddings were checked by the decoder
    assert set(res.df["model_decoder"]) == {"sim"} and set(res.df["dtype"]) == {"sim"}


def test_manifest_of_many_files_and_row_groups_is_read_piece_by_piece(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    n = 0
    for f in range(5):
        t = pa.Table.from_pandas(frame(700, prefix=f"f{f}-"), preserve_index=False)
        pq.write_table(t, folder / f"part-{f}.parquet", row_group_size=100)
        n += 700
    src = ManifestSource.open(str(folder))
    assert src.total == n and len(src.files) == 5
    starts, sizes = [], []
    for start, batch in src.batches(["id"], batch_size=64):
        starts.append(start)
        sizes.append(batch.num_rows)
    assert max(sizes) <= 64 and sum(sizes) == n and starts == list(np.cumsum([0] + sizes[:-1]))
    assert src.locate(700) == (str(folder / "part-1.parquet"), 0)
    cfg = from_dict(sim_config(tmp_path / "o", resources={"plan_window": 128}))
    planner = Planner(cfg, src, None, "run")
    planner.scan = scan(src)
    w = planner.next_window()
    assert sum(len(b) for b in w.batches) == 128 and planner.read_rows < 128 + 4096  # one read batch, not 3500
    ids = [r.id for b in w.batches for r in b]
    assert len(set(ids)) == 128 and all(i.startswith("f0-") for i in ids)


def test_duplicates_and_resume_are_decided_in_bounded_pieces(tmp_path):
    """The scan finds duplicate ids across files (first occurrence wins) with its spill buckets."""
    folder = tmp_path / "m"
    folder.mkdir()
    pq.write_table(pa.Table.from_pandas(frame(50), preserve_index=False), folder / "a.parquet")
    pq.write_table(pa.Table.from_pandas(frame(30), preserve_index=False), folder / "b.parquet")  # 30 repeats
    s = scan(ManifestSource.open(str(folder)))
    from kbatch.plan.resume_scan import DUP, NEW

    assert s.count(NEW) == 50 and s.count(DUP) == 30
    assert s.first_at[50] == 0 and s.first_at[79] == 29


def test_progress_is_written_while_running_and_status_shows_it(ray_session, tmp_path, monkeypatch):
    import kbatch.run.driver as driver
    import kbatch.run.runner as runner
    from kbatch.run.status import format_summary, summarize

    monkeypatch.setattr(runner, "PROGRESS_EVERY", 0.3)
    monkeypatch.setattr(driver, "TICK", 0.1)
    out = tmp_path / "o"
    cfg = sim_config(out, models={"sim": {"decoder_seconds_per_image": 0.02}}, output={"rows_per_shard": 16},
                     resources={"decoder": {"concurrency": 1}})
    seen = []

    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out / "_SUCCESS").exists():
            try:
                job = _job(out)
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            if job.get("status") == "running" and job.get("progress"):
                seen.append((job["progress"], format_summary(summarize(str(out)))))
            time.sleep(0.2)

    t = threading.Thread(target=watch)
    t.start()
    res = kbatch.render(frame(400), str(out), cfg)
    t.join()
    assert res.run.complete
    assert seen, "no progress seen while the job ran"
    moving = [(p, text) for p, text in seen if 0 < p["rows_done"] < 400]
    assert moving, [p["rows_done"] for p, _ in seen]
    progress, _ = moving[-1]
    assert progress["rows_total"] == 400
    assert "queues" in progress and "decoder" in progress["queues"]
    # (status is read just after _job.json: the run may have finished in between, so look at them all)
    assert any("RUNNING" in text and "img/s" in text for _, text in moving), [text for _, text in moving]
    final = _job(out)
    assert final["status"] == "complete" and final["progress"]["rows_done"] == 400
