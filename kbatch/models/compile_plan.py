"""Whether a job's decoders compile their UNet (``models.compile``), at what batch, and which compiled jobs
are refused. Pure functions of numbers the planner and the cluster know: no torch, no model.

**The rule for ``models.compile: auto``.** A replica compiles each UNet shape (``Row.unet_shape()``: which
UNet, the size, guidance on/off) once, in its warm-up, for ``W`` seconds; after that each image of the shape
costs ``1/c`` seconds instead of ``1/e`` (compiled and eager images/s). Compiling pays back when the replica
renders at least

    N = W / (1/e - 1/c) = W * e * c / (c - e)

images of *each* shape. Measured on one H200 (full-size Kandinsky 2.1, fp16, 512x512, 50 decoder steps,
shared NOTES): e = 2.69 img/s (eager, 16 per call), c = 4.44 (compiled, 32 per call), W = 52-87 s per shape;
with the slowest compile (87 s) N = 594 images. Conservative on other cards and sizes: a slower card or a
larger image saves more seconds per image for about the same compile time, so it pays back sooner (and a
warm inductor cache makes W smaller still). So ``auto`` compiles when CUDA is there and every shape of the
job has at least ``N`` images per decoder replica; off on CPU always, and off (with the reason) where a
compiled run would recompile mid-run (below), or where the replicas' device is not known yet.

**Refusals** (``models.compile: true``; ``auto`` just stays off). A compiled UNet (static shapes) compiles
one graph per (shape, batch) it sees. Every decoder call is padded to ``resources.decoder.batch_size``, so a
shape is one graph, unless a row has more images than the batch (a larger call: a new graph mid-run); and
dynamo keeps at most ``recompile_limit`` graphs per function (torch's default 8), so a job with more shapes
than that runs the rest eagerly after silently giving up. Both are refused before the job starts (exit 2).

**Batch.** ``resources.decoder.batch_size: auto`` is 16, or 32 with compile on a card known to hold it
(>= 40 GiB: 32 per call is the fastest measured setting, 4.44 against 4.18 img/s at 16) when no shape is
larger than 512x512; an explicit number always wins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from kbatch.config import AUTO, ConfigError

EAGER_IMG_S = 2.69  # H200, diffusers, 16 per call (NOTES)
COMPILED_IMG_S = 4.44  # H200, torch.compile(unet) + channels_last, 32 per call (NOTES)
COMPILE_SECONDS = 87.0  # per UNet shape: the slowest measured (52-87 s)
DEFAULT_BATCH = 16
COMPILED_BATCH = 32
BIG_CARD_GIB = 40.0  # cards that hold 32 x 512x512 per call (the H200 does; 24 GiB cards are not assumed to)
DYNAMO_RECOMPILE_LIMIT = 8  # torch's default (torch._dynamo.config.recompile_limit), if torch is not at hand

#: GPU memory (GiB, the smallest model of each) by Ray's ``accelerator_type`` name (the resource
#: ``accelerator_type:<name>`` Ray puts on a node with that GPU). Unknown names: not assumed to hold 32.
CARD_GIB = {"V100": 16, "P100": 16, "T4": 16, "P4": 8, "K80": 12, "A10G": 24, "A10": 24, "L4": 24,
            "L40S": 48, "L40": 48, "A40": 48, "A100": 40, "A100-40G": 40, "A100-80G": 80, "H100": 80,
            "H200": 141, "H20": 96, "B200": 180, "B300": 270, "GB200": 186, "GB300": 279, "RTX-PRO-6000": 96}


class ShapeImages(dict):
    """{``Row.unet_shape()``: images the job asks of it}, and ``max_num_images``: the most images one row renders
    in one decoder call (``num_images`` x ``quality.best_of``; ``kbatch.run.runner.job_shapes`` fills it)."""

    max_num_images: int = 0

    def add(self, shape: tuple, images: int, num_images: int):
        self[shape] = self.get(shape, 0) + images
        self.max_num_images = max(self.max_num_images, num_images)

    def scaled(self, fraction: float) -> "ShapeImages":
        """The images left when only ``fraction`` of the manifest's rows still render (a resumed job):
        assumed spread over the shapes like the whole manifest."""
        out = ShapeImages({s: n * fraction for s, n in self.items()})
        out.max_num_images = self.max_num_images
        return out


def break_even_images(compile_s: float = COMPILE_SECONDS, eager: float = EAGER_IMG_S,
                      compiled: float = COMPILED_IMG_S) -> int:
    """Images of one shape a replica must render for its compile to pay back (see the module doc)."""
    return math.ceil(compile_s / (1.0 / eager - 1.0 / compiled))


RULE = ("compile when CUDA is there and every UNet shape has >= N images per decoder replica, "
        "N = compile_s / (1/eager_img_s - 1/compiled_img_s)")


def dynamo_recompile_limit() -> int:
    """dynamo's graph limit per function in this process's torch (imported for it: the job compiles anyway),
    else torch's default."""
    try:
        import torch._dynamo.config as dc

        return int(getattr(dc, "recompile_limit", getattr(dc, "cache_size_limit", DYNAMO_RECOMPILE_LIMIT)))
    except Exception:  # noqa: BLE001 - no torch on the driver: the default
        return DYNAMO_RECOMPILE_LIMIT


def recompile_problem(shapes, max_num_images: int, batch: int, limit: int) -> str | None:
    """Why a compiled decoder would recompile mid-run (a ``ConfigError`` message), or None.
    ``shapes``: the job's ``Row.unet_shape()`` set; ``max_num_images``: the most images one row asks;
    ``batch``: the decoder batch every call is padded to; ``limit``: dynamo's recompile limit."""
    shapes = sorted(shapes)
    if len(shapes) > limit:
        return (f"config key 'models.compile' is true but the job has {len(shapes)} UNet shapes (mode, size, "
                f"guidance on/off: {_show(shapes)}), more than torch dynamo's recompile limit {limit}: the "
                "shapes past it would run eagerly after a silent give-up; split the job by size, or set "
                "models.compile: false (or auto)")
    if max_num_images > batch:
        return (f"config key 'models.compile' is true but a row renders num_images {max_num_images} in one call "
                f"(num_images x quality.best_of), more than "
                f"resources.decoder.batch_size {batch}: its call would be larger than the compiled batch and "
                "recompile mid-run; raise resources.decoder.batch_size to at least "
                f"{max_num_images}, or set models.compile: false (or auto)")
    return None


def _show(shapes) -> str:
    text = ", ".join(f"{u} {h}x{w}{' cfg' if g else ''}" for u, h, w, g in shapes[:6])
    return text + (f" and {len(shapes) - 6} more" if len(shapes) > 6 else "")


def planned_batch(batch_setting) -> int:
    """The batch a plan-time check can count on: the number set, or the ``auto`` batch every card gets."""
    return DEFAULT_BATCH if batch_setting == AUTO else int(batch_setting)


def check_before_start(compile_setting, device: str, shape_images: dict, max_num_images: int,
                       batch_setting, limit: int | None = None) -> None:
    """Plan time, before Ray or any model: ``models.compile: true`` on a job that would recompile mid-run is a
    ``ConfigError`` (exit 2). ``device: cpu`` never compiles: nothing to refuse."""
    if compile_setting is not True or device == "cpu" or not shape_images:
        return
    problem = recompile_problem(shape_images, max_num_images, planned_batch(batch_setting),
                                dynamo_recompile_limit() if limit is None else limit)
    if problem:
        raise ConfigError(problem)


def card_gib(nodes: list[dict]) -> float | None:
    """The smallest known GPU memory among the alive GPU nodes, from Ray's ``accelerator_type:<name>``
    resources; None when a GPU node's type is missing or not in ``CARD_GIB``."""
    sizes = []
    for n in nodes:
        res = n.get("Resources", {})
        if not res.get("GPU"):
            continue
        types = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
        known = [CARD_GIB[t] for t in types if t in CARD_GIB]
        if not known:
            return None
        sizes.append(min(known))
    return min(sizes) if sizes else None


@dataclass
class CompileDecision:
    """What a run decided about compile and the decoder batch, kept in ``_job.json`` (``compile``)."""

    setting: object  # models.compile as configured: true | false | auto
    on: bool
    reason: str
    batch: int  # resources.decoder.batch_size for the run
    batch_reason: str
    rule: str = RULE
    inputs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"setting": self.setting, "on": self.on, "reason": self.reason, "batch": self.batch,
                "batch_reason": self.batch_reason, "rule": self.rule, "inputs": self.inputs}


def decide(setting, *, cuda: bool | None, shape_images: dict, max_num_images: int, replicas: int,
           batch_setting, card: float | None, lanes: int = 1, limit: int | None = None) -> CompileDecision:
    """``models.compile`` and ``resources.decoder.batch_size`` for a run, from what the cluster and the plan
    know. ``cuda``: the decoders run on CUDA (True), not (False), not known yet (None: no GPU node alive);
    ``shape_images``: images to render per ``Row.unet_shape()``; ``replicas``: decoder replicas expected
    (at least 1); ``card``: GPU memory in GiB when known; ``lanes``: the decoder's concurrency."""
    replicas = max(1, int(replicas))
    need = break_even_images()
    per_replica = {s: n / replicas for s, n in shape_images.items()}
    fewest = min(per_replica.values()) if per_replica else 0.0
    inputs = {"eager_img_s": EAGER_IMG_S, "compiled_img_s": COMPILED_IMG_S, "compile_s": COMPILE_SECONDS,
              "break_even_images": need, "decoder_replicas": replicas,
              "images_per_shape": {_key(s): n for s, n in sorted(shape_images.items())},
              "fewest_images_per_replica": round(fewest, 1), "max_num_images": max_num_images,
              "card_gib": card}
    lim = None
    if setting is True:  # checked at plan time (check_before_start); each worker compiles only on CUDA
        on = cuda is not False
        reason = ("models.compile: true" if cuda else
                  "models.compile: true, but the decoders do not run on CUDA: not compiled" if cuda is False else
                  "models.compile: true; no GPU node alive yet: each decoder compiles when it gets CUDA")
    elif setting is False:
        on, reason = False, "models.compile: false"
    elif not cuda:
        on, reason = False, ("auto: off without CUDA (CPU: compiling costs more than it saves)" if cuda is False
                             else "auto: off, no GPU node alive when the run started (device not known: "
                                  "the conservative choice)")
    elif not shape_images:
        on, reason = False, "auto: off, nothing to render"
    elif lanes != 1:
        on, reason = False, (f"auto: off with resources.decoder.concurrency {lanes} (a compiled UNet shared by "
                             "threads is untested)")
    else:
        lim = dynamo_recompile_limit() if limit is None else limit
        problem = recompile_problem(shape_images, max_num_images, _batch(batch_setting, True, card, shape_images),
                                    lim)
        if problem:
            on, reason = False, "auto: off, a compiled run would recompile mid-run: " + problem.split(" but ", 1)[-1]
        elif fewest < need:
            on, reason = False, (f"auto: off, the smallest shape has {fewest:.0f} images per replica, fewer than "
                                 f"the {need} that pay back a compile")
        else:
            on, reason = True, (f"auto: on, every shape has >= {fewest:.0f} images per replica (>= {need} pay "
                                "back a compile)")
    if lim is not None:
        inputs["recompile_limit"] = lim
    batch = _batch(batch_setting, on, card, shape_images)
    if batch_setting != AUTO:
        batch_reason = "resources.decoder.batch_size set"
    elif batch == COMPILED_BATCH:
        batch_reason = f"auto: {COMPILED_BATCH} with compile on a card of {card:g} GiB (>= {BIG_CARD_GIB:g})"
    elif not on:
        batch_reason = f"auto: {DEFAULT_BATCH} (compile off)"
    else:
        batch_reason = (f"auto: {DEFAULT_BATCH}: card memory " + (f"{card:g} GiB" if card else "not known")
                        + f" (32 needs >= {BIG_CARD_GIB:g}), or a shape larger than 512x512")
    return CompileDecision(setting, on, reason, batch, batch_reason, inputs=inputs)


def _batch(batch_setting, on: bool, card: float | None, shape_images) -> int:
    if batch_setting != AUTO:
        return int(batch_setting)
    small = all(h * w <= 512 * 512 for _, h, w, _ in shape_images)
    return COMPILED_BATCH if on and card is not None and card >= BIG_CARD_GIB and small else DEFAULT_BATCH


def _key(shape) -> str:
    unet, h, w, guided = shape
    return f"{unet} {h}x{w}{' cfg' if guided else ''}"


def warmup_summary(per_replica: list[dict]) -> dict:
    """The measured warm-up for ``_job.json`` (``compile.warmup``): from each decoder replica's first batch, the
    seconds of each shape's first (compiling) call; per shape the slowest and the mean over the replicas."""
    shapes: dict[str, list[float]] = {}
    for d in per_replica:
        for shape, seconds in (d or {}).items():
            shapes.setdefault(shape, []).append(float(seconds))
    return {"replicas": len(per_replica),
            "seconds_per_shape": {s: {"max": round(max(v), 3), "mean": round(sum(v) / len(v), 3)}
                                  for s, v in sorted(shapes.items())}}
