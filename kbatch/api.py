"""The Python entry points: ``render`` (a DataFrame or manifest on the connected or a local Ray) and
``submit`` (a job on a remote cluster through Ray's JobSubmissionClient)."""
from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import yaml

from kbatch.config import ConfigError, JobConfig, load_config


def _config(config: str | JobConfig | Mapping | None, sets=None, manifest=None, output=None, **overrides):
    if isinstance(config, JobConfig):
        base = config.to_dict()
        path = None
    elif isinstance(config, Mapping):
        base, path = dict(config), None
    else:
        base, path = {}, config
    from kbatch.config import deep_merge

    return load_config(path, sets=sets, manifest=manifest, output=output, overrides=deep_merge(base, overrides))


def _with_schedule(overrides: dict, priority: int | None, weight: float | None) -> dict:
    """``priority=`` / ``weight=`` keywords as the ``schedule`` section's keys (over ``schedule=`` ones)."""
    extra = {k: v for k, v in (("priority", priority), ("weight", weight)) if v is not None}
    if not extra:
        return overrides
    return {**overrides, "schedule": {**dict(overrides.get("schedule") or {}), **extra}}


def render(manifest: Any, output: str | None = None, config: str | JobConfig | Mapping | None = None, *,
           sets: list[str] | None = None, overwrite: bool = False, retry_failed: bool = False,
           progress: str | None = None, priority: int | None = None, weight: float | None = None, **overrides):
    """Render ``manifest`` (pandas DataFrame, pyarrow Table, or Parquet URI) and return its results.

    ``config`` is a YAML path, a dict or a JobConfig; keyword arguments override sections of it
    (``render(df, "out", models={"prior": ...}, defaults={"height": 64})``). Uses the connected Ray
    (``ray.init`` / ``RAY_ADDRESS``) or starts a local one. Returns ``Results`` (``.df``, ``.image()``,
    ``.gallery()``) with the run summary in ``.run``. ``retry_failed``: render again the rows whose only
    records are errors (``kbatch run --retry-failed``). ``priority``, ``weight``: ``schedule.priority`` /
    ``schedule.weight`` on a cluster shared with other kbatch jobs (docs/clusters.md).
    """
    import pyarrow as pa

    from kbatch.output.results import open_results
    from kbatch.run.runner import run_job

    table = None
    if isinstance(manifest, (str, os.PathLike)):
        manifest_uri = str(manifest)
    else:
        table = manifest if isinstance(manifest, pa.Table) else pa.Table.from_pandas(manifest, preserve_index=False)
        manifest_uri = "<in-memory>"
    cfg = _config(config, sets, manifest_uri, output, **_with_schedule(overrides, priority, weight))
    result = run_job(cfg, overwrite=overwrite, retry_failed=retry_failed, progress=progress, table=table)
    res = open_results(result.output, dict(cfg.storage_options) or None)
    res.run = result
    return res


_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
KBATCH_EXIT_CODES = (0, 1, 2, 3)
# The last line the job's entrypoint prints (kbatch.cli.job_entrypoint): kbatch's exit code, in the job's logs
EXIT_MARKER = "kbatch-exit-code:"
# The runtime_env variable that carries the config's storage_options to the job (kbatch.submit), so that
# credentials stay out of the entrypoint and the job's metadata.
STORAGE_OPTIONS_ENV = "KBATCH_STORAGE_OPTIONS"
# Never uploaded with the project folder (gitignore-style patterns, relative to the working_dir).
WORKING_DIR_EXCLUDES = [".git", "out", ".whl", "*.whl", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                        ".pytest_cache", ".venv", "venv", ".ipynb_checkpoints", "node_modules", "*.safetensors",
                        "*.ckpt", "*.bin"]


def _iso_seconds(value) -> float | None:
    import datetime as _dt

    try:
        return _dt.datetime.fromisoformat(str(value)).timestamp()
    except (TypeError, ValueError):
        return None


def marker_exit_code(logs: str) -> int | None:
    """kbatch's exit code from the last ``kbatch-exit-code: N`` line of a job's logs, or None."""
    for line in reversed((logs or "").splitlines()):
        if line.startswith(EXIT_MARKER):
            try:
                return int(line[len(EXIT_MARKER):].strip())
            except ValueError:
                return None
    return None


@dataclass(repr=False)
class JobHandle:
    """A render job submitted to a Ray cluster (``kbatch.submit``).

    >>> h = kbatch.submit("configs/prod.yaml", address="http://head:8265")
    >>> h.wait()                 # kbatch's exit code: 0 complete, 1 failed rows, 2 config, 3 incomplete
    >>> h.status(), h.logs()     # Ray's status: 'SUCCEEDED' | 'FAILED' | 'STOPPED' (| PENDING | RUNNING)
    >>> h.results().df           # the output location, through open_results

    ``wait()`` used to return Ray's status string; it returns kbatch's exit code now, because Ray's
    SUCCEEDED/FAILED cannot tell failed rows (1) from a config error (2) or an incomplete run (3).
    """

    client: Any
    job_id: str
    output: str
    address: str | None = None
    # to read _job.json and the results from here; kept in this process only, never sent anywhere
    storage_options: dict | None = None
    _exit_code: int | None = field(default=None, init=False)  # resolved once the job has ended (final then)

    def status(self) -> str:
        """Ray's status: ``PENDING`` | ``RUNNING`` | ``SUCCEEDED`` | ``FAILED`` | ``STOPPED``."""
        s = self.client.get_job_status(self.job_id)
        return str(getattr(s, "value", s)).split(".")[-1]

    def info(self):
        """Ray's ``JobInfo`` (status, message, start/end time, driver_exit_code, ...)."""
        return self.client.get_job_info(self.job_id)

    def logs(self) -> str:
        return self.client.get_job_logs(self.job_id)

    def job_record(self, info=None) -> dict | None:
        """The output's ``_job.json`` if it was written by this job's run (started after Ray started the job;
        an older record is a previous run's on the same output), else None; None too if it is unreadable
        from here."""
        from kbatch import storage
        from kbatch.output.job_file import JOB_FILE

        info = info or self.info()
        try:
            job = storage.read_json(self.output, JOB_FILE, self.storage_options)
        except Exception:  # unreadable from the submitting machine (another node's disk, no credentials)
            return None
        started, ray_started = _iso_seconds((job or {}).get("started")), getattr(info, "start_time", None)
        if not job or started is None or ray_started is None:
            return None
        # "started" has whole seconds; the driver usually runs on the head, whose clock Ray used
        return job if started >= ray_started / 1000.0 - 2.0 else None

    @property
    def exit_code(self) -> int | None:
        """kbatch's exit code once the job has ended, None while it runs. See :meth:`_resolve_exit_code`."""
        if self._exit_code is None:
            info = self.info()
            if self._status_of(info) in _TERMINAL:
                self._exit_code = self._resolve_exit_code(info)
        return self._exit_code

    @staticmethod
    def _status_of(info) -> str:
        return str(getattr(info.status, "value", info.status)).split(".")[-1]

    def _resolve_exit_code(self, info) -> int:
        """kbatch's exit code of the ended job, from the first source that has it:

        1. this run's ``_job.json`` (``exit_code``, or ``result.exit_code``) once the run has finished;
        2. the ``kbatch-exit-code: N`` line the entrypoint prints when kbatch's ``main`` returned (a job that
           ended before ``_job.json`` existed: config errors, exit 2; or an output unreadable from here);
        3. Ray's ``driver_exit_code`` (filled by Ray 2.60) when it is 0, 2 or 3. Without the marker line, a
           1 is Python's own code for a crash outside kbatch's main (an import error), so it counts as 3;
        4. otherwise 3: the job was stopped, killed, or never started (runtime env setup failed).
        """
        job = self.job_record(info)
        if job and job.get("status") not in (None, "running"):
            code = job.get("exit_code", (job.get("result") or {}).get("exit_code"))
            if isinstance(code, int) and code in KBATCH_EXIT_CODES:
                return code
        try:
            code = marker_exit_code(self.logs())
        except Exception:  # logs gone (job server restarted): Ray's record below
            code = None
        if code in KBATCH_EXIT_CODES:
            return code
        code = getattr(info, "driver_exit_code", None)
        return code if code in (0, 2, 3) else 3

    def wait(self, timeout: float | None = 3600, poll: float = 2.0, logs: Callable[[str], Any] | None = None) -> int:
        """Block until the job ends; returns kbatch's exit code (0 complete, 1 failed rows above tolerance,
        2 config error, 3 incomplete or interrupted). ``logs``: called with each new chunk of the job's
        logs while waiting (``logs=print``). ``timeout=None`` waits for ever; TimeoutError if the job is
        still running after ``timeout`` seconds (it keeps running: ``stop()`` stops it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0
        while True:
            s = self.status()
            if logs is not None:
                text = self.logs()
                if len(text) > seen:
                    logs(text[seen:])
                seen = len(text)
            if s in _TERMINAL:
                return self.exit_code
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.job_id} still {s} after {timeout}s")
            time.sleep(poll)

    def stop(self) -> bool:
        """Ask Ray to stop the job (committed shards are kept; rerunning the same job resumes)."""
        return bool(self.client.stop_job(self.job_id))

    def progress(self):
        """The job's progress view now, read from its output location (``_job.json``'s progress, refreshed by
        the job's driver every few seconds, and ``_lease.json``): a dict (``state``: waiting | running |
        ended | lost; ``rows_total``/``rows_done``/``rows_ok``/``rows_failed``/``rows_missing``, ``images``,
        ``images_per_second`` (run) and ``images_per_second_recent`` (last minute), ``eta_seconds``,
        ``queues`` and ``replicas`` per stage, ``exit_code`` once ended) that shows as the progress view in a
        notebook and prints as ``kbatch status --watch``'s frame. One look; call it again to refresh, or
        ``kbatch status OUTPUT --watch`` to follow it. ``waiting`` until the job's run has written its
        ``_job.json``; a previous run's ``_job.json`` on the same output is not this job's."""
        from kbatch.run.watch import View, make_view, read_view

        view = read_view(self.output, self.storage_options)
        if view["state"] != "waiting" and self.job_record() is None:  # an older run's file: not this job's yet
            view = make_view(self.output, None)
        return View(view)

    def results(self):
        """``open_results`` of the job's output location (readable from here: object storage, or a local
        path on a cluster that shares this machine's file system)."""
        from kbatch.output.results import open_results

        return open_results(self.output, self.storage_options)

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
           submission_id: str | None = None, priority: int | None = None, weight: float | None = None,
           **overrides) -> JobHandle:
    """Submit a render job with this config to the Ray cluster at ``address`` (or ``RAY_ADDRESS``): the
    dashboard's HTTP address, e.g. ``http://head-node:8265``.

    The config is resolved here, so config errors raise :class:`ConfigError` before anything is submitted,
    and travels inline (``jobs/render.py --config-b64``) without its ``storage_options``. The job runs this
    kbatch: from a source checkout, the project folder is uploaded as the job's ``working_dir`` (minus
    :data:`WORKING_DIR_EXCLUDES` and the output folder); from an installed package, the package is shipped
    as a ``py_modules`` entry. The cluster needs the dependencies (torch, diffusers, ...) installed, as for
    ``ray job submit``.

    Local paths (output, manifest, existing model folders) are made absolute: they must exist on the
    cluster's nodes (a shared file system, or a cluster on this machine); use object storage otherwise.

    Credentials: the entrypoint, the job's metadata and the job's logs are shown by ``ray job list``, the
    dashboard and ``ps``, so ``storage_options`` never go there (nor into the outputs: ``_job.json`` masks
    them). They travel as JSON in the job's runtime_env variable ``KBATCH_STORAGE_OPTIONS``, which the job's
    driver merges into its config. The job server keeps the runtime_env and shows it to whoever can read
    the job's details, so the cluster's own credentials (instance role, its environment's ``AWS_*``) are
    better where the cluster has them: leave ``storage_options`` empty then. ``env_vars`` are added to the
    runtime_env as given.
    """
    import json

    from ray.job_submission import JobSubmissionClient

    from kbatch.storage import absolute_if_exists, absolute_local, process_local

    cfg = _config(config, sets, manifest, output, **_with_schedule(overrides, priority, weight))
    if process_local(cfg.resolved_output()):
        raise ConfigError(f"config key 'output.path' is {cfg.resolved_output()!r}: memory:// is the memory of the "
                          "job's driver process on the cluster and is gone when the job ends; submit with object "
                          "storage or a shared path, or render to memory:// here with kbatch.render")
    # local paths made absolute: the job's working directory on the cluster is a temporary copy
    out = absolute_local(cfg.resolved_output())
    data = cfg.to_dict()
    storage_options = data.pop("storage_options", None) or {}
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
    job_env = {str(k): str(v) for k, v in (env_vars or {}).items()}
    if storage_options:
        job_env[STORAGE_OPTIONS_ENV] = json.dumps(storage_options)
    if job_env:
        env["env_vars"] = {**env.get("env_vars", {}), **job_env}
    address = address or os.environ.get("RAY_ADDRESS")
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id,
                               metadata={"kbatch_output": out[:1000]})
    return JobHandle(client, job_id, out, address, storage_options=dict(storage_options) or None)
