"""What an output location says about earlier runs: ``_job.json``, the completion marker, resume checks."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import secrets

from kbatch.config import ConfigError, JobConfig

JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"


class ResumeError(ConfigError):
    """The output holds records of a job that meant something else (exit 2, before any model loads)."""


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def meaning(cfg: JobConfig) -> dict:
    """The parts of a config that decide what a row's records are (resume refuses if they change)."""
    d = cfg.to_dict()
    out = {"models": {k: d["models"][k] for k in ("prior", "decoder", "inpaint", "dtype", "scheduler",
                                                 "prior_scheduler", "revision")},
           "defaults": d["defaults"], "seed": d["seed"], "stage": d["stage"],
           "output": {k: d["output"][k] for k in ("format", "image_format", "quality")}}
    q = cfg.quality
    if q.scores:  # which image is kept and what its record holds; absent when off (older outputs)
        out["quality"] = {"clip_score": True, "best_of": q.best_of}
    # toward a training set: each key only when on, so outputs written before these keys resume as before
    extra = {k: v for k, v in (("image_embeddings", q.image_embeddings), ("heads", dict(q.heads)),
                               ("gate", {"head": q.gate_head, "min": q.gate_min} if q.gate else None)) if v}
    if extra:
        out.setdefault("quality", {"clip_score": False, "best_of": q.best_of}).update(extra)
    return out


def fingerprint(cfg: JobConfig) -> str:
    return hashlib.sha256(json.dumps(meaning(cfg), sort_keys=True).encode()).hexdigest()[:16]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("kbatch", "ray", "torch", "diffusers", "transformers", "pyarrow"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            out[name] = None
    return out


def check_config(previous: dict | None, cfg: JobConfig) -> None:
    """Refuse to mix records of a job that meant something else into this output (rows are compared with
    their records by ``kbatch.plan.resume_scan``)."""
    if previous and previous.get("fingerprint") and previous["fingerprint"] != fingerprint(cfg):
        old, new = previous.get("meaning", {}), meaning(cfg)
        changed = sorted(_diff(old, new)) or ["(fingerprint)"]
        raise ResumeError(
            f"output {previous.get('output')!r} holds records of a job with a different config "
            f"(changed: {', '.join(changed)}); use a new output path, or --overwrite to start over")


class RunOrder:
    """The order of an output's runs: their order in ``_job.json``'s ``runs`` list (each run adds itself
    before it commits anything), never their ids' clocks (a run id starts with its machine's UTC time). A run
    missing from the list (records older than the list, or a list that was lost) comes before every listed
    run, ordered by id among the unlisted."""

    def __init__(self, runs: list[str] | None):
        self.rank = {r: i for i, r in enumerate(r for r in runs or [] if isinstance(r, str))}

    def key(self, run) -> tuple[int, int, str]:
        run = run or ""
        i = self.rank.get(run)
        return (0, -1, run) if i is None else (1, i, run)

    def at_or_after(self, run, since) -> bool:
        """``run`` ran no earlier than ``since`` (a listed run; without a list: by id, as outputs written
        before the list did)."""
        if since is None or not run:
            return False
        if since in self.rank:
            return run in self.rank and self.rank[run] >= self.rank[since]
        return not self.rank and run >= since


def runs_of(root: str, storage_options: dict | None = None) -> list[str]:
    """``_job.json``'s ``runs`` at ``root`` ([] when it has none, or no readable ``_job.json``)."""
    from kbatch import storage

    try:
        job = storage.read_json(root, JOB_FILE, storage_options) or {}
    except (ValueError, UnicodeDecodeError):
        return []
    runs = job.get("runs") if isinstance(job, dict) else None
    return [r for r in runs if isinstance(r, str)] if isinstance(runs, list) else []


def _diff(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in set(old) | set(new):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [f"{prefix[:-1]}: {old!r} -> {new!r}"] if old != new else []
