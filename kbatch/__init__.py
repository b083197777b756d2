"""kbatch: distributed batch rendering for Kandinsky 2.1 on Ray.

    import kbatch
    res = kbatch.render(df, "out/run1", config="configs/cpu.yaml")    # connected or local Ray
    res.df, res.image("row-1"), res.gallery()
    kbatch.open_results("s3://bucket/renders/2026-11-26")
"""
from kbatch.config import ConfigError, JobConfig, load_config

__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing kbatch does not import torch, ray or diffusers
    if name in ("render", "submit", "JobHandle"):
        from kbatch import api

        return getattr(api, name)
    if name in ("open_results", "Results"):
        from kbatch.output import results

        return getattr(results, name)
    if name in ("export", "ExportResult"):
        from kbatch.run import export

        return getattr(export, name)
    if name in ("run_job", "RunResult"):
        from kbatch.run import runner

        return getattr(runner, name)
    raise AttributeError(name)


__all__ = ["render", "submit", "open_results", "export", "run_job", "load_config", "JobConfig", "ConfigError"]
