"""GPU benchmark: plain diffusers (1, 16, and compiled 32 prompts per call) vs `kbatch run` on one card.

Reference workload: text2img 512x512, prior 25 + decoder 50 steps, guidance 4, float16. The models are the
full-size Kandinsky 2.1 architectures with random weights, built from ``bench/kandinsky21_configs.json``
(compute does not depend on weight values) and written as diffusers model folders (safetensors); the
tokenizers are kbatch's tiny offline ones (token ids stay below the full vocab sizes).

Measured, in this order, on the same card (``--skip`` leaves parts out):
  1. ``x1``: diffusers, one prompt per call   (prior call + decoder call per row)
  2. ``x16``: diffusers, 16 prompts per call  (same, 16 rows per call)
  3. ``unet``: the UNet alone, ``steps`` forward passes at CFG batch 2x16 (the decoder's floor)
  4. ``x32c``: diffusers with ``torch.compile`` of the UNet + channels_last, 32 prompts per call (the best
     plain-diffusers setting measured on an H200: 4.44 img/s); its first call (the compile) reported apart
  5. ``kbatch run`` as a subprocess, one per ``--kbatch NAME`` (default ``default``: a config without a
     ``resources:`` section, what a user gets; other layouts in ``KBATCH_VARIANTS``).
Every diffusers variant is timed after an untimed first call of the same size (its first-call seconds are
reported); kbatch is reported three ways: the whole command as a user waits for it (Python, Ray start,
actor start, model load, compile warm-up, render, writes, shutdown), the **steady** rate after its first
image (``_job.json``: images after the first decoder batch / loop seconds after it), and the first image's
time (from the driver loop's start: actor start, model load, compile warm-up). Layouts that compile run at
least 512 rows (``default`` 1024: ``models.compile: auto`` compiles from 594 images per replica and shape),
so the warm-up does not hide in the steady rate.
Outputs are checked: a sample of every variant's images must not be constant (a NaN from fp16 overflow
becomes a constant image: NaN cannot survive the uint8 conversion) nor identical to one another; a failed
check marks the variant FAILED and the exit code 1.
UNet FLOPs: one forward at CFG batch 2 counted with ``torch.utils.flop_counter.FlopCounterMode`` on the
device, times the steps = UNet FLOPs per image; "UNet TFLOP/s" of a variant = FLOPs per image x its img/s
(end to end: prior, MoVQ, PNG, scheduling all count against it), and for the UNet-alone loop its own rate.
GPU memory: ``torch.cuda.max_memory_allocated`` around each diffusers pipeline call (this process, both
pipelines resident); for kbatch, what its workers report in ``_job.json`` (``result.memory``: each actor's
own peak allocated), and the device-wide peak used (``torch.cuda.mem_get_info`` polled by this process,
which holds a small CUDA context of its own then).

    python bench/gpu.py --out $OUT               # everything (~12 min on an H200; see bench/README.md)
    python bench/gpu.py --out $OUT --skip x1 --skip x16 --skip unet --skip x32c   # kbatch default only
    python bench/gpu.py --out $OUT --kbatch base --kbatch compile32   # other layouts
    python bench/gpu.py --tiny                   # CPU smoke run: tiny models, 64x64, few steps and rows
    python bench/gpu.py --mini                   # CPU test of the full-size builder with shrunk widths
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

# the published component configs of the three kandinsky-community repos, shipped beside this script
CONFIGS_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kandinsky21_configs.json")
T0 = time.perf_counter()


def log(msg: str):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# `kbatch run` layouts measured after the diffusers baselines (--kbatch NAME, repeatable, in the order given):
# extra `--set`s, and whether the decoder takes the whole card (colocated: no separate prior actor)
KBATCH_VARIANTS: dict[str, dict] = {
    # a config without `resources:` (only the device): the layout, models.compile: auto and the decoder batch
    # are kbatch's own choices for this card; 1024 rows, so that compile: auto pays back and turns on
    "default": {"sets": [], "resources": False, "rows": 1024},
    "base": {"sets": []},                                               # prior 0.2 + decoder 0.8 of the card
    "colocated": {"sets": ["resources.colocate=true"], "decoder_gpus": 1.0},  # one process, one CUDA context
    "lanes": {"sets": ["resources.decoder.concurrency=2"]},             # 2 batches at once, one copy of weights
    "compile": {"sets": ["models.compile=true"], "rows": 512},          # compiled UNet, warm-up per shape
    # compiled UNet at 32 images per pass: the best plain-diffusers setting measured on an H200 while planning
    # kbatch (4.44 img/s)
    "compile32": {"sets": ["models.compile=true"], "batch": 32, "rows": 512},
}
SKIPPABLE = ["x1", "x16", "unet", "x32c", "kbatch"]
COMPILED_PER_CALL = 32  # the compiled diffusers anchor's prompts per call


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models from `kbatch models tiny`, 64x64, CPU-sized")
    p.add_argument("--mini", action="store_true", help="the full-size builder with shrunk widths (CPU test)")
    p.add_argument("--configs", default=CONFIGS_JSON, help="full-size component configs (JSON)")
    p.add_argument("--models", default=None, help="model folder cache (default: /tmp/kbatch-gpu-models[-mini] "
                                                  "or /tmp/kbatch-bench-models for --tiny)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--x1-rows", type=int, default=None, help="rows for diffusers, one prompt per call")
    p.add_argument("--x16-rows", type=int, default=None, help="rows for diffusers, 16 prompts per call")
    p.add_argument("--x32c-rows", type=int, default=None,
                   help="rows for compiled diffusers, 32 prompts per call (a multiple of 32: one compiled shape)")
    p.add_argument("--rows", type=int, default=None,
                   help="kbatch manifest rows (default: the layout's own: 1024 for default, 512 for compile "
                        "layouts, 256 for the others; 32 with --tiny/--mini)")
    p.add_argument("--per-call", type=int, default=16, help="prompts per call of the batched diffusers variant")
    p.add_argument("--prior-gpus", type=float, default=0.2)
    p.add_argument("--decoder-gpus", type=float, default=0.8)
    p.add_argument("--kbatch-batch", type=int, default=16, help="kbatch decoder batch_size (images per pass)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `kbatch run --set` (e.g. models.compile=true)")
    p.add_argument("--kbatch", dest="kbatch_variants", action="append", choices=sorted(KBATCH_VARIANTS),
                   default=None, help="kbatch layouts to run, in order (repeatable; default: default). Results "
                                      "are written to --out after each, so a run cut short keeps what it measured")
    p.add_argument("--skip", action="append", default=[], choices=SKIPPABLE)
    p.add_argument("--no-png", action="store_true", help="diffusers variants: don't write PNGs")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for results.md / results.json")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    small = args.tiny or args.mini
    args.x1_rows = args.x1_rows or (4 if small else 8)
    args.x16_rows = args.x16_rows or (2 * args.per_call if small else 4 * args.per_call)
    args.x32c_rows = args.x32c_rows or (2 if small else 4) * COMPILED_PER_CALL
    if args.x32c_rows % COMPILED_PER_CALL:
        p.error(f"--x32c-rows must be a multiple of {COMPILED_PER_CALL} (every compiled call the same shape)")
    args.small = small
    args.kbatch_variants = args.kbatch_variants or ["default"]
    return args


def variant_rows(args, name: str) -> int:
    """Manifest rows of a kbatch layout: ``--rows``, else the layout's own (compile layouts: 512 or more)."""
    if args.rows:
        return args.rows
    return 32 if args.small else KBATCH_VARIANTS[name].get("rows", 256)


# ------------------------------------------------------------------------------------------ model build


def _cfg(cfgs: dict, prefix: str) -> dict:
    for k, v in cfgs.items():
        if k.startswith(prefix):
            return dict(v)
    raise KeyError(f"{prefix!r} not in the configs JSON (keys: {sorted(cfgs)})")


def _shrink(c: dict) -> dict:
    """--mini: the full configs with small widths/depths, keeping every block type and the wiring."""
    d = 32  # image-embedding width (prior embedding_dim = CLIP projection = UNet cross_attention_dim)
    c["unet"].update(block_out_channels=[64, 128, 192, 256], layers_per_block=1, cross_attention_dim=d,
                     encoder_hid_dim=64, sample_size=8)
    c["movq"].update(block_out_channels=[32, 32, 32, 64], layers_per_block=1, num_vq_embeddings=64)
    c["mclip"].update(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                      transformerDimSize=64, imageDimSize=d)
    c["prior"].update(num_attention_heads=2, attention_head_dim=16, num_layers=1, embedding_dim=d)
    c["clip_text"].update(hidden_size=d, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          projection_dim=d)
    c["clip_vision"].update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            projection_dim=d)
    return c


def build_models(root: str, configs_path: str, device: str, mini: bool = False) -> dict:
    """Full-size random-weight prior/ and decoder/ folders (float16 safetensors; float32 with --mini).
    Reused when ``root/.complete`` says they were built from the same configs."""
    import torch
    from diffusers import (DDIMScheduler, KandinskyPipeline, KandinskyPriorPipeline, PriorTransformer,
                           UnCLIPScheduler, UNet2DConditionModel, VQModel)
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from kbatch.models.tiny import _build_clip_tokenizer, _build_xlmr_tokenizer, _fix_model_index

    with open(configs_path) as fh:
        cfgs = json.load(fh)
    c = {"unet": _cfg(cfgs, "decoder/unet"), "movq": _cfg(cfgs, "decoder/movq"),
         "mclip": _cfg(cfgs, "decoder/text_encoder"), "ddim": _cfg(cfgs, "decoder/scheduler"),
         "prior": _cfg(cfgs, "prior/prior"), "clip_text": _cfg(cfgs, "prior/text_encoder"),
         "clip_vision": _cfg(cfgs, "prior/image_encoder"), "unclip": _cfg(cfgs, "prior/scheduler"),
         "processor": _cfg(cfgs, "prior/image_processor")}
    if mini:
        c = _shrink(c)
    stamp = json.dumps(c, sort_keys=True)
    paths = {"prior": os.path.join(root, "prior"), "decoder": os.path.join(root, "decoder")}
    paths["inpaint"] = paths["decoder"]  # not used by text2img; kbatch needs a value
    marker = os.path.join(root, ".complete")
    if os.path.exists(marker) and open(marker).read() == stamp:
        log(f"models: reusing {root}")
        return paths
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    dtype = torch.float32 if mini else torch.float16
    clip_tok, xlmr_tok = _build_clip_tokenizer(), _build_xlmr_tokenizer()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):  # random init on the GPU: seconds instead of minutes on CPU
        unet = UNet2DConditionModel.from_config(c["unet"]).eval()
        movq = VQModel.from_config(c["movq"]).eval()
        mclip = MultilingualCLIP(MCLIPConfig(**c["mclip"])).eval()
        prior = PriorTransformer.from_config(c["prior"]).eval()
        clip_text = CLIPTextModelWithProjection(CLIPTextConfig(**c["clip_text"])).eval()
        clip_vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**c["clip_vision"])).eval()
        with torch.no_grad():  # as trained models: non-zero std, else every image embedding is the mean
            prior.clip_std.fill_(1.0)
            prior.clip_mean.normal_(0, 0.1)
    n_params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in
                dict(unet=unet, movq=movq, mclip=mclip, prior=prior, clip_text=clip_text,
                     clip_vision=clip_vision).items()}
    log("models: built in %.1fs, parameters (M): %s" % (
        time.perf_counter() - t0, ", ".join(f"{k} {v:.1f}" for k, v in n_params.items())))
    proc = c["processor"]
    image_processor = CLIPImageProcessor(
        crop_size=proc.get("crop_size", 224), do_center_crop=proc.get("do_center_crop", True),
        do_normalize=proc.get("do_normalize", True), do_resize=proc.get("do_resize", True),
        image_mean=proc.get("image_mean"), image_std=proc.get("image_std"), resample=proc.get("resample", 3),
        size=proc.get("size", 224))
    t0 = time.perf_counter()
    prior_pipe = KandinskyPriorPipeline(prior=prior.to(dtype), image_encoder=clip_vision.to(dtype),
                                        text_encoder=clip_text.to(dtype), tokenizer=clip_tok,
                                        scheduler=UnCLIPScheduler.from_config(c["unclip"]),
                                        image_processor=image_processor)
    prior_pipe.save_pretrained(paths["prior"], safe_serialization=True)
    _fix_model_index(Path(paths["prior"]))
    del prior_pipe, prior, clip_vision, clip_text
    dec_pipe = KandinskyPipeline(text_encoder=mclip.to(dtype), tokenizer=xlmr_tok, unet=unet.to(dtype),
                                 scheduler=DDIMScheduler.from_config(c["ddim"]), movq=movq.to(dtype))
    dec_pipe.save_pretrained(paths["decoder"], safe_serialization=True)
    del dec_pipe, unet, movq, mclip
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    log(f"models: saved {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f}s under {root}")
    with open(marker, "w") as fh:
        fh.write(stamp)
    return paths


# ------------------------------------------------------------------------------------------ measuring


def unet_inputs(unet, batch: int, height: int, width: int, movq_scale: int, device, dtype):
    import torch

    cfg = unet.config
    lat = torch.randn(batch, cfg.in_channels, height // movq_scale, width // movq_scale, device=device, dtype=dtype)
    ehs = torch.randn(batch, 77, cfg.encoder_hid_dim, device=device, dtype=dtype)
    txt = torch.randn(batch, cfg.cross_attention_dim, device=device, dtype=dtype)
    img = torch.randn(batch, cfg.cross_attention_dim, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    return dict(sample=lat, timestep=t, encoder_hidden_states=ehs,
                added_cond_kwargs={"text_embeds": txt, "image_embeds": img}, return_dict=False)


def unet_flops_per_image(decoder, wl: C.Workload) -> float:
    """FLOPs of the UNet for one image: one forward at CFG batch 2 (counted on the device) x steps."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    kw = unet_inputs(decoder.unet, 2, wl.height, wl.width, decoder.movq_scale_factor, decoder.device,
                     decoder.unet.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        decoder.unet(**kw)
    return float(fc.get_total_flops()) * wl.steps


def unet_alone(decoder, wl: C.Workload, per_call: int) -> float:
    """Seconds per image of ``steps`` UNet forwards at CFG batch 2 x per_call (after one warm-up forward)."""
    import torch

    kw = unet_inputs(decoder.unet, 2 * per_call, wl.height, wl.width, decoder.movq_scale_factor, decoder.device,
                     decoder.unet.dtype)
    sync = torch.cuda.synchronize if decoder.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        decoder.unet(**kw)
        sync()
        t0 = time.perf_counter()
        for _ in range(wl.steps):
            decoder.unet(**kw)
        sync()
    return (time.perf_counter() - t0) / per_call


class GpuMemPoller(C.Poller):
    """Device-wide used memory (total - free), polled every 0.5 s from this process."""

    def __init__(self):
        import torch

        super().__init__(0.5)
        self.torch, self.peak = torch, 0

    def _sample(self):
        free, total = self.torch.cuda.mem_get_info()
        self.peak = max(self.peak, total - free)


def card() -> str:
    import torch

    if not torch.cuda.is_available():
        return C.machine()
    name = torch.cuda.get_device_name(0)
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        drv = "?"
    return f"{name} (driver, memory: {drv}; CUDA {torch.version.cuda}); {C.machine()}"


def main(argv=None) -> int:
    args = parse_args(argv)
    C.quiet_libs()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    small = args.tiny or args.mini
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    work = args.workdir or tempfile.mkdtemp(prefix="kbatch-gpu-")
    os.makedirs(work, exist_ok=True)
    if args.tiny:
        import kbatch.models.tiny as tm

        models = tm.write_tiny_models(args.models or "/tmp/kbatch-bench-models")
    else:
        root = args.models or ("/tmp/kbatch-gpu-models-mini" if args.mini else "/tmp/kbatch-gpu-models")
        models = build_models(root, args.configs, device, mini=args.mini)
    wl = (C.Workload(rows=args.rows or 0, height=64, width=64, steps=10, prior_steps=5) if small else
          C.Workload(rows=args.rows or 0, height=512, width=512, steps=50, prior_steps=25))
    dtype_name = "float16" if device == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    log(f"card: {card()}")
    log(f"versions: {C.versions()}")
    log(f"workload: text2img {wl.height}x{wl.width}, prior {wl.prior_steps} + decoder {wl.steps} steps, guidance "
        f"{wl.guidance}, {dtype_name}; models {models['decoder']}")
    results: list[dict] = []
    kbatch_rows = max((variant_rows(args, v) for v in args.kbatch_variants), default=0)
    texts_all = C.prompts(max(args.x1_rows, args.x16_rows, args.x32c_rows, kbatch_rows) + COMPILED_PER_CALL)
    seeds_all = C.row_seeds([{"id": f"row-{i:06d}"} for i in range(len(texts_all))], wl.seed)

    def report():
        write_report(args, report_lines(args, results, wl, flops_img, dtype_name), results, flops_img, work)

    flops_img = None
    need_pipes = not {"x1", "x16", "unet", "x32c"} <= set(args.skip)
    if need_pipes:
        t0 = time.perf_counter()
        prior, decoder = C.load_pipelines(models, device, dtype)
        log(f"diffusers: pipelines loaded in {time.perf_counter() - t0:.1f}s")
        flops_img = unet_flops_per_image(decoder, wl)
        log(f"UNet: {flops_img / wl.steps / 1e12:.3f} TFLOP per CFG step (batch 2), {flops_img / 1e12:.2f} TFLOP "
            f"per image ({wl.steps} steps)")

        def diffusers_variant(name: str, label: str, per_call: int, n: int, note: str = ""):
            out = None if args.no_png else os.path.join(work, f"diffusers-{name}")
            if out:
                os.makedirs(out, exist_ok=True)
            t0 = time.perf_counter()  # first call, untimed in the rate: warm-up (and the compile, if any)
            C.diffusers_batches(prior, decoder, texts_all[-per_call:], seeds_all[-per_call:], wl, per_call, None)
            first = time.perf_counter() - t0
            stats: dict = {}
            t0 = time.perf_counter()
            n_img = C.diffusers_batches(prior, decoder, texts_all[:n], seeds_all[:n], wl, per_call, out, stats)
            sec = time.perf_counter() - t0
            check = check_images(stats.pop("sample", []))
            results.append({"variant": label, "images": n_img, "seconds": sec, "img_s": n_img / sec,
                            "img_s_no_png": n_img / (sec - stats.get("png_s", 0.0)), "first_call_s": first,
                            "gpu_mem": {k: v for k, v in stats.items() if k.endswith("_gib")}, "check": check,
                            "exit": 0 if check["ok"] else 1,
                            "note": f"first call {first:.1f}s{note}, then prior {stats['prior_s']:.1f}s, decoder "
                                    f"{stats['decoder_s']:.1f}s, png {stats['png_s']:.1f}s"})
            log(f"diffusers {name}: {n_img} images in {sec:.1f}s = {n_img / sec:.2f} img/s ({results[-1]['note']}); "
                f"output check: {check['summary']}")
            report()

        for name, per_call, n in (("x1", 1, args.x1_rows), ("x16", args.per_call, args.x16_rows)):
            if name not in args.skip:
                diffusers_variant(name, f"diffusers, {per_call} prompt{'s' if per_call > 1 else ''} per call",
                                  per_call, n)
        if "unet" not in args.skip:
            s_img = unet_alone(decoder, wl, args.per_call)
            results.append({"variant": f"UNet alone, CFG batch {2 * args.per_call} (decoder floor)",
                            "images": args.per_call, "seconds": s_img * args.per_call, "img_s": 1 / s_img,
                            "note": f"{wl.steps} forwards"})
            log(f"UNet alone: {1 / s_img:.2f} img/s")
            report()
        if "x32c" not in args.skip:  # last: it compiles the decoder's UNet in place
            decoder.unet.to(memory_format=torch.channels_last)
            decoder.unet.compile()
            diffusers_variant("x32c", f"diffusers, torch.compile(unet) + channels_last, {COMPILED_PER_CALL} "
                                      "prompts per call", COMPILED_PER_CALL, args.x32c_rows, " (the compile)")
        del prior, decoder
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    if "kbatch" not in args.skip:
        for name in args.kbatch_variants:
            manifest = os.path.join(work, f"manifest-{variant_rows(args, name)}.parquet")
            if not os.path.exists(manifest):
                C.write_manifest(manifest, variant_rows(args, name))
            results.append(run_kbatch_variant(args, name, models, manifest, wl, device, dtype_name, work))
            report()

    text = "\n".join(report_lines(args, results, wl, flops_img, dtype_name))
    print("\n" + text)
    log(f"total {time.perf_counter() - T0:.0f}s; work dir {work}")
    write_report(args, text.splitlines(), results, flops_img, work)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(x.get("exit", 0) == 0 for x in results) else 1


def run_kbatch_variant(args, name: str, models: dict, manifest: str, wl: C.Workload, device: str,
                       dtype_name: str, work: str) -> dict:
    """One ``kbatch run`` of the manifest in the layout ``KBATCH_VARIANTS[name]``, timed as a whole command;
    the steady rate and the first image's time read from its ``_job.json``; a sample of its images checked."""
    v = KBATCH_VARIANTS[name]
    rows = variant_rows(args, name)
    if v.get("resources") is False:  # the config a user writes: no resources section, kbatch decides
        res = {}
    elif device == "cuda":
        dec_gpus, batch = v.get("decoder_gpus", args.decoder_gpus), v.get("batch", args.kbatch_batch)
        res = dict(prior={"replicas": 1, "gpus": args.prior_gpus, "cpus": 1, "batch_size": batch},
                   decoder={"replicas": 1, "gpus": dec_gpus, "cpus": 1, "batch_size": batch},
                   io_cpus=1, rows_per_shard=64)
    else:  # the 2-CPU preset of bench/cpu.py
        res = dict(prior={"replicas": 1, "gpus": 0, "cpus": 0.25, "batch_size": 8, "threads": 1},
                   decoder={"replicas": 2, "gpus": 0, "cpus": 0.75, "batch_size": 8, "threads": 1},
                   io_cpus=0.25, rows_per_shard=64)
    sets = v["sets"] + args.sets
    out = os.path.join(work, f"kbatch-out-{name}")
    cfg = C.kbatch_config(models, manifest, out, wl, dtype=dtype_name, device=device, **res)
    if not res:  # only the device: kbatch's own layout, compile and batch choices
        cfg["resources"] = {"device": device}
        cfg["output"].pop("rows_per_shard", None)
    cfg_path = C.write_yaml(os.path.join(work, f"kbatch-{name}.yaml"), cfg)
    ray_tmp = tempfile.mkdtemp(prefix="kbr-", dir="/tmp")
    log_path = os.path.join(work, f"kbatch-{name}.log")
    log(f"kbatch[{name}]: run {cfg_path} ({rows} rows; resources {res or 'kbatch defaults'}; --set {sets})")
    mem = GpuMemPoller() if device == "cuda" else None
    if mem:
        mem.__enter__()
    try:
        sec, rc, poller, text = C.run_kbatch(cfg_path, out, ray_tmp, sets=sets, timeout=1200, log_path=log_path)
    finally:
        if mem:
            mem.__exit__(None, None, None)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    job = read_job(out)
    r = job.get("result") or {}
    n_img = r.get("images", 0)
    check = check_images(sample_images(out))
    if rc != 0:
        print("\n".join(text.splitlines()[-30:]))
    gpu_mem = dict(r.get("memory") or {})
    if mem:
        gpu_mem["device_peak_used_gib"] = mem.peak / 2**30
    rates = kbatch_rates(job)
    stages = ", ".join(f"{k.replace('_seconds', '')} {v:.1f}s" for k, v in (r.get("stage_seconds") or {}).items())
    lay = job.get("layout") or {}
    comp = job.get("compile") or {}
    if "resources.colocate=true" in sets or lay.get("colocate"):
        layout = "colocated"
    elif res:
        layout = f"prior {res['prior']['gpus']} + decoder {res['decoder']['gpus']} GPU"
    else:
        layout = f"kbatch's layout: {lay.get('split', '?')} split"
    batch = comp.get("batch") or (lay.get("decoder") or {}).get("batch_size", "?")
    compiled = comp.get("on")
    log(f"kbatch[{name}]: exit {rc}, {n_img} images in {sec:.1f}s = {n_img / sec:.2f} img/s whole command; steady "
        f"{rates['steady_img_s'] or 0:.2f} img/s after the first image at {rates['first_image_s'] or 0:.1f}s; "
        f"compile {'on' if compiled else 'off'} ({comp.get('reason', '-')}), batch {batch}; "
        f"output check: {check['summary']}")
    shutil.rmtree(out, ignore_errors=True)
    return {"variant": f"kbatch run [{name}] ({layout}, batch {batch}, compile {'on' if compiled else 'off'}"
                       + (f"; --set {' '.join(sets)}" if sets else "") + ")",
            "images": n_img, "seconds": sec, "img_s": n_img / sec, "exit": rc if check["ok"] else (rc or 1),
            "log": log_path, "img_s_inside": r.get("images_per_second"), "gpu_mem": gpu_mem, "check": check,
            "steady_img_s": rates["steady_img_s"], "first_image_s": rates["first_image_s"],
            "compile": comp, "rss": {g: m for g, (_, m, _) in (poller.by_group() if poller else {}).items()},
            "note": f"whole command {sec:.1f}s; steady {rates['steady_img_s'] or 0:.2f} img/s after the first "
                    f"image ({rates['first_image_s'] or 0:.1f}s after the loop's start: actor start, model load"
                    f", compile warm-up {rates['warmup_s']:.1f}s); busy: {stages}"}


def read_job(output: str) -> dict:
    try:
        with open(os.path.join(output, "_job.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def kbatch_rates(job: dict) -> dict:
    """kbatch's steady rate from its ``_job.json``: the images after the first decoder batch over the driver
    loop's seconds after it (``driver.first_image_seconds`` is when the first batch finished: everything
    before it, actor start, model load, compile warm-up, is the first image's time, reported apart). None
    when the run did not get that far."""
    d, r = job.get("driver") or {}, job.get("result") or {}
    first, loop, images = d.get("first_image_seconds"), d.get("loop_seconds"), r.get("images", 0)
    comp, lay = job.get("compile") or {}, job.get("layout") or {}
    batch = comp.get("batch") or (lay.get("decoder") or {}).get("batch_size") or 16
    warm = float((r.get("stage_seconds") or {}).get("decoder_warmup_seconds", 0.0))
    steady = None
    if first is not None and loop and loop > first and images > batch:
        steady = (images - min(batch, images)) / (loop - first)
    return {"steady_img_s": steady, "first_image_s": first, "warmup_s": warm}


def sample_images(output: str, limit: int = 64) -> list:
    """Up to ``limit`` of a ``files`` output's images, decoded (the check's sample)."""
    import numpy as np
    from PIL import Image

    paths = sorted(str(p) for p in Path(output).rglob("*.png") if not p.name.startswith("contact_sheet"))
    step = max(1, len(paths) // limit)
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths[::step][:limit]]


def check_images(images: list) -> dict:
    """Outputs worth timing: ``ok`` when there are images, none is constant (a NaN from an fp16 overflow
    comes out of the uint8 conversion as a constant image) and no two are identical (a seed or batch mix-up,
    or a model that ignores its inputs)."""
    import hashlib

    import numpy as np

    arrays = [np.asarray(a) for a in images]
    constant = sum(1 for a in arrays if a.size == 0 or int(a.max()) == int(a.min()))
    digests = [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays]
    duplicates = len(digests) - len(set(digests))
    ok = bool(arrays) and constant == 0 and duplicates == 0
    summary = (f"{len(arrays)} images checked, " + ("ok" if ok else
               "FAILED: " + ", ".join(x for x in (f"{constant} constant" if constant else "",
                                                  f"{duplicates} identical" if duplicates else "",
                                                  "no images" if not arrays else "") if x)))
    return {"checked": len(arrays), "constant": constant, "identical": duplicates, "ok": ok, "summary": summary}


def report_lines(args, results: list[dict], wl: C.Workload, flops_img, dtype_name: str) -> list[str]:
    ref = next((x for x in results if x["variant"].startswith(f"diffusers, {args.per_call} ")), None)
    lines = [f"GPU benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}: {card()}",
             f"versions: {C.versions()}",
             f"workload: text2img {wl.height}x{wl.width}, prior {wl.prior_steps} + decoder {wl.steps} steps, "
             f"guidance {wl.guidance}, {dtype_name}" + (" (TINY models: not the reference workload)" if args.tiny else
                                                      " (MINI models: not the reference workload)" if args.mini else
                                                      ", full-size random-weight models"),
             "" if flops_img is None else
             f"UNet FLOPs per image: {flops_img / 1e12:.3f} TFLOP ({wl.steps} CFG steps, FlopCounterMode)",
             "",
             "| variant | images | seconds | img/s | steady img/s | vs diffusers x%d | UNet TFLOP/s | "
             "memory per stage (GiB) | output check | notes |" % args.per_call,
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in results:
        rate = x.get("steady_img_s") or x["img_s"]  # diffusers variants: timed after their first call
        rel = f"{rate / ref['img_s']:.2f}x" if ref else "-"
        tfs = f"{flops_img * rate / 1e12:.3g}" if flops_img else "-"
        memtxt = ", ".join(f"{k} {v:.1f}" for k, v in (x.get("gpu_mem") or {}).items()) or "-"
        notes = x.get("note", "")
        if x.get("img_s_inside"):
            notes += f"; {x['img_s_inside']:.2f} img/s inside Ray"
        if x.get("img_s_no_png"):
            notes += f"; {x['img_s_no_png']:.2f} img/s without PNG writes"
        steady = (f"{x['steady_img_s']:.2f}" if x.get("steady_img_s") else
                  "-" if x["variant"].startswith("kbatch") else f"{x['img_s']:.2f}")
        check = (x.get("check") or {}).get("summary", "-")
        lines.append(f"| {x['variant']} | {x['images']} | {x['seconds']:.1f} | {x['img_s']:.2f} | {steady} | {rel} | "
                     f"{tfs} | {memtxt} | {check} | {notes} |")
    compiled = next((x for x in results if "torch.compile" in x["variant"]), None)
    for kb in (x for x in results if x["variant"].startswith("kbatch")):
        lines.append("")
        steady = kb.get("steady_img_s")
        lines.append(f"{kb['variant']}: whole command {kb['img_s']:.2f} img/s; steady "
                     + (f"{steady:.2f}" if steady else "-") + " img/s after the first image at "
                     + (f"{kb['first_image_s']:.1f}s" if kb.get("first_image_s") is not None else "-")
                     + " (target: steady >= 5 on one H200, text2img 512x512, 25 + 50 steps, fp16)")
        for name, anchor in (("diffusers x%d" % args.per_call, ref), ("compiled diffusers x32", compiled)):
            if anchor and steady:
                lines.append(f"  steady kbatch / {name} = {steady / anchor['img_s']:.2f}")
        comp = kb.get("compile") or {}
        if comp:
            lines.append(f"  compile {'on' if comp.get('on') else 'off'}: {comp.get('reason')}; batch "
                         f"{comp.get('batch')} ({comp.get('batch_reason')}); warm-up per shape: "
                         f"{comp.get('warmup') or '-'}")
        if kb.get("rss"):
            lines.append("  peak host RSS per process: " + ", ".join(
                f"{g} {C.mib(m)}" for g, m in sorted(kb["rss"].items(), key=lambda kv: -kv[1])))
    return lines


def write_report(args, lines: list[str], results: list[dict], flops_img, work: str):
    """gpu-results.md / .json and the kbatch logs into --out (after every step: a cut-short run keeps them)."""
    if not args.out:
        return
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu-results.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "gpu-results.json"), "w") as fh:
        json.dump({"results": results, "flops_per_image": flops_img, "card": card(), "versions": C.versions()},
                  fh, indent=2, default=str)
    for x in results:
        if x.get("log") and os.path.exists(x["log"]):
            shutil.copy(x["log"], args.out)


if __name__ == "__main__":
    sys.exit(main())
