"""Issue 4: nothing lost. Worker crashes, a killed job, failing writes, resume checks."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

import kbatch
from kbatch.run.status import summarize

from cli_helpers import env, write_job
from conftest import sim_models, tiny_config

# The driver's fault handling does not depend on what a stage computes: the simulated models (docs/clusters.md, simulated models), with
# a decoder slow enough that batches overlap and a run can be interrupted midway.
SIM = sim_models(decoder_seconds=0.1)


def _rows(n, prefix="r"):
    return [{"id": f"{prefix}{i:03d}", "prompt": f"a picture of thing {i}"} for i in range(n)]


LAYOUTS = {"stages": {"colocate": False}, "colocated": {"colocate": True},
           # one process, two batches at once: a death has two suspects, each rerun alone
           "lanes": {"colocate": True, "decoder": {"concurrency": 2, "cpus": 1, "batch_size": 2}}}


def _once_each(df, ids):
    ok = df[df.status == "ok"]
    assert sorted(ok["id"]) == sorted(ids), "every row exactly once"
    assert not ok.duplicated(["id", "image_index"]).any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decoder_dies_mid_batch_costs_a_retry_not_a_row(ray_session, tmp_path, layout):
    flag = tmp_path / "crashed"
    cfg = tiny_config(SIM, tmp_path / "out", faults={"crash_decoder_once_file": str(flag)},
                      resources=LAYOUTS[layout])
    res = kbatch.render(pd.DataFrame(_rows(10)), str(tmp_path / "out"), cfg)
    assert flag.exists(), "the decoder really died once"
    assert res.run.exit_code == 0 and res.run.complete
    _once_each(res.df, [r["id"] for r in _rows(10)])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_row_that_always_kills_its_worker_fails_alone(ray_session, tmp_path, layout):
    """With colocate the dying process also holds prior batches: those are resubmitted free. With lanes
    the batches running beside the guilty one are rerun alone and are not charged."""
    rows = _rows(6)
    rows[3]["prompt"] = "CRASH"
    cfg = tiny_config(SIM, tmp_path / "out", faults={"crash_on_prompt": "CRASH"},
                      retries={"max_attempts": 2, "max_actor_restarts": 20}, resources=LAYOUTS[layout])
    res = kbatch.render(pd.DataFrame(rows), str(tmp_path / "out"), cfg)
    df = res.df
    assert res.run.complete and res.run.exit_code == 1  # failed rows above the tolerance of 0
    bad = df[df.id == "r003"]
    assert list(bad.status) == ["error"] and "decoder worker died" in bad.error.iloc[0]
    assert "after 2 attempts" in bad.error.iloc[0]
    _once_each(df, [r["id"] for r in rows if r["id"] != "r003"])


def cli(capsys, *args):
    """``kbatch ARGS`` in this process (on the session's Ray): (exit code, stdout, stderr)."""
    from kbatch.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_failed_shard_write_is_invisible_and_rerun_completes(ray_session, tmp_path, capsys):
    cfg = tiny_config(SIM, tmp_path / "out", faults={"fail_write_shard": 0})
    path = write_job(tmp_path, cfg, _rows(6))
    code, _, err = cli(capsys, "run", path)
    assert code == 3, err
    s = summarize(str(tmp_path / "out"))
    assert not s["complete"] and s["rows_missing"] > 0 and s["uncommitted_shards"] >= 1
    assert all(".tmp-" not in f for _, _, fs in os.walk(tmp_path / "out") for f in fs)
    done_before = set(kbatch.open_results(str(tmp_path / "out")).df["id"])
    code, _, err = cli(capsys, "run", path, "--set", "faults.fail_write_shard=null")
    assert code == 0, err
    df = kbatch.open_results(str(tmp_path / "out")).df
    _once_each(df, [r["id"] for r in _rows(6)])
    assert len(done_before) < 6


def _start(path):
    return subprocess.Popen([sys.executable, "-m", "kbatch.cli", "run", path], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _commits(out):
    folder = out / "_commits"
    return len([f for f in os.listdir(folder) if f.endswith(".json")]) if folder.exists() else 0


def _wait_commits(out, at_least, proc):
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if _commits(out) >= at_least:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {at_least} commits (exit {proc.poll()})")


def test_sigterm_then_sigkill_then_rerun(ray_session, tmp_path, capsys):
    """A scheduler's SIGTERM ends the run cleanly (exit 3); a SIGKILL of the whole job (driver and its Ray)
    loses nothing committed; the rerun renders only what is missing, with no duplicates."""
    n = 40
    out = tmp_path / "out"
    cfg = tiny_config(SIM, out, output={"path": str(out), "rows_per_shard": 2, "gallery": False})
    path = write_job(tmp_path, cfg, _rows(n))
    proc = _start(path)
    _wait_commits(out, 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 3, proc.stderr.read()[-3000:]
    job = json.loads((out / "_job.json").read_text())
    assert job["status"] == "interrupted" and not (out / "_SUCCESS").exists()

    proc = _start(path)
    _wait_commits(out, _commits(out) + 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    s = summarize(str(out))
    assert not s["complete"] and 0 < s["rows_done"] < n, s
    assert cli(capsys, "status", out)[0] == 3
    code, _, err = cli(capsys, "run", path)  # (in this process, on the session's Ray)
    assert code == 0, err[-2000:]
    res = kbatch.open_results(str(out))
    _once_each(res.df, [r["id"] for r in _rows(n)])
    assert res.df["run_id"].nunique() == 3  # each run rendered only what was missing
    for rid in res.df["id"][:3]:
        res.image(rid).load()
    assert cli(capsys, "status", out)[0] == 0


def test_resume_refuses_changed_config(ray_session, tmp_path, capsys):
    cfg = tiny_config(SIM, tmp_path / "out")
    path = write_job(tmp_path, cfg, _rows(2))
    assert cli(capsys, "run", path)[0] == 0
    seeds = set(kbatch.open_results(str(tmp_path / "out")).df["seed"])
    code, _, err = cli(capsys, "run", path, "--set", "seed=5")
    assert code == 2 and "seed: 0 -> 5" in err, err
    code, _, err = cli(capsys, "run", path, "--set", "defaults.height=128")
    assert code == 2 and "defaults.height" in err
    changed = _rows(2)
    changed[1]["prompt"] = "something else"
    write_job(tmp_path, cfg, changed)
    code, _, err = cli(capsys, "run", path)
    assert code == 2 and "manifest rows changed" in err and "r001" in err, err
    code, _, err = cli(capsys, "run", path, "--set", "seed=5", "--overwrite")
    assert code == 0, err
    df = kbatch.open_results(str(tmp_path / "out")).df
    assert len(df) == 2 and set(df["seed"]).isdisjoint(seeds)


def test_config_errors_exit_2_before_models_load(tmp_path, capsys):
    cfg = {"models": {"prior": str(tmp_path / "nope"), "decoder": str(tmp_path / "nope")},
           "output": {"path": str(tmp_path / "out")}}
    path = write_job(tmp_path, cfg, _rows(1))
    for key, value, shown in [("models.dtype", "float8", "'float8'"), ("resources.decoder.batch_size", "0", "0"),
                              ("defaults.height", "500", "500"), ("output.format", "zip", "'zip'"),
                              ("defaults.guidance_scale", ".nan", "nan"), ("bogus.key", "1", "bogus")]:
        code, _, err = cli(capsys, "run", path, "--set", f"{key}={value}")
        assert code == 2, (key, err)
        assert key.split(".")[-1] in err and shown in err, err
        assert not (tmp_path / "out").exists()


def test_decoder_that_cannot_start_ends_incomplete(ray_session, tmp_path):
    """Decoders that fail while loading their models (a bad copy on a node, a GPU gone bad: past the driver's
    checks): no row is charged, the run stops (exit 3) after a few tries and says why."""
    cfg = tiny_config(SIM, tmp_path / "out", retries={"max_actor_restarts": 1}, faults={"fail_start": "decoder"})
    t0 = time.monotonic()
    res = kbatch.render(pd.DataFrame(_rows(4)), str(tmp_path / "out"), cfg)
    assert res.run.exit_code == 3 and res.run.rows_missing == 4 and res.run.rows_failed == 0
    assert time.monotonic() - t0 < 240
    job = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert "decoder" in job["worker_start_errors"] and job["status"] == "incomplete"
    assert "cannot load its models" in job["worker_start_errors"]["decoder"], job["worker_start_errors"]
