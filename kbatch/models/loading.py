"""Loading the diffusers pipelines: device, dtype, scheduler, offload, compile.

Models load only through ``from_pretrained(local_folder, use_safetensors=True)``: the same path for the real
``kandinsky-community`` weights and for the tiny offline folders of ``kbatch models tiny``. A hub id or an
``s3://`` / ``gs://`` folder is first made local by ``kbatch.models.store.stage_model`` (huggingface_hub's cache,
or one verified copy per node), with retries on transient errors, so a 429 at actor start costs a retry, not
the actor.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch

from kbatch.models.store import same_weights, stage_model, with_retries
from kbatch.models.schedulers import DECODER_SCHEDULERS, PRIOR_SCHEDULERS, make_scheduler

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


def _from_pretrained(cls, model: str, path: str, place: Placement, **components):
    """``cls.from_pretrained`` of the staged local folder, safetensors only. Retried on transient errors too
    (a network filesystem mounted as a local folder can time out); a bad model fails at once."""
    return with_retries(lambda: cls.from_pretrained(path, torch_dtype=place.dtype, use_safetensors=True,
                                                    **components),
                        what=f"loading {cls.__name__} from {model}")


def load_prior(model: str, place: Placement, *, scheduler: str = "unclip", offload: bool = False,
               revision: str | None = None, storage_options: dict | None = None, cache_dir: str | None = None):
    """``storage_options``: fsspec options for a URL model; ``cache_dir``: the node-local copy (model_store)."""
    quiet()  # first: importing the pipeline logs transformers' torchvision notice
    from diffusers import KandinskyPriorPipeline

    path = stage_model(model, storage_options, cache_dir, revision)
    pipe = _from_pretrained(KandinskyPriorPipeline, model, path, place)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler, PRIOR_SCHEDULERS, folder=path)
    return _finish(pipe, place, offload)


def load_decoder(model: str, place: Placement, *, scheduler: str = "ddim", offload: bool = False,
                 channels_last: bool = False, compile=False, revision: str | None = None,
                 storage_options: dict | None = None, cache_dir: str | None = None):
    """The scheduler comes from the repo's own subfolder for it when it has one (``ddpm_scheduler/``)."""
    quiet()  # first: importing the pipeline logs transformers' torchvision notice
    from diffusers import KandinskyPipeline

    path = stage_model(model, storage_options, cache_dir, revision)
    pipe = _from_pretrained(KandinskyPipeline, model, path, place)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler, DECODER_SCHEDULERS, folder=path)
    _speedups(pipe, place, channels_last, compile, cache_dir)
    return _finish(pipe, place, offload)


#: Inpaint components that may be the decoder's own objects: equal files mean equal modules.
SHAREABLE = ("text_encoder", "movq", "tokenizer")


def shared_with_decoder(decoder, inpaint_folder: str) -> dict:
    """{name: decoder's module} for each of ``SHAREABLE`` whose folder in ``inpaint_folder`` holds the same files
    as the decoder's (``model_store.same_weights``: sizes and sha256, no tensors loaded)."""
    dec_folder = getattr(decoder, "name_or_path", None)
    if not dec_folder or not os.path.isdir(dec_folder):
        return {}
    return {name: getattr(decoder, name) for name in SHAREABLE
            if getattr(decoder, name, None) is not None
            and same_weights(os.path.join(dec_folder, name), os.path.join(inpaint_folder, name))}


def load_inpaint(model: str, decoder, place: Placement, *, scheduler: str = "ddim", offload: bool = False,
                 channels_last: bool = False, compile=False, revision: str | None = None,
                 storage_options: dict | None = None, cache_dir: str | None = None):
    """The inpaint pipeline. Text encoder, tokenizer and MoVQ are ``decoder``'s own objects when their files
    are equal (decided from file hashes), and are then not read from disk at all: on the real weights the
    text encoder and MoVQ are ~2.5 GB that a load-then-compare would read and hold a second time."""
    quiet()  # first: importing the pipeline logs transformers' torchvision notice
    from diffusers import KandinskyInpaintPipeline

    path = stage_model(model, storage_options, cache_dir, revision)
    shared = shared_with_decoder(decoder, path)
    log.info("inpaint model %s: sharing %s with the decoder", model, sorted(shared) or "nothing")
    pipe = _from_pretrained(KandinskyInpaintPipeline, model, path, place, **shared)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler, DECODER_SCHEDULERS, folder=path)
    _speedups(pipe, place, channels_last, compile, cache_dir)
    return _finish(pipe, place, offload)


def compiles(place: Placement, compile) -> bool:
    """Whether ``models.compile`` applies on this worker: on CUDA only (on a CPU it costs more than it saves).
    ``compile`` is the run's decision (``kbatch.models.compile_plan``): only ``True`` compiles."""
    return compile is True and place.device == "cuda"


def inductor_cache(cache_dir: str | None) -> str:
    """A persistent inductor cache in the node's kbatch cache (``<models.cache_dir>/inductor``, default
    ``/var/tmp/kbatch-<user>/models/inductor``), so a replica started again on a node (a retry, the next job, a pool
    that grows) loads the compiled kernels instead of compiling them again. Set before the first compile; a
    ``TORCHINDUCTOR_CACHE_DIR`` already in the environment wins."""
    from kbatch.models.store import default_cache_dir

    path = os.path.join(os.path.expanduser(cache_dir or default_cache_dir()), "inductor")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", path)
    os.makedirs(os.environ["TORCHINDUCTOR_CACHE_DIR"], exist_ok=True)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def _speedups(pipe, place: Placement, channels_last: bool, compile, cache_dir: str | None = None):
    """On CUDA: cuDNN picks its fastest convolution algorithms per shape (the shapes repeat every call);
    UNet and MoVQ channels-last; with compile, the UNet and the MoVQ decode compiled (static shapes: each
    padded (batch, size) bucket gets its own graph, compiled during the decoder's warm-up) with the kernels
    cached on the node. The inpaint pipeline may share the decoder's MoVQ: it is converted once."""
    if place.device != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    movq = getattr(pipe, "movq", None)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        if movq is not None:
            movq.to(memory_format=torch.channels_last)
    if compiles(place, compile):
        inductor_cache(cache_dir)
        pipe.unet.compile(dynamic=False)
        if movq is not None and not getattr(movq, "_kbatch_compiled", False):
            # the pipelines call movq.decode(...), not movq(...): compile that method (an instance attribute
            # shadowing the class's)
            movq.decode = torch.compile(movq.decode, dynamic=False)
            movq._kbatch_compiled = True
