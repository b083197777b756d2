"""The Python entry points: ``render`` (a DataFrame or manifest on the connected or a local Ray) and
``submit`` (a job on a remote cluster through Ray's JobSubmissionClient)."""
from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from .config import ConfigError, JobConfig, load_config


def _config(config: str | JobConfig | Mapping | None, sets=None, manifest=None, output=None, **overrides):
    if isinstance(config, JobConfig):
        base = config.to_dict()
        path = None
    elif isinstance(config, Mapping):
        base, path = dict(config), None
    else:
        base, path = {}, config
    from .config import deep_merge

    return load_config(path, sets=sets, manifest=manifest, output=output, overrides=deep_merge(base, overrides))


def render(manifest: Any, output: str | None = None, config: str | JobConfig | Mapping | None = None, *,
           sets: list[str] | None = None, overwrite: bool = False, progress: str | None = None, **overrides):
    """Render ``manifest`` (pandas DataFrame, pyarrow Table, or Parquet URI) and return its results.

    ``config`` is a YAML path, a dict or a JobConfig; keyword arguments override sections of it
    (``render(df, "out", models={"prior": ...}, defaults={"height": 64})``). Uses the connected Ray
    (``ray.init`` / ``RAY_ADDRESS``) or starts a local one. Returns ``Results`` (``.df``, ``.image()``,
    ``.gallery()``) with the run summary in ``.run``.
    """
    import pyarrow as pa

    from .results import open_results
    from .runner import run_job

    table = None
    if isinstance(manifest, (str, os.PathLike)):
        manifest_uri = str(manifest)
    else:
        table = manifest if isinstance(manifest, pa.Table) else pa.Table.from_pandas(manifest, preserve_index=False)
        manifest_uri = "<in-memory>"
    cfg = _config(config, sets, manifest_uri, output, **overrides)
    result = run_job(cfg, overwrite=overwrite, progress=progress, table=table)
    res = open_results(result.output, dict(cfg.storage_options) or None)
    res.run = result
    return res


_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Never uploaded with the project folder (gitignore-style patterns, relative to the working_dir).
WORKING_DIR_EXCLUDES = [".git", "out", ".whl", "*.whl", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                        ".pytest_cache", ".venv", "venv", ".ipynb_checkpoints", "node_modules", "*.safetensors",
                        "*.ckpt", "*.bin"]


@dataclass
class JobHandle:
    """A render job submitted to a Ray cluster (``kbatch.submit``).

    >>> h = kbatch.submit("configs/prod.yaml", address="http://head:8265")
    >>> h.wait()                 # 'SUCCEEDED' | 'FAILED' | 'STOPPED'
    >>> h.exit_code, h.logs()    # kbatch's exit code (0 complete, 1 failed rows, 2 config, 3 incomplete)
    >>> h.results().df           # the output location, through open_results
    """

    client: Any
    job_id: str
    output: str
    address: str | None = None

    def status(self) -> str:
        """``PENDING`` | ``RUNNING`` | ``SUCCEEDED`` | ``FAILED`` | ``STOPPED``."""
        s = self.client.get_job_status(self.job_id)
        return str(getattr(s, "value", s)).split(".")[-1]

    def info(self):
        """Ray's ``JobInfo`` (status, message, start/end time, driver_exit_code, ...)."""
        return self.client.get_job_info(self.job_id)

    @property
    def exit_code(self) -> int | None:
        """The exit code of ``jobs/render.py`` once the job has ended (None before, or if Ray does not know)."""
        return getattr(self.info(), "driver_exit_code", None)

    def logs(self) -> str:
        return self.client.get_job_logs(self.job_id)

    def wait(self, timeout: float = 3600, poll: float = 2.0) -> str:
        """Block until the job ends; returns its final status. TimeoutError if it is still running."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.status()
            if s in _TERMINAL:
                return s
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.job_id} still {s} after {timeout}s")
            time.sleep(poll)

    def stop(self) -> bool:
        """Ask Ray to stop the job (committed shards are kept; rerunning the same job resumes)."""
        return bool(self.client.stop_job(self.job_id))

    def results(self):
        """``open_results`` of the job's output location (readable from here: object storage, or a local
        path on a cluster that shares this machine's file system)."""
        from .results import open_results

        return open_results(self.output)

    def __repr__(self) -> str:
        return f"JobHandle(job_id={self.job_id!r}, output={self.output!r}, address={self.address!r})"


def _has_protocol(uri: str) -> bool:
    return "://" in str(uri)


def _project_root() -> str | None:
    """The source checkout holding this package and ``jobs/render.py``, or None for an installed package."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.isfile(os.path.join(root, "jobs", "render.py")) else None


def _under(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def submit(config: str | JobConfig | Mapping, address: str | None = None, *, working_dir: str | None = None,
           sets: list[str] | None = None, manifest: str | None = None, output: str | None = None,
           runtime_env: Mapping | None = None, env_vars: Mapping[str, str] | None = None,
           submission_id: str | None = None, **overrides) -> JobHandle:
    """Submit a render job with this config to the Ray cluster at ``address`` (or ``RAY_ADDRESS``): the
    dashboard's HTTP address, e.g. ``http://head-node:8265``.

    The config is resolved here, so config errors raise :class:`ConfigError` before anything is submitted,
    and travels inline (``jobs/render.py --config-b64``). The job runs this kbatch: from a source checkout,
    the project folder is uploaded as the job's ``working_dir`` (minus :data:`WORKING_DIR_EXCLUDES` and the
    output folder); from an installed package, the package is shipped as a ``py_modules`` entry. The
    cluster needs the dependencies (torch, diffusers, ...) installed, as for ``ray job submit``.

    Local paths (output, manifest, existing model folders) are made absolute: they must exist on the
    cluster's nodes (a shared file system, or a cluster on this machine); use object storage otherwise.
    Storage credentials are not forwarded: the cluster's environment provides them, or pass them
    explicitly with ``env_vars`` (they then appear in the job's runtime_env, not in the outputs).
    """
    from ray.job_submission import JobSubmissionClient

    from .storage import absolute_if_exists, absolute_local, process_local

    cfg = _config(config, sets, manifest, output, **overrides)
    if process_local(cfg.resolved_output()):
        raise ConfigError(f"config key 'output.path' is {cfg.resolved_output()!r}: memory:// is the memory of the "
                          "job's driver process on the cluster and is gone when the job ends; submit with object "
                          "storage or a shared path, or render to memory:// here with kbatch.render")
    # local paths made absolute: the job's working directory on the cluster is a temporary copy
    out = absolute_local(cfg.resolved_output())
    data = cfg.to_dict()
    data["output"]["path"] = out
    if data.get("manifest"):
        data["manifest"] = absolute_local(data["manifest"])
    for k in ("prior", "decoder", "inpaint"):
        data["models"][k] = absolute_if_exists(data["models"][k])
    blob = base64.b64encode(yaml.safe_dump(data).encode()).decode()

    env = dict(runtime_env or {})
    root = working_dir or _project_root()
    excludes = list(WORKING_DIR_EXCLUDES)
    if root:
        if not _has_protocol(out) and _under(out, root):
            excludes.append("/" + os.path.relpath(os.path.realpath(out), os.path.realpath(root)))
        env.setdefault("working_dir", root)
        env["excludes"] = list(env.get("excludes", [])) + excludes
        entrypoint = f"python jobs/render.py --config-b64 {blob}"
    else:  # an installed kbatch: ship the package itself
        pkg = os.path.dirname(os.path.abspath(__file__))
        env["py_modules"] = list(env.get("py_modules", [])) + [pkg]
        env["excludes"] = list(env.get("excludes", [])) + excludes
        entrypoint = f"python -m kbatch.cli job --config-b64 {blob}"
    if env_vars:
        env["env_vars"] = {**env.get("env_vars", {}), **{str(k): str(v) for k, v in env_vars.items()}}
    address = address or os.environ.get("RAY_ADDRESS")
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id,
                               metadata={"kbatch_output": out[:1000]})
    return JobHandle(client, job_id, out, address)
