"""The ``kbatch`` command. Exit codes: 0 complete, 1 failed rows above tolerance or invalid input,
2 usage/config error (before any model loads), 3 interrupted/incomplete."""
from __future__ import annotations

import argparse
import base64
import json
import logging
import sys

import yaml

from .config import ConfigError, JobConfig, check_storage, load_config
from .manifest import ManifestError

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
    s.add_argument("--json", action="store_true")
    m = sub.add_parser("models", help="model folders")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    t = msub.add_parser("tiny", help="write tiny random-weight prior/, decoder/, inpaint/ folders, offline")
    t.add_argument("dir")
    t.add_argument("--overwrite", action="store_true")
    return p


def load_job_config(args) -> JobConfig:
    overrides = None
    if getattr(args, "config_b64", None):
        overrides = yaml.safe_load(base64.b64decode(args.config_b64))
    return load_config(getattr(args, "config", None), sets=args.sets, manifest=args.manifest,
                       output=getattr(args, "output", None), overrides=overrides)


def cmd_run(args) -> int:
    from .runner import run_job

    from .storage import process_local

    cfg = load_job_config(args)
    if process_local(cfg.resolved_output()):
        print(f"kbatch: warning: output {cfg.resolved_output()} is memory of this process and is gone when it "
              "exits; render to memory:// from Python (kbatch.render) instead", file=sys.stderr)
    result = run_job(cfg, overwrite=args.overwrite, progress=args.progress)
    print(result.summary_line())
    print(f"output: {result.output}")
    return result.exit_code


def cmd_validate(args) -> int:
    from .manifest import read_manifest
    from .validate import format_problems, validate_manifest

    cfg = load_config(args.config, sets=args.sets, manifest=args.manifest)
    if not cfg.manifest:
        raise ConfigError("config key 'manifest' must be set (config or --manifest), got None")
    check_storage(cfg)
    table, base = read_manifest(cfg.manifest, dict(cfg.storage_options) or None)
    rows, errors = validate_manifest(table, cfg, base, check_images=not args.no_images)
    print(f"config ok; manifest {cfg.manifest}: {table.num_rows} rows, {len(rows)} valid, "
          f"{len(errors)} with problems")
    if errors:
        print(format_problems(errors))
        return EXIT_FAILED
    return EXIT_OK


def cmd_status(args) -> int:
    from .status import format_summary, summarize

    summary = summarize(args.output)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return EXIT_OK if summary.get("complete") else EXIT_INCOMPLETE


def cmd_models(args) -> int:
    from .tiny_models import write_tiny_models

    paths = write_tiny_models(args.dir, overwrite=args.overwrite)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(args.output, rows=args.rows, progress=args.progress)
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    handler = {"run": cmd_run, "job": cmd_run, "validate": cmd_validate, "status": cmd_status, "models": cmd_models,
               "demo": cmd_demo}[args.cmd]
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
