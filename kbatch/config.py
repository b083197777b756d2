"""Job configuration: typed dataclasses, YAML loading, ``--set`` overrides, validation.

Everything here runs before any model is loaded. Errors raise :class:`ConfigError`, whose message names
the key and shows the value (``kbatch`` maps it to exit code 2).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import yaml

DTYPES = ("float32", "float16", "bfloat16")
#: scheduler name -> diffusers class (kbatch/models/schedulers.py builds them); the config's allowed names
DECODER_SCHEDULERS = {
    "ddim": "DDIMScheduler",  # as shipped with kandinsky-2-1
    "ddpm": "DDPMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
}
PRIOR_SCHEDULERS = {"unclip": "UnCLIPScheduler"}
DEVICES = ("auto", "cuda", "cpu")
FORMATS = ("files", "webdataset", "parquet")
IMAGE_FORMATS = ("png", "jpeg", "webp")
MODES = ("text2img", "img2img", "inpaint", "interpolate")
DEFAULT_MODELS = {
    "prior": "kandinsky-community/kandinsky-2-1-prior",
    "decoder": "kandinsky-community/kandinsky-2-1",
    "inpaint": "kandinsky-community/kandinsky-2-1-inpaint",
}


class ConfigError(ValueError):
    """A configuration problem found before any model is loaded."""


SIM = "sim"  # models.*: simulated stage bodies (docs/clusters.md, simulated models), for capacity planning and scale tests


@dataclass
class SimConfig:
    """Speeds of the simulated models (``models.prior: sim`` etc.): seconds of (sleeping) work per image."""

    prior_seconds_per_image: float = 0.0
    decoder_seconds_per_image: float = 0.0
    load_seconds: float = 0.0  # stands in for a worker's model load, once per actor


@dataclass
class ModelsConfig:
    prior: str = DEFAULT_MODELS["prior"]
    decoder: str = DEFAULT_MODELS["decoder"]
    inpaint: str = DEFAULT_MODELS["inpaint"]
    dtype: str = "float16"
    scheduler: str = "ddim"  # decoder scheduler, see kbatch.models.schedulers
    prior_scheduler: str = "unclip"
    offload: bool = False  # accelerate model CPU offload, for GPUs too small to hold a stage
    # torch.compile the decoder UNet and MoVQ (once per UNet shape; calls padded to batch_size). auto: on with
    # CUDA when every shape has enough images per decoder replica to pay back its warm-up
    # (kbatch/models/compile_plan.py: the rule; _job.json compile: the decision)
    compile: bool | str = "auto"
    channels_last: bool = True
    revision: str | None = None
    cache_dir: str | None = None  # node-local copies of s3:// / gs:// model folders (None: KBATCH_MODEL_CACHE or
    #                               /var/tmp/kbatch-<user>/models: docs/models.md#node-local-cache)
    sim: SimConfig = field(default_factory=SimConfig)


@dataclass
class OutputConfig:
    path: str = "./out"
    format: str = "files"
    image_format: str = "png"
    quality: int = 95  # jpeg / webp
    # zlib level of PNGs, 0-9: pixels are equal at every level; 1 encodes rendered-like 512x512 images ~2x
    # faster than 6 for ~15% more bytes (bench/png.py, bench/RESULTS.md)
    png_compress_level: int = 1
    rows_per_shard: int = 256
    gallery: bool = True
    gallery_max_images: int = 200
    # seconds: the output lease is renewed every ttl/4; another run takes over a lease it watched unchanged
    # this long (tests and drills shorten it)
    lease_ttl: float = 120.0


AUTO = "auto"


@dataclass
class StageResources:
    replicas: int | str = 1  # a number, or "auto": as many as the cluster can place, now and as nodes join
    gpus: float = 1.0
    cpus: float | str = 0.5  # "auto": the node's CPUs less the io shares (CPU layout), else 0.5
    # images per forward pass (rows x num_images); "auto" (decoder only): 16, or 32 with compile on a card
    # known to hold it (kbatch/models/compile_plan.py)
    batch_size: int | str = 16
    threads: int = 0  # torch threads per lane on a CPU device; 0: round(cpus / concurrency), at least 1
    concurrency: int | str = 1  # batches one replica runs at once, in threads sharing its weights
    #                             (kbatch/models/lanes.py); "auto": the node's CPUs on a CPU cluster, else 1
    max_replicas: int = 0  # cap for replicas: auto (0: no cap)


@dataclass
class ResourcesConfig:
    # auto: the prior and the decoders share the GPUs by their speeds measured during the run (run/balance.py)
    prior: StageResources = field(default_factory=lambda: StageResources(AUTO, 1.0, 0.5, 16))
    decoder: StageResources = field(default_factory=lambda: StageResources(AUTO, 1.0, AUTO, AUTO, 0, AUTO))
    device: str = "auto"
    io_cpus: float = 0.25  # CPU share of each input-loading task and of each writer actor
    max_in_flight: int = 2  # batches queued per actor, keeps accelerators busy
    writers: int = 0  # long-lived actors that encode and write shards; 0: one per 4 decoder replicas
    # prior inside each decoder process: one model-loading process per replica. auto: on a cluster without
    # GPUs (where it is the faster layout: bench/RESULTS.md), not with GPUs
    colocate: bool | str = AUTO
    # bounds between stages (kbatch/run/bounds.py): the driver's memory and the object store's stay bounded
    plan_window: int = 4096  # manifest rows read, validated and sorted by batch key at once
    load_ahead: int = 2  # prior batches whose input images may be loaded ahead of the prior, per prior replica
    prior_ahead: int = 2  # decoder batches of embeddings that may wait for the decoders, per decoder replica
    pending_writes: int = 2  # shards queued per writer; beyond that, decoders pause
    placement_timeout: float = 600.0  # seconds a stage may have no replica placed before the run ends (exit 3)


def batch_of(s: StageResources) -> int:
    """``batch_size`` as a number: ``auto`` is 16 until a run decides it for its cluster
    (``kbatch.run.stage_setup`` with ``kbatch.models.compile_plan``)."""
    return 16 if s.batch_size == AUTO else int(s.batch_size)


def writer_count(r: ResourcesConfig, decoders: int) -> int:
    """``resources.writers``, with 0 = one writer per 4 decoder replicas (``decoders``: the number expected
    now). At ``output.png_compress_level: 1`` one writer encodes 38 (noise) to 42 (rendered-like) 512x512
    PNGs per second on one core, 250 smooth ones (bench/RESULTS.md, bench/png.py): 4 decoders at 8 img/s
    need 0.76-0.84 of its core (at level 6, 1.5 cores: the shard's encode threads then leaned on idle ones)."""
    return r.writers or max(1, -(-decoders // 4))


@dataclass
class Defaults:
    height: int = 512
    width: int = 512
    num_inference_steps: int = 50
    guidance_scale: float = 4.0
    prior_num_inference_steps: int = 25
    prior_guidance_scale: float = 4.0
    strength: float = 0.3
    num_images: int = 1
    negative_prompt: str | None = None


@dataclass
class LimitsConfig:
    max_pixels: int = 1024 * 1024  # height * width of an output image
    max_num_images: int = 16
    max_steps: int = 1000
    max_image_bytes: int = 32 * 2**20  # encoded init images / masks
    max_image_pixels: int = 4096 * 4096  # decoded init images / masks (decompression bombs)
    max_mix_items: int = 16
    max_prompt_chars: int = 2000  # prompt, negative_prompt, mix prompts (CLIP reads 77 tokens of them)
    # decoded input pixels (init image + mask + mix images) of one row, and of one loading batch: a 57 KiB PNG
    # can decode to 48 MiB. A row over its budget gets an error record; rows that would take a loading batch
    # over its budget are loaded by another task (never lost)
    max_row_pixels: int = 3 * 4096 * 4096
    max_batch_pixels: int = 8 * 4096 * 4096
    # Where manifest URIs may be read from. Empty roots: only under the manifest's own folder (a stage: decoder
    # job: only under the embeddings output it reads).
    allowed_roots: list[str] = field(default_factory=list)
    allowed_protocols: list[str] = field(default_factory=lambda: ["file", "local", "s3", "gs", "gcs", "memory"])


@dataclass
class RetriesConfig:
    max_attempts: int = 3  # tries of one row whose batch crashed its worker
    max_actor_restarts: int = 8
    max_failed_rows: int = 0  # tolerance for exit 0
    max_failed_fraction: float = 0.0


@dataclass
class FaultsConfig:
    """Fault injection for tests and drills. Off unless set."""

    crash_decoder_once_file: str | None = None  # decoder os._exit(1)s mid-batch if this file is absent
    crash_on_prompt: str | None = None  # decoder os._exit(1)s on every batch holding this prompt
    fail_write_shard: int | None = None  # writer raises after writing data of the Nth shard of a run
    crash_writer_once_file: str | None = None  # a writer os._exit(1)s mid-write if this file is absent
    fail_start: str | None = None  # "prior" | "decoder": that stage's actors raise while loading their models


@dataclass
class QualityConfig:
    """Quality scores (docs/quality.md): the CLIP score of every image, best-of-k candidates."""

    clip_score: bool = False  # each image's record gets clip_score (100 x CLIP cosine with its prompt)
    best_of: int = 1  # k candidates of every image, the best by clip_score kept (1..16; > 1 scores too)
    # toward a training set (docs/quality.md): the same CLIP image embedding, computed once per image
    image_embeddings: bool = False  # store each ok image's embedding (float16, img_emb/<shard>~<attempt>.npy)
    heads: dict = field(default_factory=dict)  # NAME: path of a score head over the normalized embedding
    gate: dict | None = None  # {head: NAME | clip_score, min: X}: candidates predicted below are not decoded

    @property
    def scores(self) -> bool:
        """Whether images get a clip_score: ``clip_score``, ``best_of > 1`` (which needs the scores), or a
        gate on clip_score (whose decoded images carry their final score)."""
        return self.clip_score or self.best_of > 1 or self.gate_head == "clip_score"

    @property
    def gate_head(self) -> str | None:
        """What the gate scores with: a head's name, ``clip_score``, or None (no gate)."""
        return None if not self.gate else str(self.gate.get("head"))

    @property
    def gate_min(self) -> float | None:
        return None if not self.gate else float(self.gate["min"])

    @property
    def embeds(self) -> bool:
        """Whether the decoder computes each image's CLIP image embedding (scores, stored embeddings, heads)."""
        return self.scores or self.image_embeddings or bool(self.heads)


@dataclass
class ScheduleConfig:
    """Many jobs on one cluster (docs/clusters.md): this job's place among the cluster's kbatch jobs."""

    priority: int = 0  # higher runs first; takes GPUs from lower-priority jobs at batch boundaries
    weight: float = 1.0  # share among running jobs of the same priority
    queue_timeout: float | None = None  # seconds it may wait queued behind other kbatch jobs (null: no limit)


@dataclass
class JobConfig:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    manifest: str | None = None
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    defaults: Defaults = field(default_factory=Defaults)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retries: RetriesConfig = field(default_factory=RetriesConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    stage: str = "all"  # all | prior (write embeddings) | decoder (manifest is an embeddings dataset)
    # fsspec options for manifest, inputs and output (endpoint_url, key, secret, ...). Never written to
    # _job.json or records, nor in a repr; credentials may also come from the environment (AWS_*, GOOGLE_*).
    storage_options: dict = field(default_factory=dict, repr=False)
    progress: str = "auto"  # auto | bar | log | off

    @property
    def colocated(self) -> bool:
        """The prior runs inside the decoder processes (``resources.colocate`` as resolved for the cluster by
        ``kbatch.run.layout``, a job with both stages)."""
        return self.resources.colocate is True and self.stage == "all"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def public_dict(self) -> dict:
        """``to_dict`` without secrets: storage option values are masked."""
        d = self.to_dict()
        d["storage_options"] = {k: "***" for k in d["storage_options"]}
        return d

    def resolved_output(self, now: _dt.datetime | None = None) -> str:
        """The output path with ``{date}`` / ``{datetime}`` filled in (nightly renders)."""
        now = now or _dt.datetime.now(_dt.timezone.utc)
        return self.output.path.format(date=now.strftime("%Y-%m-%d"), datetime=now.strftime("%Y%m%dT%H%M%S"))


# ---------------------------------------------------------------------------------------------------------
# building from dicts


def _build(cls, data: Any, path: str, default=None):
    """``cls`` from a mapping; keys not given keep ``default``'s values (the parent's default for this
    section: e.g. ``resources.decoder`` defaults differ from ``resources.prior``)."""
    default = default if default is not None else cls()
    if data is None:
        return copy.deepcopy(default)
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key '{path or '<root>'}' must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in known:
            raise ConfigError(f"unknown config key '{full}' (value {value!r}); known keys: {sorted(known)}")
        f = known[key]
        sub = _dataclass_type(cls, f)
        kwargs[key] = (_build(sub, value, full, getattr(default, key)) if sub is not None
                       else _coerce(f, value, full, cls))
    return dataclasses.replace(copy.deepcopy(default), **kwargs)


def _dataclass_type(cls, f):
    hints = {"ModelsConfig": ModelsConfig, "SimConfig": SimConfig, "OutputConfig": OutputConfig, "StageResources": StageResources,
             "ResourcesConfig": ResourcesConfig, "Defaults": Defaults, "LimitsConfig": LimitsConfig,
             "RetriesConfig": RetriesConfig, "FaultsConfig": FaultsConfig, "QualityConfig": QualityConfig,
             "ScheduleConfig": ScheduleConfig}
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    return hints.get(t)


def _coerce(f, value, path, cls):
    t = f.type if isinstance(f.type, str) else str(f.type)
    optional = "None" in t
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{path}' must not be null")
    base = t.replace(" | None", "").strip()
    if base.endswith(" | str"):  # a number/bool, or the word "auto"
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        base = base[: -len(" | str")]
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if isinstance(value, str) and base != "bool":
            raise ConfigError(f"config key '{path}' must be {base} or 'auto', got {value!r}")
    try:
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if math.isnan(v):
                raise ValueError
            return v
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if base == "str":
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if base == "dict":
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if base.startswith("list"):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if not isinstance(value, list):
                raise ValueError
            return [str(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{path}' must be {base}, got {value!r}") from None
    return value


def from_dict(data: Mapping | None) -> JobConfig:
    cfg = _build(JobConfig, dict(data or {}), "")
    validate_config(cfg)
    return cfg


def parse_set(items: list[str] | None) -> dict:
    """``["a.b=1", "c=x"]`` -> nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set key {key!r} is malformed")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set key {key!r} conflicts with another --set")
        node[parts[-1]] = value
    return out


def deep_merge(base: Mapping, over: Mapping) -> dict:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(path: str | None = None, *, sets: list[str] | None = None, manifest: str | None = None,
                output: str | None = None, overrides: Mapping | None = None) -> JobConfig:
    """Load YAML (local path or fsspec URL), apply ``overrides`` dict, ``--set`` items, manifest/output."""
    data: dict = {}
    if path:
        import fsspec

        try:
            with fsspec.open(path, "r") as fh:
                data = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path!r}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping, got {type(data).__name__}")
    if overrides:
        data = deep_merge(data, overrides)
    data = deep_merge(data, parse_set(sets))
    if manifest is not None:
        data["manifest"] = manifest
    if output is not None:
        data.setdefault("output", {})
        if not isinstance(data["output"], dict):
            raise ConfigError(f"config key 'output' must be a mapping, got {data['output']!r}")
        data["output"]["path"] = output
    return from_dict(data)


# ---------------------------------------------------------------------------------------------------------
# validation


def _check(cond: bool, key: str, value: Any, what: str):
    if not cond:
        raise ConfigError(f"config key '{key}' {what}, got {value!r}")


HEAD_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")  # score_<NAME> is a column name


def _check_quality_heads(q: QualityConfig) -> None:
    """quality.heads names and paths, and quality.gate's shape (the heads' weights: ``kbatch.models.heads``)."""
    for name, path in q.heads.items():
        _check(isinstance(name, str) and bool(HEAD_NAME_RE.match(name)) and name != "clip", f"quality.heads.{name}",
               name, "must be named with letters, digits and '_' (starting with a letter; the record column "
               "is score_<NAME>)")
        _check(isinstance(path, str) and bool(path.strip()), f"quality.heads.{name}", path,
               "must be the path of a head (safetensors or a torch state dict)")
    if q.gate is None:
        return
    _check(isinstance(q.gate, dict) and set(q.gate) == {"head", "min"}, "quality.gate", q.gate,
           "must be {head: NAME (a quality.heads name, or clip_score), min: NUMBER} or null")
    head = q.gate["head"]
    _check(head == "clip_score" or head in q.heads, "quality.gate.head", head,
           f"must be clip_score or one of quality.heads ({sorted(q.heads)})")
    m = q.gate["min"]
    _check(isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(float(m)), "quality.gate.min",
           m, "must be a finite number")


def check_storage(cfg: JobConfig) -> None:
    """Config error if this process cannot open the manifest's or the output's filesystem (unknown protocol,
    or e.g. gcsfs not installed). Run where the job's driver runs (plan, ``kbatch validate``), not in
    ``validate_config``: ``kbatch.submit`` resolves configs on a machine that may lack the cluster's packages."""
    from kbatch.storage import protocol_problem

    for key, uri in (("output.path", cfg.output.path), ("manifest", cfg.manifest)):
        problem = protocol_problem(uri) if uri else None
        _check(problem is None, key, uri, f"cannot be opened here ({problem})")


def validate_config(cfg: JobConfig) -> None:
    m = cfg.models
    _check(m.dtype in DTYPES, "models.dtype", m.dtype, f"must be one of {list(DTYPES)}")
    _check(m.compile in (True, False, AUTO), "models.compile", m.compile, "must be true, false or 'auto'")
    _check(m.scheduler in DECODER_SCHEDULERS, "models.scheduler", m.scheduler,
           f"must be one of {sorted(DECODER_SCHEDULERS)}")
    _check(m.prior_scheduler in PRIOR_SCHEDULERS, "models.prior_scheduler", m.prior_scheduler,
           f"must be one of {sorted(PRIOR_SCHEDULERS)}")
    for k in ("prior", "decoder", "inpaint"):
        _check(bool(getattr(m, k)), f"models.{k}", getattr(m, k), "must name a hub id or model folder")
    o = cfg.output
    _check(bool(o.path), "output.path", o.path, "must be set (config or --output)")
    try:
        cfg.resolved_output()
    except (KeyError, IndexError, ValueError):
        raise ConfigError(f"config key 'output.path' has an unknown template field, got {o.path!r} "
                          "(use {date} or {datetime})") from None
    _check(o.format in FORMATS, "output.format", o.format, f"must be one of {list(FORMATS)}")
    _check(o.image_format in IMAGE_FORMATS, "output.image_format", o.image_format,
           f"must be one of {list(IMAGE_FORMATS)}")
    _check(1 <= o.quality <= 100, "output.quality", o.quality, "must be in [1, 100]")
    _check(0 <= o.png_compress_level <= 9, "output.png_compress_level", o.png_compress_level, "must be in [0, 9]")
    _check(o.rows_per_shard >= 1, "output.rows_per_shard", o.rows_per_shard, "must be >= 1")
    _check(isinstance(o.lease_ttl, (int, float)) and not isinstance(o.lease_ttl, bool) and 0.5 <= o.lease_ttl
           <= 86400, "output.lease_ttl", o.lease_ttl, "must be seconds in [0.5, 86400]")
    r = cfg.resources
    _check(r.device in DEVICES, "resources.device", r.device, f"must be one of {list(DEVICES)}")
    for stage in ("prior", "decoder"):
        s: StageResources = getattr(r, stage)
        key = f"resources.{stage}"
        _check(s.replicas == AUTO or s.replicas >= 1, f"{key}.replicas", s.replicas, "must be >= 1 or 'auto'")
        _check(s.max_replicas >= 0, f"{key}.max_replicas", s.max_replicas, "must be >= 0 (0: no cap)")
        _check(s.batch_size >= 1 if s.batch_size != AUTO else stage == "decoder", f"{key}.batch_size",
               s.batch_size, "must be >= 1" + (" or 'auto'" if stage == "decoder" else ""))
        # one replica drives one device: a second whole GPU would idle (use more replicas instead)
        _check(0 <= s.gpus <= 1, f"{key}.gpus", s.gpus,
               "must be a share of one GPU in [0, 1] (a replica uses one device; for more GPUs use more "
               "replicas, or replicas: auto)")
        _check(s.cpus == AUTO or s.cpus >= 0, f"{key}.cpus", s.cpus, "must be >= 0 or 'auto'")
        _check(s.threads >= 0, f"{key}.threads", s.threads, "must be >= 0")
        _check(s.concurrency == AUTO or s.concurrency >= 1, f"{key}.concurrency", s.concurrency,
               "must be >= 1 or 'auto'")
        # lanes share modules: offload hooks move them between devices under the other lane's feet, and
        # torch.compile of a shared UNet from several threads is not tested (no GPU yet)
        _check(s.concurrency in (1, AUTO) or not m.offload, f"{key}.concurrency", s.concurrency,
               "must be 1 with models.offload (offload moves the shared modules between devices)")
        _check(s.concurrency in (1, AUTO) or m.compile is not True or stage == "prior", f"{key}.concurrency",
               s.concurrency, "must be 1 with models.compile (a compiled UNet shared by threads is untested)")
    _check(r.colocate in (True, False, AUTO), "resources.colocate", r.colocate, "must be true, false or 'auto'")
    _check(r.io_cpus > 0, "resources.io_cpus", r.io_cpus, "must be > 0")
    _check(r.max_in_flight >= 1, "resources.max_in_flight", r.max_in_flight, "must be >= 1")
    _check(r.writers >= 0, "resources.writers", r.writers, "must be >= 0 (0: one per 4 decoder replicas)")
    for k in ("plan_window", "load_ahead", "prior_ahead", "pending_writes"):
        _check(getattr(r, k) >= 1, f"resources.{k}", getattr(r, k), "must be >= 1")
    _check(r.placement_timeout > 0, "resources.placement_timeout", r.placement_timeout, "must be > 0 seconds")
    sim = m.sim
    for k in ("prior_seconds_per_image", "decoder_seconds_per_image", "load_seconds"):
        _check(getattr(sim, k) >= 0, f"models.sim.{k}", getattr(sim, k), "must be >= 0")
    # a simulated prior makes no torch generator state or real embeddings: a real decoder cannot use them
    _check(m.prior != SIM or m.decoder == SIM or cfg.stage == "prior", "models.prior", m.prior,
           "can be 'sim' only with models.decoder: sim (a real decoder needs real embeddings)")
    _check(m.inpaint != SIM or m.decoder == SIM, "models.inpaint", m.inpaint,
           "can be 'sim' only with models.decoder: sim (one decoder process runs both)")
    _check(cfg.stage in ("all", "prior", "decoder"), "stage", cfg.stage, "must be all | prior | decoder")
    _check(cfg.progress in ("auto", "bar", "log", "off"), "progress", cfg.progress, "must be auto|bar|log|off")
    _check(0 <= cfg.seed < 2**63, "seed", cfg.seed, "must be in [0, 2**63)")
    _check(cfg.faults.fail_start in (None, "prior", "decoder"), "faults.fail_start", cfg.faults.fail_start,
           "must be prior, decoder or null")
    q = cfg.quality
    _check(1 <= q.best_of <= 16, "quality.best_of", q.best_of, "must be in [1, 16] (candidates per image)")
    _check_quality_heads(q)
    sc = cfg.schedule
    _check(-1000 <= sc.priority <= 1000, "schedule.priority", sc.priority, "must be an integer in [-1000, 1000]")
    _check(0 < sc.weight <= 1000, "schedule.weight", sc.weight, "must be > 0 and <= 1000")
    _check(sc.queue_timeout is None or sc.queue_timeout > 0, "schedule.queue_timeout", sc.queue_timeout,
           "must be > 0 seconds or null (no limit)")
    rt = cfg.retries
    _check(rt.max_attempts >= 1, "retries.max_attempts", rt.max_attempts, "must be >= 1")
    _check(rt.max_actor_restarts >= 0, "retries.max_actor_restarts", rt.max_actor_restarts, "must be >= 0")
    _check(rt.max_failed_rows >= 0, "retries.max_failed_rows", rt.max_failed_rows, "must be >= 0")
    _check(0 <= rt.max_failed_fraction <= 1, "retries.max_failed_fraction", rt.max_failed_fraction,
           "must be in [0, 1]")
    lim = cfg.limits
    for k in ("max_pixels", "max_num_images", "max_steps", "max_image_bytes", "max_image_pixels", "max_mix_items",
              "max_prompt_chars", "max_row_pixels", "max_batch_pixels"):
        _check(getattr(lim, k) >= 1, f"limits.{k}", getattr(lim, k), "must be >= 1")
    _check(lim.max_batch_pixels >= lim.max_row_pixels, "limits.max_batch_pixels", lim.max_batch_pixels,
           f"must be >= limits.max_row_pixels ({lim.max_row_pixels}): a row must fit a loading batch alone")
    # the job defaults are checked with the same rules as manifest rows
    from kbatch.schema.params import check_params

    problems = check_params(dataclasses.asdict(cfg.defaults), cfg.limits)
    if problems:
        field_, value, what = problems[0]
        raise ConfigError(f"config key 'defaults.{field_}' {what}, got {value!r}")
