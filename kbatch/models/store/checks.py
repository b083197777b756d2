"""Checks of a model before a job starts (on the driver, before any actor): something there, a diffusers
``model_index.json`` of the expected pipeline, safetensors weights for each weighted component, the right
UNet (decoder vs inpaint), readable safetensors headers. A problem is a ``ConfigError`` naming the config key
and its value (exit 2). Cheap: listings and small configs, never weights. See docs/models.md.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import fsspec

from kbatch.config import ConfigError
from kbatch.models.store.manifest import COMPLETE, PULL_MANIFEST, PullManifest, read_manifest
from kbatch.models.store.retries import with_retries
from kbatch.models.store.sources import (HUB_TIMEOUT, UNSAFE_WEIGHT_SUFFIXES, _fs, _local_names, _local_path,
                                         _remote_listing, is_sim, model_kind)

log = logging.getLogger("kbatch")


# Pipeline class a config key expects -> classes a model_index.json may name for it. The hub's
# kandinsky-2-1-inpaint names "KandinskyPipeline" although it is an inpaint model: its UNet tells them apart.
_ACCEPTED = {
    "KandinskyPriorPipeline": {"KandinskyPriorPipeline"},
    "KandinskyPipeline": {"KandinskyPipeline", "KandinskyImg2ImgPipeline"},
    "KandinskyInpaintPipeline": {"KandinskyInpaintPipeline", "KandinskyPipeline"},
}
_UNET_IN_CHANNELS = {"KandinskyPipeline": 4, "KandinskyInpaintPipeline": 9}
_ROLE = {"KandinskyPriorPipeline": "a prior (models.prior)", "KandinskyPipeline": "a decoder (models.decoder)",
         "KandinskyImg2ImgPipeline": "a decoder (models.decoder)",
         "KandinskyInpaintPipeline": "an inpaint model (models.inpaint)"}


def _layout_problem(names: set[str], read: Callable[[str], bytes], pipeline_class: str | None) -> str | None:
    """What is wrong with a model folder of these file ``names`` (relative paths), or None. Reads only
    model_index.json and unet/config.json."""
    if not names:
        return "nothing there (no such folder, or it is empty)"
    if "model_index.json" not in names:
        return "no model_index.json there (not a diffusers pipeline folder)"
    try:
        index = json.loads(read("model_index.json"))
    except ValueError as e:
        return f"model_index.json is not valid JSON ({e})"
    cls = index.get("_class_name")
    if pipeline_class is not None and cls not in _ACCEPTED.get(pipeline_class, {pipeline_class}):
        role = f" ({_ROLE[cls]})" if cls in _ROLE else ""
        return f"model_index.json names pipeline {cls!r}{role}, expected {pipeline_class!r}"
    for comp, spec in sorted(index.items()):
        if comp.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        files = [n for n in names if n.startswith(comp + "/")]
        if not files:
            return f"no {comp}/ folder, which model_index.json lists"
        unsafe = sorted(n for n in files if n.endswith(UNSAFE_WEIGHT_SUFFIXES))
        weighted = f"{comp}/config.json" in names or unsafe
        if weighted and not any(n.endswith(".safetensors") for n in files):
            found = f" (only {', '.join(unsafe)})" if unsafe else ""
            return f"{comp}/ has no .safetensors weights{found}; kbatch loads safetensors only"
    want = _UNET_IN_CHANNELS.get(pipeline_class or "")
    if want is not None and "unet/config.json" in names:
        try:
            channels = json.loads(read("unet/config.json")).get("in_channels")
        except ValueError as e:
            return f"unet/config.json is not valid JSON ({e})"
        if channels != want:
            kind = {4: " (a text-to-image decoder's UNet)", 9: " (an inpaint UNet)"}.get(channels, "")
            return f"unet/config.json has in_channels {channels}{kind}; {pipeline_class} needs {want}"
    return None


def _safetensors_problem(root: str, names: set[str]) -> str | None:
    """The first local ``*.safetensors`` file whose header does not parse (a truncated or overwritten copy):
    reads 8 bytes and the JSON header of each, never the tensors."""
    for rel in sorted(n for n in names if n.endswith(".safetensors")):
        path = os.path.join(root, rel)
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 2 <= n <= min(size - 8, 100 << 20):
                    raise ValueError(f"header length {n} in a file of {size} bytes")
                header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise ValueError(f"its tensors end at byte {8 + n + end}, the file has {size} (truncated)")
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            return f"{rel} is not a readable safetensors file ({e})"
    return None



def check_model(key: str, uri: str, pipeline_class: str, storage_options: dict | None = None, *,
                revision: str | None = None) -> None:
    """Raise :class:`ConfigError` naming ``key`` and ``uri`` when the model there cannot be what ``key`` needs:
    nothing there, no model_index.json, another pipeline class, a weighted component without safetensors, or
    (decoder vs inpaint) the wrong UNet. Cheap: lists files, reads model_index.json (and unet/config.json),
    never weights. A hub id that the hub says does not exist is an error; a hub that cannot be reached is a
    warning (it cannot be told here)."""
    if is_sim(uri):
        return
    where = f"config key {key!r} is {uri!r}"
    kind = model_kind(uri)
    if kind == "hub":
        return _check_hub(where, uri, pipeline_class, revision)
    if kind == "local":
        root = _local_path(uri)
        if not os.path.isdir(root):
            raise ConfigError(f"{where}: no such folder here ({root}; a hub id is owner/name)")
        names = _local_names(root)
        problem = (_pulling(names, lambda: read_manifest(fsspec.filesystem("file"), root))
                   or _layout_problem(names, lambda rel: Path(root, rel).read_bytes(), pipeline_class)
                   or _safetensors_problem(root, names))
    else:
        try:
            fs, root = _fs(uri, storage_options)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"{where}: cannot be opened here ({e})") from e
        try:
            listing = with_retries(lambda: _remote_listing(fs, root), what=f"listing {uri}", attempts=3,
                                   base_delay=1.0)
        except Exception as e:
            raise ConfigError(f"{where}: cannot be listed ({type(e).__name__}: {e})") from e
        problem = (_pulling(set(listing), lambda: read_manifest(fs, root))
                   or _layout_problem(set(listing), lambda rel: fs.cat_file(f"{root.rstrip('/')}/{rel}"),
                                      pipeline_class))
    if problem:
        raise ConfigError(f"{where}: {problem}")


def _pulling(names: set[str], read: Callable[[], PullManifest | None]) -> str | None:
    """The pull writing the folder (or interrupted), when its manifest says one is: loading it could mix two
    versions of the model."""
    manifest = read() if PULL_MANIFEST in names else None
    if manifest is None or manifest.state == COMPLETE:
        return None
    return (f"{manifest.describe()} is writing this folder, or was interrupted; wait for it to finish, or run "
            f"it again to complete it")


def _check_hub(where: str, repo: str, pipeline_class: str, revision: str | None) -> None:
    from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache

    names = None
    if not constants.HF_HUB_OFFLINE:
        try:
            info = HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT)
            names = {s.rfilename for s in (info.siblings or [])}
        except Exception as e:
            kinds = {c.__name__ for c in type(e).__mro__}
            if "RepositoryNotFoundError" in kinds:  # also GatedRepoError
                raise ConfigError(f"{where}: the hub has no such model, or it is private or gated and this "
                                  f"machine's token cannot read it ({type(e).__name__})") from e
            if "RevisionNotFoundError" in kinds:
                raise ConfigError(f"{where}: the hub has no revision {revision!r} of it") from e
            log.warning("%s: the hub cannot be asked from here (%s: %s); the model is checked only when the "
                        "actors load it", where, type(e).__name__, e)
    if names is None:  # no hub: what the local cache knows
        cached = try_to_load_from_cache(repo, "model_index.json", revision=revision)
        if isinstance(cached, str):
            problem = _layout_problem({"model_index.json"}, lambda rel: Path(cached).read_bytes(), pipeline_class)
            if problem and "model_index.json names" in problem:
                raise ConfigError(f"{where}: {problem}")
        return

    def read(rel: str) -> bytes:
        return Path(hf_hub_download(repo, rel, revision=revision, etag_timeout=HUB_TIMEOUT)).read_bytes()

    try:
        problem = _layout_problem(names, read, pipeline_class)
    except Exception as e:  # reading model_index.json failed: the hub went away meanwhile
        log.warning("%s: could not read its model_index.json (%s); not checked", where, e)
        return
    if problem:
        raise ConfigError(f"{where}: {problem}")
