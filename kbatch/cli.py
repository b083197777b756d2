"""The ``kbatch`` command. Exit codes: 0 complete, 1 failed rows above tolerance or invalid input,
2 usage/config error (before any model loads), 3 interrupted/incomplete, and any unexpected error (never 1,
so that 1 always means failed rows)."""
from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import traceback

import yaml

from kbatch.config import ConfigError, JobConfig, check_storage, load_config
from kbatch.plan.manifest import ManifestError

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_INCOMPLETE = 0, 1, 2, 3


def _run_args(p: argparse.ArgumentParser, config_positional: bool):
    if config_positional:
        p.add_argument("config", help="YAML config (path or fsspec URL)")
    else:
        p.add_argument("--config", help="YAML config (path or fsspec URL)")
        p.add_argument("--config-b64", help=argparse.SUPPRESS)  # kbatch.submit passes the resolved config
    p.add_argument("--manifest", help="override config 'manifest'")
    p.add_argument("--output", help="override config 'output.path'")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override any config key, e.g. --set defaults.height=768 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="delete the output location's contents first")
    p.add_argument("--retry-failed", action="store_true",
                   help="also render again every row whose only records are errors")
    p.add_argument("--progress", choices=["auto", "bar", "log", "off"], default=None)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kbatch", description="Batch rendering for Kandinsky 2.1 on Ray")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="tiny offline models + example manifest, rendered on a local Ray")
    d.add_argument("--output", default="out", help="folder for models, manifest and renders (default ./out)")
    d.add_argument("--rows", type=int, default=12)
    d.add_argument("--progress", choices=["auto", "bar", "log", "off"], default=None)
    _run_args(sub.add_parser("run", help="run a render job"), config_positional=True)
    _run_args(sub.add_parser("job", help="jobs/render.py: 'run' with --config"), config_positional=False)
    v = sub.add_parser("validate", help="check config and every manifest row; loads no model")
    v.add_argument("config")
    v.add_argument("--manifest")
    v.add_argument("--set", dest="sets", action="append", default=[])
    v.add_argument("--no-images", action="store_true", help="skip decoding init images and masks")
    s = sub.add_parser("status", help="summary of an output location; exit 0 only when complete")
    s.add_argument("output")
    s.add_argument("--config", help="YAML config whose storage_options (endpoint, credentials) open OUTPUT")
    s.add_argument("--json", action="store_true")
    s.add_argument("--watch", action="store_true",
                   help="redraw the progress view of the running job (rows, img/s, ETA, queues, replicas) until "
                        "it ends, then print the summary and exit with its exit code")
    s.add_argument("--interval", type=float, default=5.0, metavar="S", help="with --watch: seconds between redraws")
    j = sub.add_parser("submit", help="submit a render job to a Ray cluster's job server")
    j.add_argument("config", help="YAML config (path or fsspec URL)")
    j.add_argument("--address", help="the job server (dashboard) address, e.g. http://head:8265; "
                                     "default: RAY_ADDRESS")
    j.add_argument("--manifest", help="override config 'manifest'")
    j.add_argument("--output", help="override config 'output.path'")
    j.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override any config key (repeatable)")
    j.add_argument("--priority", type=int, default=None, metavar="N",
                   help="schedule.priority: higher runs first on a cluster shared by kbatch jobs (default 0)")
    j.add_argument("--weight", type=float, default=None, metavar="W",
                   help="schedule.weight: share among running jobs of the same priority (default 1)")
    j.add_argument("--wait", action="store_true",
                   help="follow the job's logs until it ends and exit with kbatch's exit code")
    j.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="with --wait: stop waiting after S seconds and exit 3 (the job keeps running)")
    ls = sub.add_parser("jobs", help="list the kbatch jobs sharing a Ray cluster: priority, state (QUEUED, RUNNING, "
                                     "DRAINING), GPUs held/allotted, rows, img/s, ETA, queue position")
    ls.add_argument("--address", help="the cluster: head:6379, ray://head:10001 or the job server http://head:8265; "
                                      "default: the Ray of RAY_ADDRESS or of this machine")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--reply", action="store_true", help=argparse.SUPPRESS)  # asked through a job server
    cn = sub.add_parser("cancel", help="stop one kbatch job of a cluster cleanly (lease released, output resumable)")
    cn.add_argument("run_id", metavar="RUN_ID", help="the run id `kbatch jobs` shows (or a prefix of exactly one)")
    cn.add_argument("--address", help="the cluster, as for `kbatch jobs`")
    cn.add_argument("--wait", action="store_true", help="wait until the run has stopped")
    cn.add_argument("--timeout", type=float, default=120.0, metavar="S", help="with --wait: at most S seconds (exit 3)")
    cn.add_argument("--reply", action="store_true", help=argparse.SUPPRESS)
    m = sub.add_parser("models", help="model folders")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    t = msub.add_parser("tiny", help="write tiny random-weight prior/, decoder/, inpaint/ folders, offline")
    t.add_argument("dir")
    t.add_argument("--overwrite", action="store_true")
    pl = msub.add_parser("pull", help="stage a hub repo or model folder (safetensors only) into a folder or "
                                      "bucket, once for a whole fleet")
    pl.add_argument("source", help="hub id (owner/name), local folder or fsspec URL")
    pl.add_argument("dest", help="folder or fsspec URL (s3://bucket/models/kandinsky-2-1)")
    pl.add_argument("--revision", default=None)
    pl.add_argument("--config", default=None, help="a job config whose storage_options reach the destination")
    rj = sub.add_parser("rayjob", help="print a KubeRay RayJob (+ ConfigMap) running this job on a cluster of "
                                       "its own, queued by Kueue (docs/clusters.md)")
    rj.add_argument("config", help="YAML config (path or fsspec URL)")
    rj.add_argument("--manifest", help="override config 'manifest'")
    rj.add_argument("--output", help="override config 'output.path'")
    rj.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE")
    rj.add_argument("--name", default="kbatch", help="the RayJob's name (default kbatch)")
    rj.add_argument("--namespace", default=None)
    rj.add_argument("--queue", default=None, help="Kueue LocalQueue: the job is printed suspended, for Kueue")
    rj.add_argument("--priority-class", default=None, help="Kueue WorkloadPriorityClass")
    rj.add_argument("--image", default="kbatch:latest", help="an image with kbatch installed")
    rj.add_argument("--max-gpu-workers", type=int, default=8, help="elastic GPU group: the most GPU pods")
    rj.add_argument("--gpu-workers", type=int, default=None,
                    help="a fixed GPU group of N pods, autoscaling off (Kueue without feature gates)")
    rj.add_argument("--gpus-per-worker", type=int, default=1)
    rj.add_argument("--storage-secret", default=None,
                    help="a Secret whose key storage_options.json the pods read as KBATCH_STORAGE_OPTIONS")
    ex = sub.add_parser("export", help="the ok images whose records match --where, as webdataset tars, Parquet "
                                       "shards or a datasets folder, embeddings beside them (docs/export.md)")
    ex.add_argument("output", help="a kbatch output (path or fsspec URL)")
    ex.add_argument("dest", help="the export's folder (path or fsspec URL); a rerun resumes it")
    ex.add_argument("--where", default=None, metavar="EXPR",
                    help="pandas expression over the record columns, e.g. 'clip_score > 28 and score_aesthetic > 6'")
    ex.add_argument("--format", default="webdataset", choices=["webdataset", "parquet", "hf"])
    ex.add_argument("--dedup", type=float, default=None, metavar="COS",
                    help="drop images whose embedding cosine with an earlier kept image is >= COS (faiss)")
    ex.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per export shard")
    ex.add_argument("--overwrite", action="store_true", help="start DEST's export again from nothing")
    ex.add_argument("--address", default=None,
                    help="a Ray cluster to write the shards on (default: RAY_ADDRESS if set; else this process)")
    ex.add_argument("--config", help="YAML config whose storage_options open OUTPUT and DEST")
    ex.add_argument("--progress", choices=["auto", "bar", "log", "off"], default="auto")
    return p


def env_storage_options() -> dict:
    """The storage options ``kbatch.submit`` sends in the job's runtime_env (``KBATCH_STORAGE_OPTIONS``, a JSON
    object) rather than in the entrypoint, where ``ray job list`` and ``ps`` would show them."""
    from kbatch.api import STORAGE_OPTIONS_ENV

    text = os.environ.get(STORAGE_OPTIONS_ENV)
    if not text:
        return {}
    try:  # the value holds credentials: errors name the variable, never echo it
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"environment variable {STORAGE_OPTIONS_ENV} is not valid JSON ({e.msg} at "
                          f"position {e.pos})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"environment variable {STORAGE_OPTIONS_ENV} must hold a JSON object, got a "
                          f"{type(value).__name__}")
    return value


def with_env_storage_options(cfg: JobConfig) -> JobConfig:
    """``cfg`` with ``KBATCH_STORAGE_OPTIONS`` merged into ``storage_options``. The variable supplies
    defaults: a key the config sets itself (YAML, ``--set``) wins, as the more specific, per-job setting."""
    env = env_storage_options()
    if env:
        cfg.storage_options = {**env, **cfg.storage_options}
    return cfg


def load_job_config(args) -> JobConfig:
    overrides = None
    if getattr(args, "config_b64", None):
        overrides = yaml.safe_load(base64.b64decode(args.config_b64))
    cfg = load_config(getattr(args, "config", None), sets=args.sets, manifest=args.manifest,
                      output=getattr(args, "output", None), overrides=overrides)
    return with_env_storage_options(cfg)


def cmd_run(args) -> int:
    from kbatch.run.runner import run_job

    from kbatch.storage import process_local

    cfg = load_job_config(args)
    if process_local(cfg.resolved_output()):
        print(f"kbatch: warning: output {cfg.resolved_output()} is memory of this process and is gone when it "
              "exits; render to memory:// from Python (kbatch.render) instead", file=sys.stderr)
    result = run_job(cfg, overwrite=args.overwrite, retry_failed=args.retry_failed, progress=args.progress)
    print(result.summary_line())
    print(f"output: {result.output}")
    return result.exit_code


def cmd_validate(args) -> int:
    """Every row checked as a run would check it (ids, values, URIs; input images unless --no-images),
    streamed: problems are printed as they are found, then a summary line."""
    from kbatch.plan.resume_scan import scan
    from kbatch.plan.planner import Planner
    from kbatch.schema.rows import Row
    from kbatch.plan.validate import validate_images

    cfg = with_env_storage_options(load_config(args.config, sets=args.sets, manifest=args.manifest))
    if not cfg.manifest:
        raise ConfigError("config key 'manifest' must be set (config or --manifest), got None")
    check_storage(cfg)
    so = dict(cfg.storage_options) or None
    if cfg.stage == "decoder":
        from kbatch.plan.manifest import embeddings_source

        source = embeddings_source(cfg.manifest, so, cfg.limits)
    else:
        from kbatch.plan.manifest import ManifestSource

        source = ManifestSource.open(cfg.manifest, so)
    if cfg.stage != "prior" and cfg.models.decoder != "sim":  # as `kbatch run` plans: exit 2 before any row
        from kbatch.models.compile_plan import check_before_start
        from kbatch.run.runner import job_shapes

        shapes = job_shapes(source, cfg)  # models.compile: true that would recompile mid-run
        check_before_start(cfg.models.compile, cfg.resources.device, shapes, shapes.max_num_images,
                           cfg.resources.decoder.batch_size)
    planner = Planner(cfg, source, scan(source), "validate")
    n_valid = n_bad = 0
    for start, batch in source.batches(batch_size=1024):
        valid, indices, bad = [], [], []
        for k, cells in enumerate(batch.to_pylist()):
            out = planner.validate(cells, start + k)
            if isinstance(out, Row):
                valid.append(out)
                indices.append(start + k)
            else:
                bad.append(out)
        images_bad = validate_images(valid, cfg.limits, storage_options=so, indices=indices) \
            if valid and not args.no_images else []
        for e in sorted(bad + images_bad, key=lambda e: e.index):
            print(e)
        n_bad += len(bad) + len(images_bad)
        n_valid += len(valid) - len(images_bad)
    print(f"config ok; manifest {cfg.manifest}: {source.total} rows, {n_valid} valid, {n_bad} with problems")
    return EXIT_FAILED if n_bad else EXIT_OK


def cmd_status(args) -> int:
    from kbatch.run.status import format_summary, summarize

    # the config's storage_options (endpoint, credentials), with KBATCH_STORAGE_OPTIONS as defaults
    options = with_env_storage_options(load_config(args.config) if args.config else JobConfig()).storage_options
    if args.watch:
        from kbatch.run.watch import watch

        if args.interval <= 0:
            raise ConfigError(f"--interval must be > 0 seconds, got {args.interval:g}")
        try:
            return watch(args.output, dict(options) or None, interval=args.interval, as_json=args.json)
        except KeyboardInterrupt:
            print("\nkbatch: stopped watching; the run goes on", file=sys.stderr)
            return EXIT_INCOMPLETE
    summary = summarize(args.output, dict(options) or None)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return EXIT_OK if summary.get("complete") else EXIT_INCOMPLETE


def cmd_submit(args) -> int:
    from kbatch.api import submit

    handle = submit(args.config, args.address, sets=args.sets, manifest=args.manifest, output=args.output,
                    priority=args.priority, weight=args.weight)
    print(f"job: {handle.job_id}", flush=True)
    print(f"output: {handle.output}", flush=True)
    if not args.wait:
        return EXIT_OK
    try:
        code = handle.wait(timeout=args.timeout, poll=2.0, logs=lambda text: print(text, end="", flush=True))
    except TimeoutError:
        print(f"kbatch: job {handle.job_id} still running after {args.timeout:g}s; it keeps running "
              f"(ray job stop {handle.job_id} stops it)", file=sys.stderr)
        return EXIT_INCOMPLETE
    except KeyboardInterrupt:
        print(f"kbatch: stopped waiting; job {handle.job_id} keeps running (ray job stop {handle.job_id} "
              "stops it)", file=sys.stderr)
        return EXIT_INCOMPLETE
    job = handle.job_record() or {}
    cause = job.get("error")
    print(f"kbatch: job {handle.job_id} ended {handle.status()}; exit code {code}"
          + (f" ({job.get('status')})" if job.get("status") else "") + (f": {cause}" if cause else ""),
          file=sys.stderr)
    return code


def cmd_jobs(args) -> int:
    from kbatch.cluster.jobs import REPLY_MARKER, NoCluster, format_table, survey

    try:
        coordinator, rows = survey(args.address)
    except NoCluster as e:
        raise ConfigError(str(e)) from None
    if args.reply:  # inside a Ray job started by `kbatch jobs --address http://...`
        print(REPLY_MARKER + json.dumps({"coordinator": coordinator, "jobs": [r.to_dict() for r in rows]}),
              flush=True)
        return EXIT_OK
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    elif rows:
        print(format_table(rows))
    if not coordinator:
        print("kbatch: no kbatch jobs on this cluster: no kbatch coordinator runs on it (the first kbatch job "
              "started on the cluster starts it)", file=sys.stderr)
    elif not rows:
        print("kbatch: no kbatch jobs on this cluster now", file=sys.stderr)
    return EXIT_OK


def cmd_cancel(args) -> int:
    from kbatch.cluster.jobs import REPLY_MARKER, NoCluster, cancel, wait_gone

    try:
        row = cancel(args.run_id, args.address)
    except NoCluster as e:
        raise ConfigError(str(e)) from None
    if args.reply:
        print(REPLY_MARKER + json.dumps({"row": row.to_dict() if row else None}), flush=True)
        return EXIT_OK
    if row is None:
        raise ConfigError(f"no kbatch job {args.run_id!r} on this cluster (`kbatch jobs` lists them by run id)")
    print(f"kbatch: cancel requested: run {row.run_id} ({row.output}); it stops at its next heartbeat, its "
          "batches in flight end, its lease is released and the output stays resumable (exit code 3)",
          file=sys.stderr)
    if args.wait:
        if not wait_gone(row.run_id, args.address, timeout=args.timeout):
            print(f"kbatch: run {row.run_id} still registered after {args.timeout:g} s", file=sys.stderr)
            return EXIT_INCOMPLETE
        print(f"kbatch: run {row.run_id} stopped", file=sys.stderr)
    return EXIT_OK


def cmd_models(args) -> int:
    if args.models_cmd == "pull":
        from kbatch.models.store import pull_model

        options = with_env_storage_options(load_config(args.config) if args.config else JobConfig()).storage_options
        try:
            summary = pull_model(args.source, args.dest, dict(options) or None, revision=args.revision)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"kbatch models pull {args.source} {args.dest}: {e}") from None
        print(json.dumps(summary, indent=2, default=str))
        return EXIT_OK
    from kbatch.models.tiny import write_tiny_models

    paths = write_tiny_models(args.dir, overwrite=args.overwrite)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return EXIT_OK


def cmd_rayjob(args) -> int:
    from kbatch.rayjob import RayJobOptions, main as rayjob_main

    cfg = load_config(args.config, sets=args.sets, manifest=args.manifest, output=args.output)
    opts = RayJobOptions(name=args.name, namespace=args.namespace, image=args.image, queue=args.queue,
                         priority_class=args.priority_class, max_gpu_workers=args.max_gpu_workers,
                         gpu_workers=args.gpu_workers, gpus_per_worker=args.gpus_per_worker,
                         storage_secret=args.storage_secret)
    print(rayjob_main(cfg, opts), end="")
    return EXIT_OK


def cmd_export(args) -> int:
    from kbatch.run.export import ExportError, export

    options = with_env_storage_options(load_config(args.config) if args.config else JobConfig()).storage_options
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):  # a job server: not a cluster to connect to
        if args.address:
            raise ConfigError(f"--address {address}: kbatch export connects to a Ray cluster (ray://head:10001 or "
                              "head:6379), not to its job server")
        address = None
    ray = None
    try:
        if address:
            import ray

            ray.init(address=address, log_to_driver=False)
        result = export(args.output, args.dest, args.where, format=args.format, dedup=args.dedup,
                        shard_size=args.shard_size, storage_options=dict(options) or None, progress=args.progress,
                        overwrite=args.overwrite)
    except ExportError as e:
        print(f"kbatch: export refused: {e}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        if ray is not None:
            ray.shutdown()
    print(result.summary_line())
    print(f"dest: {result.dest}")
    return result.exit_code


def cmd_demo(args) -> int:
    from kbatch.demo import run_demo

    result = run_demo(args.output, rows=args.rows, progress=args.progress)
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    handler = {"run": cmd_run, "job": cmd_run, "validate": cmd_validate, "status": cmd_status, "models": cmd_models,
               "demo": cmd_demo, "submit": cmd_submit, "jobs": cmd_jobs, "cancel": cmd_cancel,
               "rayjob": cmd_rayjob, "export": cmd_export}[args.cmd]
    try:
        return handler(args)
    except ConfigError as e:
        print(f"kbatch: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except ManifestError as e:  # unreadable manifest, missing columns: before any model loads
        print(f"kbatch: manifest error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("kbatch: interrupted", file=sys.stderr)
        return EXIT_INCOMPLETE
    except Exception as e:  # a bug or an environment problem: 3, never Python's 1 (which means failed rows)
        traceback.print_exc()
        print(f"kbatch: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_INCOMPLETE


def job_entrypoint(argv: list[str]) -> int:
    """``jobs/render.py``: ``kbatch job ARGS``, then ``kbatch-exit-code: N`` as the last line of the job's
    logs, which ``JobHandle`` reads where ``_job.json`` is not readable and Ray has no exit code. The line is
    printed only when kbatch's ``main`` returned, so a job whose logs lack it died before (or outside) it."""
    from kbatch.api import EXIT_MARKER

    try:
        code = main(["job", *argv])
    except SystemExit as e:  # argparse usage errors exit 2
        code = e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_CONFIG)
    sys.stderr.flush()
    print(f"{EXIT_MARKER} {code}", flush=True)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(job_entrypoint(sys.argv[2:]) if sys.argv[1:2] == ["job"] else main())
