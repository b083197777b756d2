"""Issue "Real clusters": honest accounting, rendering failed rows again, one run per output, and faults of
the stages around the models (writers, placement). Simulated models (docs/clusters.md, simulated models) keep these fast."""
import json
import os
import subprocess
import sys
import time


import kbatch
from kbatch.run.status import format_summary, summarize

from cli_helpers import env, kbatch as run_cli, write_job
from test_scale import frame, sim_config


def cli(capsys, *args):
    from kbatch.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def rows(*ids, **cols):
    return [{"id": i, "prompt": f"prompt of {i}", **cols} for i in ids]


def test_counts_are_of_this_manifests_ids(ray_session, tmp_path, capsys):
    """Render a1-a4, z1-z4; then the same job with a1-a4, b1-b2: b1 and b2 are rendered, z1-z4 are left
    alone and count for nothing; the run is complete (exit 0) and status says 6 of 6."""
    out = tmp_path / "out"
    cfg = sim_config(out)
    path = write_job(tmp_path, cfg, rows("a1", "a2", "a3", "a4", "z1", "z2", "z3", "z4"))
    assert cli(capsys, "run", path)[0] == 0
    write_job(tmp_path, cfg, rows("a1", "a2", "a3", "a4", "b1", "b2"))
    code, stdout, err = cli(capsys, "run", path)
    assert code == 0, err
    assert "rows 6 (ok 2, failed 0, missing 0, skipped 4)" in stdout, stdout
    s = summarize(str(out))
    assert (s["rows_total"], s["rows_done"], s["rows_missing"], s["complete"]) == (6, 6, 0, True)
    assert s["records_not_in_manifest"] == 4
    text = format_summary(s)
    assert "6 done of 6" in text and "COMPLETE" in text and "not in this manifest" in text
    # the other way round: fewer records than ids is never "complete"
    write_job(tmp_path, cfg, rows("a1", "c1"))
    os.remove(out / "_SUCCESS")
    s = summarize(str(out))
    assert (s["rows_total"], s["rows_missing"], s["complete"]) == (2, 1, False)


def test_a_fixed_row_renders_again_and_supersedes_its_error(ray_session, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = sim_config(out)
    bad = rows("ok1", "ok2") + [{"id": "fix", "prompt": "x", "height": 100}]
    path = write_job(tmp_path, cfg, bad)
    code, _, err = cli(capsys, "run", path)
    assert code == 1, err  # a failed row above the tolerance of 0
    assert list(kbatch.open_results(str(out)).df.query("id == 'fix'").status) == ["error"]
    code, stdout, _ = cli(capsys, "run", path)  # unchanged: the failed row is not tried again
    assert code == 1 and "1 failed before" in stdout
    write_job(tmp_path, cfg, rows("ok1", "ok2") + [{"id": "fix", "prompt": "x", "height": 64}])
    code, stdout, err = cli(capsys, "run", path)
    assert code == 0, err
    assert "ok 1" in stdout and "skipped 2" in stdout
    res = kbatch.open_results(str(out))
    assert list(res.df.query("id == 'fix'").status) == ["ok"]  # the error record no longer stands
    assert len(kbatch.output.writer.read_records(str(out), superseded=True).query("id == 'fix'")) == 2
    s = summarize(str(out))
    assert (s["rows_ok"], s["rows_failed"], s["complete"]) == (3, 0, True)


def test_retry_failed_renders_rows_whose_only_records_are_errors(ray_session, tmp_path, capsys):
    """A row that failed for a reason outside the manifest (here: it crashed its worker every time) is
    skipped by a plain rerun and rendered again with --retry-failed."""
    out = tmp_path / "out"
    cfg = sim_config(out, faults={"crash_on_prompt": "CRASH"}, retries={"max_attempts": 1, "max_actor_restarts": 20})
    path = write_job(tmp_path, cfg, rows("a", "b") + [{"id": "c", "prompt": "CRASH"}])
    code, _, err = cli(capsys, "run", path)
    assert code == 1, err
    err_rec = kbatch.open_results(str(out)).df.query("id == 'c'")
    assert list(err_rec.status) == ["error"] and "decoder worker died" in err_rec.error.iloc[0]
    code, stdout, _ = cli(capsys, "run", path, "--set", "faults.crash_on_prompt=null")
    assert code == 1 and "failed 0" in stdout  # nothing tried again: still one failed row
    code, stdout, err = cli(capsys, "run", path, "--set", "faults.crash_on_prompt=null", "--retry-failed")
    assert code == 0, err
    assert "ok 1" in stdout
    df = kbatch.open_results(str(out)).df
    assert sorted(df.id) == ["a", "b", "c"] and set(df.status) == {"ok"}
    assert summarize(str(out))["complete"]


def test_a_dead_writer_loses_no_shard(ray_session, tmp_path):
    flag = tmp_path / "writer-crashed"
    cfg = sim_config(tmp_path / "o", faults={"crash_writer_once_file": str(flag)}, output={"rows_per_shard": 20})
    res = kbatch.render(frame(200), str(tmp_path / "o"), cfg)
    assert flag.exists(), "the writer really died"
    assert res.run.complete and res.run.exit_code == 0
    df = res.df
    assert len(df) == 200 and df.id.is_unique


def test_a_stage_that_cannot_be_placed_ends_the_run_naming_ask_and_cluster(ray_session, tmp_path):
    """A decoder asking 4 CPUs of a 2-CPU cluster: exit 3 after resources.placement_timeout, not a hang."""
    cfg = sim_config(tmp_path / "o", resources={"decoder": {"cpus": 4}, "placement_timeout": 3})
    t0 = time.monotonic()
    res = kbatch.render(frame(20), str(tmp_path / "o"), cfg)
    assert time.monotonic() - t0 < 60
    assert res.run.exit_code == 3 and not res.run.complete and res.run.rows_missing == 20
    job = json.loads((tmp_path / "o" / "_job.json").read_text())
    assert "no decoder replica could be placed in 3 s" in job["error"]
    assert "'CPU': 4.0" in job["error"] and "CPU 2" in job["error"], job["error"]


def _start(path, *extra):
    return subprocess.Popen([sys.executable, "-m", "kbatch.cli", "run", str(path), *extra], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_second_run_on_a_held_output_exits_2_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    cfg = sim_config(out, models={"sim": {"decoder_seconds_per_image": 0.02}}, output={"rows_per_shard": 20})
    path = write_job(tmp_path, cfg, rows(*[f"r{i}" for i in range(300)]))
    first = _start(path)
    deadline = time.monotonic() + 120
    while not (out / "_lease.json").exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
    assert (out / "_lease.json").exists(), first.communicate()[1][-2000:]
    holder = json.loads((out / "_lease.json").read_text())
    second = run_cli("run", path, timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    assert holder["run_id"] in second.stderr and "in use" in second.stderr
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    df = kbatch.open_results(str(out)).df
    assert len(df) == 300 and df.id.is_unique
    assert json.loads((out / "_lease.json").read_text())["state"] == "released"  # released at the end, kept
