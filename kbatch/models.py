"""Loading the diffusers pipelines: device, dtype, scheduler, offload, compile.

Models load only through ``from_pretrained(hub_id_or_folder, use_safetensors=True)``: the same path for the
real ``kandinsky-community`` weights and for the tiny offline folders of ``kbatch models tiny``.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch

from .schedulers import DECODER_SCHEDULERS, PRIOR_SCHEDULERS, make_scheduler

log = logging.getLogger("kbatch")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Placement:
    device: str  # cuda | cpu
    dtype: torch.dtype
    worker: str  # "node:<id8>/gpu:<ids>" or "node:<id8>/cpu"


def quiet():
    """Silence weight-loading and denoising progress bars inside workers."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    warnings.filterwarnings("ignore", message=".*torch_dtype.*")  # diffusers' rename notice, per load
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    tlog.disable_progress_bar()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()


def placement(device_pref: str, dtype_name: str, threads: int = 0) -> Placement:
    """Decide torch device and dtype for this worker; set torch threads on CPU."""
    gpu_ids: list = []
    node = "local"
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            node = ctx.get_node_id()[:8]
            gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # pragma: no cover - outside Ray
        pass
    cuda = torch.cuda.is_available()
    if device_pref == "cuda" and not cuda:
        raise RuntimeError("resources.device is 'cuda' but this worker sees no CUDA device")
    device = "cuda" if (device_pref == "cuda" or (device_pref == "auto" and cuda)) else "cpu"
    dtype = _DTYPES[dtype_name]
    if device == "cpu":
        if dtype == torch.float16:
            log.warning("float16 is not supported well on CPU; using float32 on this worker")
            dtype = torch.float32
        torch.set_num_threads(max(1, threads or 1))
    where = f"gpu:{','.join(gpu_ids) or '0'}" if device == "cuda" else (
        f"gpu:{','.join(gpu_ids)}(cpu)" if gpu_ids else "cpu")
    return Placement(device, dtype, f"node:{node}/{where}/pid:{os.getpid()}")


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def _finish(pipe, place: Placement, offload: bool):
    pipe.set_progress_bar_config(disable=True)
    if offload and place.device == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(place.device)
    return pipe


def load_prior(model: str, place: Placement, *, scheduler: str = "unclip", offload: bool = False,
               revision: str | None = None):
    quiet()  # first: importing the pipeline logs transformers' torchvision notice
    from diffusers import KandinskyPriorPipeline

    pipe = KandinskyPriorPipeline.from_pretrained(model, torch_dtype=place.dtype, use_safetensors=True,
                                                  revision=revision)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler, PRIOR_SCHEDULERS)
    return _finish(pipe, place, offload)


def load_decoder(model: str, place: Placement, *, scheduler: str = "ddim", offload: bool = False,
                 channels_last: bool = False, compile: bool = False, revision: str | None = None):
    quiet()  # first: importing the pipeline logs transformers' torchvision notice
    from diffusers import KandinskyPipeline

    pipe = KandinskyPipeline.from_pretrained(model, torch_dtype=place.dtype, use_safetensors=True,
                                             revision=revision)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler, DECODER_SCHEDULERS)
    _speedups(pipe, place, channels_last, compile)
    return _finish(pipe, place, offload)


def load_inpaint(model: str, decoder, place: Placement, *, scheduler: str = "ddim", offload: bool = False,
                 channels_last: bool = False, compile: bool = False, revision: str | None = None):
    """The inpaint pipeline; text encoder, tokenizer and MoVQ are shared with ``decoder`` when equal."""
    quiet()  # first: importing the pipeline logs transformers' torchvision notice
    from diffusers import KandinskyInpaintPipeline

    pipe = KandinskyInpaintPipeline.from_pretrained(model, torch_dtype=place.dtype, use_safetensors=True,
                                                    revision=revision)
    for name in ("text_encoder", "movq"):
        if _same_weights(getattr(pipe, name), getattr(decoder, name)):
            setattr(pipe, name, getattr(decoder, name))
            pipe.register_modules(**{name: getattr(decoder, name)})
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler, DECODER_SCHEDULERS)
    _speedups(pipe, place, channels_last, compile)
    return _finish(pipe, place, offload)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    return all(sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def compiles(place: Placement, compile: bool) -> bool:
    """Whether ``models.compile`` applies on this worker: on CUDA only (on a CPU it costs more than it saves)."""
    return compile and place.device == "cuda"


def _speedups(pipe, place: Placement, channels_last: bool, compile: bool):
    if place.device != "cuda":
        return
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if compiles(place, compile):
        # in place; static shapes: each (batch, size) bucket gets its own graph, compiled during the
        # decoder's warm-up, instead of dynamo turning the sizes into slower dynamic dimensions after the
        # second one it sees
        pipe.unet.compile(dynamic=False)
