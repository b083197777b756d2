"""Issue "Outputs and the people who use them": ``kbatch.submit`` against a real Ray head with the job server.

The test starts ``ray start --head`` (own temp dir, ports and process group, auth disabled), submits a tiny
job through Ray's JobSubmissionClient (the project folder as working_dir, ``jobs/render.py --config-b64``),
waits for it, and reads the results back. Teardown stops exactly the processes of that head (its process
group), never ``ray stop``, which would stop every Ray on the machine, other test sessions' included.
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

import pytest

import kbatch
from kbatch.config import ConfigError

from conftest import tiny_config

ROWS = 3
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
    """What travels to the cluster: the resolved config inline, local paths absolute, the project folder as
    working_dir without outputs and junk; an installed package ships as py_modules instead."""
    import ray.job_submission

    import kbatch.api as api

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _FakeClient)
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    monkeypatch.chdir(tmp_path)
    _FakeClient.submitted.clear()
    cfg = tiny_config(tiny_models, "out/x")
    h = kbatch.submit(cfg, manifest="in/*.parquet", sets=["defaults.height=128"], env_vars={"HF_HOME": "/cache"})
    sent = _FakeClient.submitted[-1]
    assert sent["address"] == "http://10.0.0.1:8265" and h.job_id == "raysubmit_fake"
    assert sent["entrypoint"].startswith("python jobs/render.py --config-b64 ")
    data = _decoded_config(sent["entrypoint"])
    assert data["output"]["path"] == str(tmp_path / "out" / "x") == h.output
    assert data["manifest"] == str(tmp_path / "in" / "*.parquet")
    assert data["defaults"]["height"] == 128 and data["models"]["prior"] == tiny_models["prior"]
    env = sent["runtime_env"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(api.__file__)))
    assert env["working_dir"] == root and os.path.isfile(os.path.join(root, "jobs", "render.py"))
    assert {".git", "out", "*.egg-info", "__pycache__"} <= set(env["excludes"])
    assert env["env_vars"] == {"HF_HOME": "/cache"}
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


def test_submit_runs_on_the_cluster(ray_head, tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    manifest = tmp_path / "prompts.parquet"
    import pandas as pd

    pd.DataFrame({"id": [f"sub-{i}" for i in range(ROWS)],
                  "prompt": ["a red fox", "a lighthouse", "a bowl of ramen"]}).to_parquet(manifest)
    cfg = tiny_config(tiny_models, "out/submitted")  # relative: submit makes local paths absolute
    handle = kbatch.submit(cfg, address=ray_head, manifest="prompts.parquet")
    assert handle.output == str(tmp_path / "out" / "submitted")
    try:
        status = handle.wait(timeout=240, poll=1.0)
    except TimeoutError:
        handle.stop()
        raise
    logs = handle.logs()
    assert status == "SUCCEEDED", f"{status}: {handle.info().message}\n{logs[-5000:]}"
    assert handle.exit_code == 0
    assert "kbatch: complete" in logs, logs[-3000:]
    res = handle.results()
    assert sorted(res.df["id"]) == [f"sub-{i}" for i in range(ROWS)]
    assert (res.df["status"] == "ok").all()
    assert res.image("sub-1").size == (64, 64)
    assert res.job["status"] == "complete" and res.job["manifest"] == str(manifest)
    assert repr(handle).startswith("JobHandle(")


def test_submit_failed_job_reports_exit_code(ray_head, tiny_models, tmp_path):
    """A job whose manifest is missing fails on the cluster with kbatch's config exit code 2."""
    cfg = tiny_config(tiny_models, tmp_path / "out")
    handle = kbatch.submit(cfg, address=ray_head, manifest=str(tmp_path / "missing.parquet"))
    assert handle.wait(timeout=120, poll=1.0) == "FAILED"
    assert handle.exit_code == 2
    assert "missing.parquet" in handle.logs()
