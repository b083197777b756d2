"""Running the ``kbatch`` command in a subprocess with its own local Ray (temp dir, no auth token)."""
import os
import shutil
import subprocess
import sys
import tempfile

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml


def env():
    e = dict(os.environ)
    e["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="kbt-", dir="/tmp")
    e["RAY_AUTH_MODE"] = "disabled"
    e["RAY_USAGE_STATS_ENABLED"] = "0"
    e.pop("RAY_ADDRESS", None)
    return e


def kbatch(*args, timeout=600, env_update: dict | None = None, env_drop=(), **kw):
    """``kbatch ARGS`` in a subprocess with its own Ray temp dir (removed after), this environment plus
    ``env_update`` less ``env_drop``."""
    e = env()
    for k in env_drop:
        e.pop(k, None)
    e.update(env_update or {})
    try:
        return subprocess.run([sys.executable, "-m", "kbatch.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, env=e, **kw)
    finally:
        shutil.rmtree(e["RAY_TMPDIR"], ignore_errors=True)


def write_job(folder, cfg: dict, rows: list[dict]):
    """Write manifest.parquet and job.yaml into folder; return the config path."""
    os.makedirs(folder, exist_ok=True)
    manifest = os.path.join(folder, "manifest.parquet")
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), manifest)
    cfg = {**cfg, "manifest": manifest}
    path = os.path.join(folder, "job.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    return path
