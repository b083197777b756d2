"""The Python entry points: ``render`` (a DataFrame or manifest on the connected or a local Ray) and
``submit`` (a job on a remote cluster through Ray's JobSubmissionClient)."""
from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from .config import JobConfig, load_config


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
    from .runner import Runner, ensure_ray

    table = None
    if isinstance(manifest, (str, os.PathLike)):
        manifest_uri = str(manifest)
    else:
        table = manifest if isinstance(manifest, pa.Table) else pa.Table.from_pandas(manifest, preserve_index=False)
        manifest_uri = "<in-memory>"
    cfg = _config(config, sets, manifest_uri, output, **overrides)
    runner = Runner(cfg, overwrite=overwrite, progress=progress, table=table).plan()
    started = ensure_ray()
    try:
        result = runner.run()
    finally:
        if started:
            import ray

            ray.shutdown()
    res = open_results(result.output)
    res.run = result
    return res


@dataclass
class JobHandle:
    """A job submitted to a Ray cluster."""

    client: Any
    job_id: str
    output: str

    def status(self) -> str:
        return str(self.client.get_job_status(self.job_id))

    def logs(self) -> str:
        return self.client.get_job_logs(self.job_id)

    def wait(self, timeout: float = 3600, poll: float = 2.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            if s.split(".")[-1] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return s
            time.sleep(poll)
        raise TimeoutError(f"job {self.job_id} still {self.status()} after {timeout}s")

    def results(self):
        from .results import open_results

        return open_results(self.output)


def submit(config: str | JobConfig | Mapping, address: str | None = None, *, working_dir: str | None = None,
           sets: list[str] | None = None, manifest: str | None = None, output: str | None = None,
           **overrides) -> JobHandle:
    """Submit ``jobs/render.py`` with this config to the cluster at ``address`` (or RAY_ADDRESS).

    The config is resolved here (errors surface before anything is submitted) and travels inline; the
    project folder is the job's ``working_dir``.
    """
    from ray.job_submission import JobSubmissionClient

    cfg = _config(config, sets, manifest, output, **overrides)
    out = cfg.resolved_output()
    data = cfg.to_dict()
    data["output"]["path"] = out
    blob = base64.b64encode(yaml.safe_dump(data).encode()).decode()
    root = working_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    client = JobSubmissionClient(address or os.environ.get("RAY_ADDRESS"))
    job_id = client.submit_job(entrypoint=f"python jobs/render.py --config-b64 {blob}",
                               runtime_env={"working_dir": root, "excludes": [".git", "out", ".whl"]})
    return JobHandle(client, job_id, out)
