"""``kbatch.submit`` and ``kbatch submit --wait`` against a real Ray head with the job server.

The tests start ``ray start --head`` (own temp dir, ports and process group, auth disabled), submit tiny
jobs through Ray's JobSubmissionClient (the project folder as working_dir, ``jobs/render.py --config-b64``)
with ``kbatch submit --wait``, and check kbatch's exit code for jobs that end each way (0 complete, 1 failed
rows, 2 config error on the cluster, 3 incomplete; ``ray job submit`` says 1 for all but the first), that no
credential of ``storage_options`` is in the job's entrypoint, metadata, logs or ``_job.json``, and read the
results back. Teardown stops exactly the processes of that head (its process group), never ``ray stop``,
which would stop every Ray on the machine, other test sessions' included.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pandas as pd
import pytest
import yaml

import kbatch
from kbatch.config import ConfigError

from conftest import sim_models, tiny_config

SIM = sim_models()  # the jobs' exit codes and secrets are the driver's business: simulated models

# Ray's job server module uses pydantic v1-style APIs
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_server_missing() -> str | None:
    try:
        import aiohttp  # noqa: F401
        import ray.dashboard.modules.job.job_head  # noqa: F401
        from ray.job_submission import JobSubmissionClient  # noqa: F401
    except ImportError as e:
        return f"Ray's job server needs ray[default] (pip install 'ray[default]'): {e}"
    if shutil.which("ray") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "ray")):
        return "the 'ray' command is not installed"
    return None


def _ray_cmd() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "ray")
    return here if os.path.exists(here) else shutil.which("ray")


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _stop_group(pgid: int, grace: float = 4.0):
    """SIGTERM the head's process group, then SIGKILL what is left after ``grace`` seconds (the gcs server
    and raylet can take longer than that to exit on SIGTERM; nothing of this throwaway head needs saving)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _alive(pgid):
            time.sleep(0.2)
        if not _alive(pgid):
            return


@pytest.fixture(scope="module")
def ray_head():
    reason = _job_server_missing()
    if reason:
        pytest.skip(reason)
    tmp = tempfile.mkdtemp(prefix="kbs-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dash = _free_port()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=tmp)
    # Every port explicit (ephemeral, free now): the defaults (client server 10001, agent 52365) would
    # collide with another head on the same machine.
    cmd = [_ray_cmd(), "start", "--head", "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", tmp,
           "--port", str(_free_port()), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--ray-client-server-port", str(_free_port()),
           "--dashboard-agent-listen-port", str(_free_port()), "--disable-usage-stats"]
    # Its own session: the head's daemons (and the job's processes) share this process group.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    pgid = proc.pid
    address = f"http://127.0.0.1:{dash}"
    try:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"ray start failed ({proc.returncode}):\n{out[-4000:]}")
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the job server at {address} did not come up:\n{out[-4000:]}")
            time.sleep(0.5)
        yield address
    finally:
        _stop_group(pgid)
        shutil.rmtree(tmp, ignore_errors=True)


def test_submit_config_error_raises_before_submitting():
    with pytest.raises(ConfigError, match="output.format"):
        kbatch.submit({"output": {"path": "/tmp/x", "format": "zip"}}, address="http://127.0.0.1:9")
    # memory:// would be the memory of the job's driver on the cluster: gone when the job ends
    with pytest.raises(ConfigError, match="'output.path' is 'memory://x/y'"):
        kbatch.submit({"output": {"path": "memory://x/y"}}, address="http://127.0.0.1:9")


class _FakeClient:
    """Stands in for JobSubmissionClient: records what submit() sends."""

    submitted: list = []

    def __init__(self, address=None):
        self.address = address

    def submit_job(self, **kw):
        _FakeClient.submitted.append({"address": self.address, **kw})
        return "raysubmit_fake"


def _decoded_config(entrypoint):
    import base64

    import yaml

    blob = entrypoint.split("--config-b64 ", 1)[1].split()[0]
    return yaml.safe_load(base64.b64decode(blob))


def test_submit_builds_the_job(tiny_models, tmp_path, monkeypatch):
    """What travels to the cluster: the resolved config inline without storage_options (those go in the
    runtime_env), local paths absolute, the project folder as working_dir without outputs and junk; an
    installed package ships as py_modules instead."""
    import json

    import ray.job_submission

    import kbatch.api as api

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _FakeClient)
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    monkeypatch.chdir(tmp_path)
    _FakeClient.submitted.clear()
    cfg = tiny_config(tiny_models, "out/x", storage_options={"key": SECRETS[0], "secret": SECRETS[1]})
    h = kbatch.submit(cfg, manifest="in/*.parquet", sets=["defaults.height=128"], env_vars={"HF_HOME": "/cache"})
    sent = _FakeClient.submitted[-1]
    assert sent["address"] == "http://10.0.0.1:8265" and h.job_id == "raysubmit_fake"
    assert sent["entrypoint"].startswith("python jobs/render.py --config-b64 ")
    data = _decoded_config(sent["entrypoint"])
    assert data["output"]["path"] == str(tmp_path / "out" / "x") == h.output
    assert data["manifest"] == str(tmp_path / "in" / "*.parquet")
    assert data["defaults"]["height"] == 128 and data["models"]["prior"] == tiny_models["prior"]
    assert "storage_options" not in data and not any(x in json.dumps(sent["metadata"]) for x in SECRETS)
    env = sent["runtime_env"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(api.__file__)))
    assert env["working_dir"] == root and os.path.isfile(os.path.join(root, "jobs", "render.py"))
    assert {".git", "out", "*.egg-info", "__pycache__"} <= set(env["excludes"])
    assert env["env_vars"]["HF_HOME"] == "/cache"
    assert json.loads(env["env_vars"]["KBATCH_STORAGE_OPTIONS"]) == {"key": SECRETS[0], "secret": SECRETS[1]}
    assert h.storage_options == {"key": SECRETS[0], "secret": SECRETS[1]} and SECRETS[0] not in repr(h)
    # no storage_options: no variable
    kbatch.submit(tiny_config(tiny_models, "out/x"), address="http://h:8265")
    assert "env_vars" not in _FakeClient.submitted[-1]["runtime_env"]
    # an output folder inside the project is not uploaded with it
    kbatch.submit(cfg, address="http://h:8265", output=os.path.join(root, "renders", "nightly"))
    assert "/renders/nightly" in _FakeClient.submitted[-1]["runtime_env"]["excludes"]
    # object-store URIs and hub ids are left alone
    kbatch.submit(cfg, address="http://h:8265", output="s3://b/renders", manifest="s3://b/m.parquet",
                  models={"decoder": "kandinsky-community/kandinsky-2-1"})
    data = _decoded_config(_FakeClient.submitted[-1]["entrypoint"])
    assert data["output"]["path"] == "s3://b/renders" and data["manifest"] == "s3://b/m.parquet"
    assert data["models"]["decoder"] == "kandinsky-community/kandinsky-2-1"
    # an installed (non-checkout) kbatch ships the package and runs the module
    monkeypatch.setattr(api, "_project_root", lambda: None)
    kbatch.submit(cfg, address="http://h:8265")
    sent = _FakeClient.submitted[-1]
    assert sent["entrypoint"].startswith("python -m kbatch.cli job --config-b64 ")
    assert sent["runtime_env"]["py_modules"] == [os.path.dirname(os.path.abspath(api.__file__))]
    assert "working_dir" not in sent["runtime_env"]


SECRETS = ("AKIA-SECRET-XYZ", "s3cr3t-XYZ")


def _env():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    env.pop("KBATCH_STORAGE_OPTIONS", None)
    return env


def _submit_wait(address, cwd, config, *args):
    """``kbatch submit CONFIG --address ADDRESS --wait ...`` started in ``cwd``; returns the Popen."""
    cmd = [sys.executable, "-m", "kbatch.cli", "submit", str(config), "--address", address, "--wait",
           "--timeout", "300", *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=360):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    job_id = next((line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("job: ")), None)
    return proc.returncode, job_id, out, err


def _job_config(folder, cfg, rows):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(folder / "prompts.parquet")
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({**cfg, "manifest": "prompts.parquet"}))
    return path


def test_submit_wait_exit_codes_and_no_secrets(ray_head, tmp_path):
    """``kbatch submit --wait`` exits 0, 1, 2 and 3 for jobs that end those ways (``ray job submit`` would
    say 0, 1, 1, 1), and the complete job's credentials are nowhere the job server shows, nor in the logs
    or ``_job.json``: they reach the job through its runtime_env, and it reads the output with them."""
    from ray.job_submission import JobSubmissionClient

    from kbatch.api import JobHandle

    rows = [{"id": f"sub-{i}", "prompt": p} for i, p in enumerate(["a red fox", "a lighthouse", "ramen"])]
    # 0: complete; relative paths (cwd is the job's folder) are made absolute by submit
    ok = _job_config(tmp_path / "ok", tiny_config(SIM, "out", storage_options={"key": SECRETS[0],
                                                                                      "secret": SECRETS[1]}), rows)
    # 2: the manifest is missing, which only the job's driver finds (submit checks the config, not the data)
    missing = _job_config(tmp_path / "missing", tiny_config(SIM, "out"), rows[:1])
    (tmp_path / "missing" / "prompts.parquet").unlink()
    # 1: a row with an invalid height becomes an error record; tolerance 0
    bad = _job_config(tmp_path / "bad", tiny_config(SIM, "out"), rows[:1] + [
        {"id": "tall", "prompt": "a tower", "height": 100}])
    # 3: the first shard's write fails: the run ends incomplete
    broken = _job_config(tmp_path / "broken", tiny_config(SIM, "out"), rows[:1])

    t0 = time.monotonic()
    # the config-error job starts no actors: it runs beside the first one
    procs = [_submit_wait(ray_head, tmp_path / "ok", ok), _submit_wait(ray_head, tmp_path / "missing", missing)]
    results = {"ok": _finish(procs[0]), "missing": _finish(procs[1])}
    results["bad"] = _finish(_submit_wait(ray_head, tmp_path / "bad", bad))
    results["broken"] = _finish(_submit_wait(ray_head, tmp_path / "broken", broken, "--set",
                                             "faults.fail_write_shard=0"))
    took = time.monotonic() - t0
    codes = {k: r[0] for k, r in results.items()}
    detail = "\n".join(f"--- {k}: exit {r[0]} job {r[1]}\n{r[2][-2500:]}\n{r[3][-2500:]}" for k, r in results.items())
    assert codes == {"ok": 0, "missing": 2, "bad": 1, "broken": 3}, detail
    print(f"4 jobs in {took:.0f}s")

    client = JobSubmissionClient(ray_head)
    # what Ray itself recorded: the entrypoint's exit status (Ray 2.60 fills driver_exit_code)
    infos = {k: client.get_job_info(r[1]) for k, r in results.items()}
    assert {k: i.driver_exit_code for k, i in infos.items()} == codes
    assert {k: str(getattr(i.status, "value", i.status)) for k, i in infos.items()} == {
        "ok": "SUCCEEDED", "missing": "FAILED", "bad": "FAILED", "broken": "FAILED"}

    # the complete job, through the Python handle
    code, job_id, out, err = results["ok"]
    handle = JobHandle(client, job_id, str(tmp_path / "ok" / "out"))
    assert handle.wait(timeout=10, poll=0.5) == 0 and handle.exit_code == 0 and handle.status() == "SUCCEEDED"
    assert "kbatch: complete" in out and out.rstrip().endswith("kbatch-exit-code: 0"), out[-2000:]
    assert f"output: {tmp_path / 'ok' / 'out'}" in out
    res = handle.results()
    assert sorted(res.df["id"]) == [r["id"] for r in rows] and (res.df["status"] == "ok").all()
    assert res.image("sub-1").size == (64, 64)
    assert res.job["status"] == "complete" and res.job["manifest"] == str(tmp_path / "ok" / "prompts.parquet")
    # the options reached the job's config (masked in _job.json) ...
    assert res.job["config"]["storage_options"] == {"key": "***", "secret": "***"}
    # ... through the runtime_env, never the entrypoint, the metadata, the logs or the outputs
    info = infos["ok"]
    assert "KBATCH_STORAGE_OPTIONS" in info.runtime_env["env_vars"]
    listed = [j for j in client.list_jobs() if j.submission_id == job_id]
    assert len(listed) == 1
    shown = [info.entrypoint, str(info.metadata), listed[0].entrypoint, str(listed[0].metadata),
             handle.logs(), out, err, (tmp_path / "ok" / "out" / "_job.json").read_text()]
    for secret in SECRETS:
        assert not any(secret in text for text in shown), secret
    # kbatch status reads the output with the config's storage_options
    from kbatch.cli import main

    assert main(["status", str(tmp_path / "ok" / "out"), "--config", str(ok)]) == 0

    # the others: what they say, and what they left
    assert "prompts.parquet" in results["missing"][2] and "exit code 2" in results["missing"][3]
    bad_df = kbatch.open_results(str(tmp_path / "bad" / "out")).df
    assert bad_df.set_index("id")["status"].to_dict() == {"sub-0": "ok", "tall": "error"}
    assert "height" in bad_df.set_index("id").loc["tall", "error"]
    assert "exit code 3" in results["broken"][3], results["broken"][3][-2000:]
