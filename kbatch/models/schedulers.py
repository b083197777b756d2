"""Scheduler choice by name. Only schedulers that work with the Kandinsky pipelines as they call them.

The Kandinsky decoder pipelines never call ``scheduler.scale_model_input``, so schedulers that need it
(Euler, Heun, LMS, ...) would silently render wrong images and are not offered. The prior pipeline calls
``step(..., prev_timestep=...)``, which only ``UnCLIPScheduler`` accepts.

Some hub repos ship a scheduler config of their own beside the pipeline's: kandinsky-community/kandinsky-2-1
has ``ddpm_scheduler/`` (the DDPM settings its authors meant, e.g. the learned variance range), which a
config derived from the DDIM one would not reproduce. When the model folder has such a subfolder, the
named scheduler is loaded from it.
"""
from __future__ import annotations

import os

from kbatch.config import DECODER_SCHEDULERS, PRIOR_SCHEDULERS  # the names a config may use

#: scheduler name -> the subfolder of a model repo that holds its own config for it
REPO_SUBFOLDERS = {"ddpm": "ddpm_scheduler"}


def repo_scheduler_folder(name: str, folder: str | os.PathLike | None) -> str | None:
    """The subfolder of the local model ``folder`` that holds scheduler ``name``'s own config, if it has one."""
    sub = REPO_SUBFOLDERS.get(name)
    if folder is None or sub is None:
        return None
    return sub if os.path.isfile(os.path.join(folder, sub, "scheduler_config.json")) else None


def make_scheduler(name: str, current, table: dict[str, str], folder: str | os.PathLike | None = None):
    """A scheduler of class ``table[name]``: from the model ``folder``'s own subfolder for it when there is
    one (``ddpm_scheduler/``), else built from ``current``'s config (keeps betas etc.)."""
    import diffusers  # lazy: config validation in the driver must not import torch

    cls = getattr(diffusers, table[name])
    sub = repo_scheduler_folder(name, folder)
    if sub is not None:
        return cls.from_pretrained(folder, subfolder=sub)
    if type(current) is cls:
        return current
    return cls.from_config(current.config)
