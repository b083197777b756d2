"""The gallery and its sample read an output in bounded pieces (issue 17 item 5): a few shards' id/status
columns at a time, every column only of the shards the sample comes from, and counts equal to a full read."""
from __future__ import annotations

import os
import random
import re
import weakref

import numpy as np
import pytest

from kbatch.output import writer
from kbatch.output.gallery import write_gallery
from kbatch.output.writer import OutputSpec, read_records, summarize_records, write_shard

PER_SHARD = 12


def _output(root, shards=40, p_err=0.0, seed=0, fmt="files"):
    """``shards`` committed shards of PER_SHARD rows (8x8 images); with ``p_err`` some rows fail, and some
    later rows are earlier failed ids rendered again (their ok or error records supersede the old ones)."""
    rnd = random.Random(seed)
    failed: list[str] = []
    for s in range(shards):
        recs, imgs, seen = [], [], set()
        for i in range(PER_SHARD):
            rid = failed.pop(rnd.randrange(len(failed))) if failed and rnd.random() < 0.3 else f"r{s:03d}-{i:02d}"
            if rid in seen:
                continue
            seen.add(rid)
            run = f"2026-01-01T00-00-{s:02d}"
            if rnd.random() < p_err:
                recs.append({"id": rid, "status": "error", "error": f"reason{rnd.randint(0, 2)}: bad", "run_id": run})
                imgs.append(None)
                failed.append(rid)
            else:
                for k in range(rnd.choice([1, 2])):
                    recs.append({"id": rid, "image_index": k, "status": "ok", "prompt": f"p {rid}", "run_id": run})
                    imgs.append(np.full((8, 8, 3), s, np.uint8))
        write_shard(OutputSpec(str(root), fmt, "png"), f"{run}-{s:05d}", recs, imgs)


def _truth(root) -> dict:
    """Counts from every record in memory at once (what the bounded reader must match)."""
    df = read_records(str(root))
    return {"rows": int(df["id"].nunique()), "images": int((df["status"] == "ok").sum()),
            "errors": int(df.loc[df["status"] != "ok", "id"].nunique()), "shards": 40}


class _Reads:
    """Every metadata read of the writer module: its columns, rows, and how many records are alive at once."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, tuple | None, int]] = []
        self.live = self.max_live = 0
        real = writer._read_meta

        def spy(fs, path, shard, cols, rec=None):
            t = real(fs, path, shard, cols, rec)
            self.calls.append((shard, None if cols is None else tuple(cols), t.num_rows))
            self.live += t.num_rows
            self.max_live = max(self.max_live, self.live)
            weakref.finalize(t, self._gone, t.num_rows)
            return t

        monkeypatch.setattr(writer, "_read_meta", spy)

    def _gone(self, n):
        self.live -= n

    def full(self):
        return [c for c in self.calls if c[1] is None]


def _header(page: str) -> dict:
    got = dict(re.findall(r"(rows|images|failed rows|shards): <b>(\d+)</b>", page))
    return {"rows": int(got["rows"]), "images": int(got["images"]), "errors": int(got["failed rows"]),
            "shards": int(got["shards"])}


@pytest.mark.parametrize("p_err", [0.0, 0.02])
def test_gallery_reads_bounded_pieces_and_counts_match_a_full_read(tmp_path, monkeypatch, p_err):
    root = tmp_path / "out"
    _output(root, 40, p_err)
    truth = _truth(root)
    full_df = read_records(str(root))
    failing_shards = set(full_df.loc[full_df["status"] != "ok", "shard"])
    newest = sorted(set(full_df["shard"]))[-2:]
    reads = _Reads(monkeypatch)
    out = write_gallery(str(root), max_images=5, thumb=8)
    page = open(out["html"], encoding="utf-8").read()
    assert _header(page) == truth
    shown = len(re.findall(r'<div class="card[ "]', page))
    assert shown == 5
    # every column is read only for the shards the shown records come from (5 images of the newest shards,
    # the failed rows listed): never every shard
    full = {s for s, *_ in reads.full()}
    assert full <= set(newest) | failing_shards and len(full) < 40
    assert {c for _, cols, _ in reads.calls if cols is not None for c in cols} <= {"id", "status"}
    # a bounded number of shards' records alive at once (read-ahead 8 + the one being used), not 40 shards'
    assert reads.max_live <= 10 * 2 * PER_SHARD
    assert sum(n for *_, n in reads.calls) >= truth["images"]  # it did go over every shard


def test_gallery_with_the_runs_counts_reads_only_the_newest_shards(tmp_path, monkeypatch):
    root = tmp_path / "out"
    _output(root, 40)
    reads = _Reads(monkeypatch)
    counts = {"rows": 480, "images": 123, "errors": 0}  # a run's accounting: no row failed
    page = open(write_gallery(str(root), max_images=5, thumb=8, counts=counts)["html"], encoding="utf-8").read()
    assert _header(page) == {**counts, "shards": 40}
    assert len(re.findall(r'<div class="card[ "]', page)) == 5
    assert len({s for s, *_ in reads.calls}) <= 9  # the newest shard + read-ahead, of 40
    assert len(reads.full()) == 1


@pytest.mark.parametrize("seed", range(6))
def test_summarize_records_matches_a_full_read(tmp_path, seed):
    root = tmp_path / "out"
    _output(root, 40, p_err=[0.1, 0.5, 0.9][seed % 3], seed=seed, fmt=["files", "parquet"][seed % 2])
    full = read_records(str(root))  # the records that stand
    df, counts = summarize_records(str(root), max_ok=7, max_errors=4)
    assert counts == _truth(root)
    ok = df[df["status"] == "ok"]
    assert len(ok) == min(7, counts["images"]) and len(df) <= 7 + 4
    # the newest shards' ok records, in shard order; complete records (every column, as a full read has them)
    assert list(df.columns) == list(full.columns)
    newest = full[full["status"] == "ok"].tail(7 + 2 * PER_SHARD)
    assert set(ok["key"]) <= set(newest["key"])
    for _, r in ok.iterrows():
        assert r["path"] == full.loc[full["key"] == r["key"], "path"].iloc[0]
    # the failed rows listed stand (no ok record anywhere), each once, with its latest error
    errs = df[df["status"] != "ok"]
    standing = full[full["status"] != "ok"]
    assert len(errs) == min(4, counts["errors"]) and errs["id"].is_unique
    assert set(errs["id"]) <= set(standing["id"])
    latest = standing.drop_duplicates("id", keep="last").set_index("id")["error"]
    assert all(latest[i] == e for i, e in zip(errs["id"], errs["error"]))


def test_a_runs_gallery_shows_its_own_counts(ray_session, tmp_path):
    """``kbatch run``'s gallery: the header is the run's accounting (this manifest's rows, every image, the
    failed rows) and the failed rows are listed; once the failure is fixed and rendered again, none."""
    from cli_helpers import write_job
    from test_scale import sim_config

    from kbatch.cli import main

    out = tmp_path / "out"
    cfg = sim_config(out, output={"gallery": True, "rows_per_shard": 2, "format": "files"},
                     retries={"max_failed_rows": 5})
    ids = [f"g{i}" for i in range(7)]
    rows = [{"id": i, "prompt": f"prompt of {i}"} for i in ids] + [{"id": "fix", "prompt": "x", "height": 100}]
    path = write_job(tmp_path, cfg, rows)
    assert main(["run", path]) == 0
    page = (out / "gallery.html").read_text(encoding="utf-8")
    shards = len(os.listdir(out / "_commits"))
    assert _header(page) == {"rows": 8, "images": 7, "errors": 1, "shards": shards}
    assert "Failed rows (1)" in page and ">fix<" in page and "height" in page
    assert len(re.findall(r'<div class="card[ "]', page)) == 7
    rows[-1]["height"] = 64  # fixed: rendered again, its new records supersede the error
    write_job(tmp_path, cfg, rows)
    assert main(["run", path]) == 0
    page = (out / "gallery.html").read_text(encoding="utf-8")
    assert _header(page) == {"rows": 8, "images": 8, "errors": 0, "shards": len(os.listdir(out / "_commits"))}
    assert "Failed rows" not in page
