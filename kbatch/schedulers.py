"""Scheduler choice by name. Only schedulers that work with the Kandinsky pipelines as they call them.

The Kandinsky decoder pipelines never call ``scheduler.scale_model_input``, so schedulers that need it
(Euler, Heun, LMS, ...) would silently render wrong images and are not offered. The prior pipeline calls
``step(..., prev_timestep=...)``, which only ``UnCLIPScheduler`` accepts.
"""
from __future__ import annotations

DECODER_SCHEDULERS = {
    "ddim": "DDIMScheduler",  # as shipped with kandinsky-2-1
    "ddpm": "DDPMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
}
PRIOR_SCHEDULERS = {"unclip": "UnCLIPScheduler"}


def make_scheduler(name: str, current, table: dict[str, str]):
    """A scheduler of class ``table[name]`` built from ``current``'s config (keeps betas etc.)."""
    import diffusers  # lazy: config validation in the driver must not import torch

    cls = getattr(diffusers, table[name])
    if type(current) is cls:
        return current
    return cls.from_config(current.config)
