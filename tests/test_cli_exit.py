"""Issue "exit codes end to end" / "no secrets in entrypoints", the parts that need no cluster: kbatch's exit
code of an ended job (``JobHandle``: ``_job.json``, the entrypoint's last log line, Ray's driver_exit_code),
unexpected errors exit 3, ``KBATCH_STORAGE_OPTIONS`` reaches the config, ``kbatch status --config``."""
import json
import time
from types import SimpleNamespace

import pytest

import kbatch.cli as cli
from kbatch.api import JobHandle, marker_exit_code
from kbatch.config import ConfigError


class _Client:
    """A job server that knows one ended job."""

    def __init__(self, status="FAILED", driver_exit_code=None, logs="", start_time=None):
        self.info = SimpleNamespace(status=status, driver_exit_code=driver_exit_code,
                                    start_time=start_time or int(time.time() * 1000), message="")
        self.log_text = logs

    def get_job_info(self, job_id):
        return self.info

    def get_job_status(self, job_id):
        return self.info.status

    def get_job_logs(self, job_id):
        return self.log_text


def _write_job(out, **job):
    out.mkdir(parents=True, exist_ok=True)
    (out / "_job.json").write_text(json.dumps(job))


def _iso(seconds_ago=0.0):
    import datetime as dt

    t = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds_ago)
    return t.isoformat(timespec="seconds")


def test_exit_code_sources_in_order(tmp_path):
    out = tmp_path / "out"
    # nothing but Ray's record: 2 (a config error before _job.json existed) is kbatch's
    assert JobHandle(_Client(driver_exit_code=2), "j", str(out)).wait(timeout=1, poll=0) == 2
    # Ray's 1 without the entrypoint's last line: Python died outside kbatch's main (an import error)
    assert JobHandle(_Client(driver_exit_code=1), "j", str(out)).exit_code == 3
    # stopped / killed / runtime env failed: no code at all
    assert JobHandle(_Client(status="STOPPED"), "j", str(out)).exit_code == 3
    # the entrypoint's last line is kbatch's own code
    logs = "kbatch: INCOMPLETE | rows 3\nkbatch-exit-code: 1\n"
    assert JobHandle(_Client(driver_exit_code=1, logs=logs), "j", str(out)).exit_code == 1
    # this run's _job.json wins over both (top-level exit_code, or result.exit_code of older drivers)
    _write_job(out, status="complete", started=_iso(), exit_code=0)
    assert JobHandle(_Client(driver_exit_code=3, logs="kbatch-exit-code: 3"), "j", str(out)).exit_code == 0
    _write_job(out, status="incomplete", started=_iso(), result={"exit_code": 3})
    assert JobHandle(_Client(driver_exit_code=0), "j", str(out)).exit_code == 3
    # a previous run's record on the same output (nightly reruns) is not this job's
    _write_job(out, status="complete", started=_iso(3600), exit_code=0)
    assert JobHandle(_Client(driver_exit_code=2, logs="kbatch-exit-code: 2\n"), "j", str(out)).exit_code == 2
    # a run that died while running left status "running": the other sources decide
    _write_job(out, status="running", started=_iso())
    assert JobHandle(_Client(status="STOPPED"), "j", str(out)).exit_code == 3


def test_wait_streams_logs_and_times_out(tmp_path):
    chunks = []
    c = _Client(status="SUCCEEDED", driver_exit_code=0, logs="line 1\nkbatch-exit-code: 0\n")
    assert JobHandle(c, "j", str(tmp_path)).wait(poll=0, logs=chunks.append) == 0
    assert "".join(chunks) == c.log_text
    running = JobHandle(_Client(status="RUNNING"), "j", str(tmp_path))
    assert running.exit_code is None
    with pytest.raises(TimeoutError, match="still RUNNING"):
        running.wait(timeout=0, poll=0)
    assert marker_exit_code("x\nkbatch-exit-code: 2\ny") == 2 and marker_exit_code("") is None


def test_unexpected_error_exits_3_with_its_cause(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cli, "cmd_status", boom)
    assert cli.main(["status", "/nowhere"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "kbatch: unexpected error: RuntimeError: disk on fire" in err


def test_job_entrypoint_prints_the_exit_code_last(capsys):
    assert cli.job_entrypoint(["--config", "/no/such/config.yaml"]) == 2
    assert capsys.readouterr().out.splitlines()[-1] == "kbatch-exit-code: 2"
    assert cli.job_entrypoint(["--no-such-option"]) == 2  # argparse's usage error
    assert capsys.readouterr().out.splitlines()[-1] == "kbatch-exit-code: 2"


def test_storage_options_from_the_environment(monkeypatch, tmp_path):
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text("storage_options: {endpoint_url: http://minio:9000}\n")
    args = cli.parser().parse_args(["job", "--config", str(cfg_path)])
    monkeypatch.setenv("KBATCH_STORAGE_OPTIONS", json.dumps({"key": "AK", "endpoint_url": "http://other"}))
    # the variable supplies defaults; the config's own keys win
    assert cli.load_job_config(args).storage_options == {"key": "AK", "endpoint_url": "http://minio:9000"}
    monkeypatch.setenv("KBATCH_STORAGE_OPTIONS", '{"key": "s3cr3t-XYZ"')
    with pytest.raises(ConfigError, match="KBATCH_STORAGE_OPTIONS is not valid JSON") as e:
        cli.load_job_config(args)
    assert "s3cr3t" not in str(e.value)  # never echoes credentials
    monkeypatch.setenv("KBATCH_STORAGE_OPTIONS", '["key"]')
    with pytest.raises(ConfigError, match="must hold a JSON object, got a list"):
        cli.load_job_config(args)


def test_status_reads_with_the_config_storage_options(monkeypatch, tmp_path):
    import kbatch.run.status

    seen = []

    def summarize(root, storage_options=None):
        seen.append((root, storage_options))
        return {"complete": True}

    monkeypatch.setattr(kbatch.run.status, "summarize", summarize)
    monkeypatch.setattr(kbatch.run.status, "format_summary", lambda s: "ok")
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text("storage_options: {endpoint_url: http://minio:9000, key: AK}\n")
    assert cli.main(["status", "s3://b/out", "--config", str(cfg_path)]) == 0
    assert seen[-1] == ("s3://b/out", {"endpoint_url": "http://minio:9000", "key": "AK"})
    monkeypatch.delenv("KBATCH_STORAGE_OPTIONS", raising=False)
    assert cli.main(["status", "s3://b/out"]) == 0 and seen[-1] == ("s3://b/out", None)
