"""Issue 18 item 3, one card near its limit, checked on CPU: uint8 made on the device equals the old host
path bit for bit; the ``models.compile: auto`` rule; the refusals of a compiled job that would recompile
mid-run; the compile set-up (channels_last, MoVQ compiled, inductor cache); PNG compression is lossless."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from kbatch.models.decoder import DecoderPredictor, to_uint8
from kbatch.models.prior import PriorPredictor
from kbatch.schema.rows import Row


def _host_uint8(raw: torch.Tensor) -> np.ndarray:
    """What kbatch did before: diffusers' ``output_type="np"`` (denormalize, clamp, to host, permute, float)
    then ``(x * 255).round().astype(uint8)`` on the host."""
    x = (raw * 0.5 + 0.5).clamp(0, 1)
    x = x.cpu().permute(0, 2, 3, 1).float().numpy()
    return (np.asarray(x) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_to_uint8_is_the_host_arithmetic_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    raw = (torch.randn(3, 3, 32, 40, generator=g) * 0.7).to(dtype)  # some beyond [-1, 1]: clamped
    # values whose x255 falls on .5 (round half to even) and just around it
    edge = torch.tensor([(2 * k + 1) / 510 * 2 - 1 for k in range(255)], dtype=torch.float32).to(dtype)
    raw[0, 0, 0, :] = edge[:40]
    raw[1, 1, :, 0] = edge[40:72]
    got, want = to_uint8(raw), _host_uint8(raw)
    assert got.dtype == np.uint8 and got.shape == (3, 32, 40, 3)
    assert np.array_equal(got, want)
    # the test can fail: truncating instead of rounding differs on these values
    x = (raw * 0.5 + 0.5).clamp(0, 1).float().permute(0, 2, 3, 1).numpy()
    assert not np.array_equal((x * 255).astype(np.uint8), want)


# ------------------------------------------------------------------------------------------ the decoder

P = dict(height=64, width=64, num_inference_steps=3, guidance_scale=4.0, prior_num_inference_steps=2,
         prior_guidance_scale=4.0)


@pytest.fixture(scope="module")
def predictors(tiny_models):
    prior = PriorPredictor(tiny_models["prior"], device="cpu", dtype="float32", threads=1)
    dec = DecoderPredictor(tiny_models["decoder"], tiny_models["inpaint"], device="cpu", dtype="float32",
                           threads=1)
    return prior, dec


def _inputs():
    rng = np.random.default_rng(1)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    return {"init_image": init, "mask": Image.fromarray(mask), "mix_images": []}


CASES = {
    "text2img": [Row("a", "a red fox", seed=1, **P), Row("b", "a blue bird", seed=2, num_images=2, **P)],
    "text2img-unguided": [Row("u", "a lamp", seed=5, **{**P, "guidance_scale": 1.0})],
    "img2img": [Row("i", "a painting", mode="img2img", seed=3, strength=0.6, **P),
                Row("j", "a photo", mode="img2img", seed=4, strength=0.6, num_images=2, **P)],
    "inpaint": [Row("p", "a hat", mode="inpaint", seed=6, **P), Row("q", "a cup", mode="inpaint", seed=7, **P)],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("pad_to", [0, 5])
def test_decoder_images_equal_the_np_path(predictors, case, pad_to):
    """The images kbatch returns (MoVQ output converted where it was made) equal, bit for bit, what diffusers'
    ``output_type="np"`` and the host-side conversion give for the same call; padded calls too."""
    prior, dec = predictors
    rows = CASES[case]
    inputs = [_inputs() if r.mode != "text2img" else None for r in rows]
    priors = [prior([r], [i])[0] for r, i in zip(rows, inputs)]  # prior batches share num_images
    dec.pad_to = pad_to
    try:
        out = dec(rows, priors, inputs)
        with dec.lanes.take() as lane:
            np_images, real = dec._pipeline_call(lane, rows, priors, inputs, "np")
    finally:
        dec.pad_to = 0
    want = (np.asarray(np_images[:real]) * 255).round().astype(np.uint8)
    got = np.concatenate([o.images for o in out])
    assert got.dtype == np.uint8 and got.shape == want.shape == (sum(r.num_images for r in rows), 64, 64, 3)
    assert np.array_equal(got, want), f"{case}: {(got != want).sum()} values differ"
    assert got.std() > 0  # not a constant image


# ------------------------------------------------------------------------------------------ compile: auto

from kbatch.config import ConfigError, from_dict  # noqa: E402
from kbatch.models import compile_plan as cp  # noqa: E402

S512 = ("base", 512, 512, True)


def _decide(setting="auto", cuda=True, images=None, replicas=1, batch="auto", card=141.0, max_n=1, lanes=1):
    shapes = cp.ShapeImages(images if images is not None else {S512: 10_000})
    return cp.decide(setting, cuda=cuda, shape_images=shapes, max_num_images=max_n, replicas=replicas,
                     batch_setting=batch, card=card, lanes=lanes, limit=8)


def test_break_even_is_the_measured_numbers():
    # 87 s / (1/2.69 - 1/4.44) s per image = 593.8: a replica needs 594 images of a shape
    assert cp.break_even_images() == 594
    assert cp.break_even_images(52.0) == 355  # the fastest measured compile
    assert cp.break_even_images(87.0, eager=1.0, compiled=2.0) == 174


def test_auto_compiles_when_every_shape_pays_back_per_replica():
    on = _decide(images={S512: 4 * 594}, replicas=4)
    assert on.on and on.batch == 32 and "auto: on" in on.reason
    assert on.to_dict()["inputs"]["break_even_images"] == 594
    assert on.to_dict()["inputs"]["fewest_images_per_replica"] == 594
    # one replica more: 475 images each, not enough
    off = _decide(images={S512: 4 * 594}, replicas=5)
    assert not off.on and off.batch == 16 and "fewer than the 594" in off.reason
    # every shape counts: a small second shape keeps compile off
    two = _decide(images={S512: 100_000, ("inpaint", 512, 512, True): 300})
    assert not two.on and "300 images" in two.reason


def test_auto_is_off_without_cuda_or_when_it_would_recompile():
    assert not _decide(cuda=False).on  # CPU: never
    unknown = _decide(cuda=None)  # no GPU node alive yet (an autoscaler): conservative
    assert not unknown.on and "not known" in unknown.reason
    nine = {("base", 64 * (i + 1), 512, True): 10_000 for i in range(9)}  # 9 shapes > dynamo's 8
    assert not _decide(images=nine).on and "recompile limit 8" in _decide(images=nine).reason
    big_row = _decide(max_n=20)  # a row of 20 images > the batch of 16: would recompile
    assert not _decide(max_n=40).on and "num_images 40" in _decide(max_n=40).reason
    assert big_row.on and big_row.batch == 32  # 20 fits the compiled batch of 32 on a big card
    assert not _decide(lanes=2).on
    # explicit settings win
    assert not _decide(False).on
    assert _decide(True, images={S512: 1}).on and _decide(True, images={S512: 1}).reason == "models.compile: true"


def test_decoder_batch_auto_is_32_only_with_compile_on_a_big_card():
    assert _decide().batch == 32
    assert _decide(card=24.0).batch == 16 and _decide(card=None).batch == 16
    assert _decide(batch=8).batch == 8 and _decide(batch=8).batch_reason == "resources.decoder.batch_size set"
    assert _decide(cuda=False).batch == 16
    assert _decide(images={("base", 768, 768, True): 10_000}).batch == 16  # larger than 512x512: not assumed


def test_card_memory_from_ray_accelerator_type():
    def node(gpus, kind=None):
        res = {"CPU": 8.0, "GPU": float(gpus)}
        if kind:
            res[f"accelerator_type:{kind}"] = 1.0
        return {"Resources": res}

    assert cp.card_gib([node(8, "H200"), {"Resources": {"CPU": 2.0}}]) == 141
    assert cp.card_gib([node(8, "H200"), node(4, "L4")]) == 24  # the smallest card decides
    assert cp.card_gib([node(1)]) is None and cp.card_gib([node(1, "XYZ")]) is None
    assert cp.card_gib([]) is None


def test_compiled_job_that_would_recompile_is_refused_at_plan_time():
    nine = cp.ShapeImages({("base", 64 * (i + 1), 512, True): 10 for i in range(9)})
    with pytest.raises(ConfigError, match=r"'models.compile'.*9 UNet shapes.*recompile limit 8"):
        cp.check_before_start(True, "auto", nine, 1, "auto", limit=8)
    eight = cp.ShapeImages(list(nine.items())[:8])
    cp.check_before_start(True, "auto", eight, 1, "auto", limit=8)  # 8 shapes: fine
    with pytest.raises(ConfigError, match=r"'models.compile'.*num_images 12.*batch_size 8"):
        cp.check_before_start(True, "cuda", eight, 12, 8, limit=8)
    with pytest.raises(ConfigError, match=r"num_images 20.*batch_size 16"):  # auto batch: 16 is what every card gets
        cp.check_before_start(True, "auto", eight, 20, "auto", limit=8)
    # auto and false never refuse (auto stays off); device: cpu never compiles
    for setting, device in (("auto", "auto"), (False, "auto"), (True, "cpu")):
        cp.check_before_start(setting, device, nine, 20, 8, limit=8)
    # the limit is dynamo's own when not given
    import torch._dynamo.config as dc

    assert cp.dynamo_recompile_limit() == dc.recompile_limit


def test_compile_and_batch_config_keys():
    assert from_dict({}).models.compile == "auto" and from_dict({}).resources.decoder.batch_size == "auto"
    assert from_dict({"models": {"compile": True}}).models.compile is True
    assert from_dict({"models": {"compile": "false"}}).models.compile is False
    with pytest.raises(ConfigError, match="models.compile"):
        from_dict({"models": {"compile": "sometimes"}})
    with pytest.raises(ConfigError, match="resources.prior.batch_size"):
        from_dict({"resources": {"prior": {"batch_size": "auto"}}})
    assert from_dict({"resources": {"decoder": {"batch_size": 32}}}).resources.decoder.batch_size == 32
    # compile: auto does not forbid lanes (it stays off with them); compile: true does
    from_dict({"resources": {"decoder": {"concurrency": 2}}})
    with pytest.raises(ConfigError, match="resources.decoder.concurrency"):
        from_dict({"models": {"compile": True}, "resources": {"decoder": {"concurrency": 2}}})


def test_job_shapes_count_images_per_shape(tmp_path):
    import pandas as pd

    from kbatch.plan.manifest import ManifestSource
    from kbatch.run.runner import job_shapes

    df = pd.DataFrame({"id": [f"r{i}" for i in range(6)], "prompt": ["p"] * 6,
                       "mode": ["text2img", "img2img", "inpaint", None, "text2img", "text2img"],
                       "width": [512, 512, 512, 768, 512, 512], "num_images": [1, 2, 1, 3, 4, 99],
                       "guidance_scale": [4.0, 4.0, 4.0, 4.0, 1.0, 4.0]})
    cfg = from_dict({})
    import pyarrow as pa

    shapes = job_shapes(ManifestSource.from_table(pa.Table.from_pandas(df, preserve_index=False), str(tmp_path)), cfg)
    # img2img shares text2img's UNet; the row asking 99 images (over limits.max_num_images) is left out
    assert dict(shapes) == {("base", 512, 512, True): 3, ("inpaint", 512, 512, True): 1,
                            ("base", 512, 768, True): 3, ("base", 512, 512, False): 4}
    assert shapes.max_num_images == 4
    assert shapes.scaled(0.5)[("base", 512, 512, False)] == 2 and shapes.scaled(0.5).max_num_images == 4
    # a pandas column with nulls is float (2.0, NaN): its rows still count, the nulls as the defaults
    # (an inpaint row missed here would leave the inpaint model unloaded: every inpaint row would fail)
    df = pd.DataFrame([{"id": "a", "prompt": "p", "mode": "inpaint"}, {"id": "b", "prompt": "p", "num_images": 2,
                                                                      "width": 576}])
    assert df.num_images.dtype == float
    shapes = job_shapes(ManifestSource.from_table(pa.Table.from_pandas(df, preserve_index=False), str(tmp_path)), cfg)
    assert dict(shapes) == {("inpaint", 512, 512, True): 1, ("base", 512, 576, True): 2}


def test_cli_refuses_a_compiled_job_with_too_many_shapes(tiny_models, tmp_path):
    """Exit 2 before Ray or any model, naming the key: 9 sizes with models.compile: true."""
    from cli_helpers import kbatch, write_job

    from conftest import tiny_config

    rows = [{"id": f"r{i}", "prompt": "p", "width": 64 * (i + 1)} for i in range(9)]
    cfg = tiny_config(tiny_models, tmp_path / "out", models={"compile": True})
    cfg["resources"]["device"] = "auto"
    p = kbatch("run", write_job(tmp_path, cfg, rows), "--progress", "off", timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "models.compile" in p.stderr and "9 UNet shapes" in p.stderr
    assert "Started a local Ray" not in p.stderr + p.stdout and not (tmp_path / "out" / "_job.json").exists()
    v = kbatch("validate", tmp_path / "job.yaml", "--no-images", timeout=300)  # the same refusal
    assert v.returncode == 2 and "9 UNet shapes" in v.stderr, v.stderr[-2000:]
    ok = kbatch("validate", tmp_path / "job.yaml", "--no-images", "--set", "models.compile=auto", timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:] + ok.stdout[-2000:]


# ------------------------------------------------------------------------------------------ compile set-up


def test_cuda_speedups_set_up_compile_cache_and_layouts(tiny_models, tmp_path, monkeypatch):
    """What a CUDA worker's pipelines get, checked on a CPU pipeline labelled cuda (nothing runs: torch.compile
    is lazy): cudnn.benchmark, UNet and MoVQ channels_last, the UNet compiled, the MoVQ decode compiled once
    even when the inpaint pipeline shares the MoVQ, the inductor cache under models.cache_dir."""
    from diffusers import KandinskyPipeline

    from kbatch.models import loading

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    pipe = KandinskyPipeline.from_pretrained(tiny_models["decoder"], use_safetensors=True)
    cuda = loading.Placement("cuda", torch.float32, "test")
    loading._speedups(pipe, cuda, channels_last=True, compile=False, cache_dir=str(tmp_path / "cache"))
    assert torch.backends.cudnn.benchmark
    conv = next(m for m in pipe.movq.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.dim() == 4
    assert pipe.unet._compiled_call_impl is None and "decode" not in vars(pipe.movq)  # compile off: eager
    loading._speedups(pipe, cuda, channels_last=True, compile=True, cache_dir=str(tmp_path / "cache"))
    assert pipe.unet._compiled_call_impl is not None
    compiled_decode = vars(pipe.movq)["decode"]
    loading._speedups(pipe, cuda, channels_last=True, compile=True, cache_dir=str(tmp_path / "cache"))
    assert vars(pipe.movq)["decode"] is compiled_decode  # a shared MoVQ is wrapped once
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    assert (tmp_path / "cache" / "inductor").is_dir()
    # "auto" or any non-True value never compiles in a worker (the run decides before workers start)
    assert not loading.compiles(cuda, "auto") and loading.compiles(cuda, True)
    assert not loading.compiles(loading.Placement("cpu", torch.float32, "t"), True)


# ------------------------------------------------------------------------------------------ PNG level


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_png_levels_keep_the_pixels(level):
    from kbatch.output.writer import encode_image

    rng = np.random.default_rng(level)
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    img[:24] = img[:24] // 32 * 32  # a compressible half
    data = encode_image(img, "png", png_compress_level=level)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), img)
    if level == 9:  # and the level reaches zlib: 0 stores, 9 compresses
        assert len(data) < len(encode_image(img, "png", png_compress_level=0))


def test_png_compress_level_key():
    assert from_dict({}).output.png_compress_level == 1
    with pytest.raises(ConfigError, match="output.png_compress_level"):
        from_dict({"output": {"png_compress_level": 10}})


# ------------------------------------------------------------------------------------------ bench/gpu.py


def _gpu_bench():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / "gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_bench_arguments_and_rows():
    g = _gpu_bench()
    a = g.parse_args([])
    assert a.kbatch_variants == ["default"] and a.x32c_rows == 128
    # compile layouts run 512+ rows; the default layout 1024 (compile: auto pays back from 594 per replica)
    assert g.variant_rows(a, "default") == 1024 >= cp.break_even_images()
    assert g.variant_rows(a, "compile") >= 512 and g.variant_rows(a, "compile32") >= 512
    assert g.variant_rows(g.parse_args(["--rows", "64"]), "compile") == 64  # --rows wins
    with pytest.raises(SystemExit):
        g.parse_args(["--x32c-rows", "40"])  # not a multiple of 32: a second compiled shape


def test_gpu_bench_output_checks():
    g = _gpu_bench()
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(4)]
    assert g.check_images(good)["ok"]
    nan_like = good + [np.zeros((8, 8, 3), np.uint8)]  # what a NaN image becomes in uint8
    assert not g.check_images(nan_like)["ok"] and g.check_images(nan_like)["constant"] == 1
    assert g.check_images(good + [good[1].copy()])["identical"] == 1 and not g.check_images(good + [good[1]])["ok"]
    assert not g.check_images([])["ok"]


def test_gpu_bench_steady_rate_leaves_out_the_first_batch():
    g = _gpu_bench()
    job = {"driver": {"first_image_seconds": 100.0, "loop_seconds": 300.0},
           "result": {"images": 1024, "stage_seconds": {"decoder_warmup_seconds": 80.0}},
           "compile": {"batch": 32, "on": True}}
    r = g.kbatch_rates(job)
    assert r["steady_img_s"] == pytest.approx((1024 - 32) / 200.0) and r["first_image_s"] == 100.0
    assert r["warmup_s"] == 80.0
    assert g.kbatch_rates({})["steady_img_s"] is None  # a run that did not get that far: no rate


def test_gpu_bench_help_runs():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "bench/gpu.py", "--help"], capture_output=True, text=True, timeout=120,
                       cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert p.returncode == 0 and "x32c" in p.stdout and "steady" in p.stdout


def test_the_run_makes_compile_and_batch_concrete_for_its_cluster():
    """``build_stages``' step: the resolved config the workers get has compile as a bool and a number as the
    decoder batch; the decision is what ``_job.json`` keeps."""
    from kbatch.run.layout import resolve
    from kbatch.run.stage_setup import _compile_and_batch

    h200 = [{"NodeID": "g", "Resources": {"CPU": 16.0, "GPU": 2.0, "accelerator_type:H200": 1.0}}]
    cpu = [{"NodeID": "c", "Resources": {"CPU": 2.0}}]
    many = cp.ShapeImages({S512: 5000})
    many.max_num_images = 1

    def run(cfg, nodes, shapes=many):
        rcfg = resolve(cfg, nodes, nodes[0]["NodeID"])
        gpus = sum(n["Resources"].get("GPU", 0.0) for n in nodes)
        return _compile_and_batch(cfg, rcfg, nodes, gpus, shapes)

    rcfg, info = run(from_dict({}), h200)
    assert rcfg.models.compile is True and rcfg.resources.decoder.batch_size == 32
    assert info["on"] and info["inputs"]["card_gib"] == 141 and info["inputs"]["decoder_replicas"] >= 1
    rcfg, info = run(from_dict({}), cpu)  # no GPU: off, 16
    assert rcfg.models.compile is False and rcfg.resources.decoder.batch_size == 16 and not info["on"]
    rcfg, info = run(from_dict({"resources": {"decoder": {"batch_size": 24}}}), h200)  # a number pins
    assert rcfg.models.compile is True and rcfg.resources.decoder.batch_size == 24
    few = cp.ShapeImages({S512: 100})
    rcfg, info = run(from_dict({}), h200, few)  # too few images to pay back: eager, 16
    assert rcfg.models.compile is False and rcfg.resources.decoder.batch_size == 16
    rcfg, info = run(from_dict({"models": {"prior": "sim", "decoder": "sim"}}), h200)  # simulated: no decision
    assert rcfg.models.compile is False and rcfg.resources.decoder.batch_size == 16 and info is None


def test_job_shapes_count_best_of_candidates(tmp_path):
    """quality.best_of renders k candidates of every image in the same decoder call: they count, for the
    payback rule and against the compiled batch."""
    import pandas as pd
    import pyarrow as pa

    from kbatch.plan.manifest import ManifestSource
    from kbatch.run.runner import job_shapes

    try:
        cfg = from_dict({"quality": {"best_of": 3}})
    except ConfigError:
        pytest.skip("no quality.best_of in this tree")
    df = pd.DataFrame({"id": ["a", "b"], "prompt": ["p", "q"], "num_images": [1, 2]})
    shapes = job_shapes(ManifestSource.from_table(pa.Table.from_pandas(df, preserve_index=False), str(tmp_path)),
                        cfg)
    assert dict(shapes) == {S512: 9} and shapes.max_num_images == 6


def test_warmup_summary_per_shape():
    w = cp.warmup_summary([{"base 512x512 cfg": 80.0, "inpaint 512x512 cfg": 60.0}, {"base 512x512 cfg": 20.0}])
    assert w == {"replicas": 2, "seconds_per_shape": {"base 512x512 cfg": {"max": 80.0, "mean": 50.0},
                                                      "inpaint 512x512 cfg": {"max": 60.0, "mean": 60.0}}}


def test_decoder_warmup_times_each_shape(predictors):
    """The warm-up makes one call per shape (what compiles them on CUDA) and times each: the seconds that go to
    _job.json's compile.warmup."""
    _, dec = predictors
    dec.pad_to = 2
    try:
        total = dec.warmup([("base", 64, 64, True), ("base", 64, 64, False), ("inpaint", 64, 64, True)])
    finally:
        dec.pad_to = 0
    assert set(dec.warmup_by_shape) == {"base 64x64 cfg", "base 64x64", "inpaint 64x64 cfg"}
    # each shape's seconds are rounded to 1 ms: their sum may pass the total by that much
    assert 0 < sum(dec.warmup_by_shape.values()) <= total + 0.0005 * len(dec.warmup_by_shape)


def test_the_driver_keeps_each_replicas_warmup_per_shape():
    """A compiled decoder's first Status carries its per-shape warm-up; the run's outcomes collect it (the runner
    writes compile.warmup from them)."""
    from types import SimpleNamespace

    from kbatch.models.actors import Status
    from kbatch.run.outcomes import Outcomes

    added = []
    o = Outcomes(None, from_dict({}), SimpleNamespace(buffer=SimpleNamespace(add=added.append)), None, {},
                 lambda: ())
    call = SimpleNamespace(pool=SimpleNamespace(on_success=lambda *a: None), unit=SimpleNamespace(rows=[], images=0),
                           payload=None, replica=SimpleNamespace(node="n"))
    o._done_decoder(call, Status(2.0, {}, 81.5, {"base 512x512 cfg": 81.5}))
    o._done_decoder(call, Status(2.0, {}))  # later batches: nothing
    assert o.compile_warmups == [{"base 512x512 cfg": 81.5}] and o.stats["decoder_warmup_seconds"] == 81.5
    assert len(added) == 2


def _png_zlib_level(data: bytes) -> int:
    """FLEVEL of a PNG's zlib stream (first IDAT): 0 for zlib levels 0-1, 1 for 2-5, 2 for 6, 3 for 7-9."""
    import struct

    pos = 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            return data[pos + 9] >> 6  # the zlib header's second byte
        pos += 12 + length
    raise ValueError("no IDAT")


def test_a_run_records_its_compile_decision_and_writes_at_the_png_level(tiny_models, ray_session, tmp_path):
    """A whole (CPU) run: _job.json's compile says what was decided and why, and the writers encode at
    output.png_compress_level (the zlib header of the PNGs written says so)."""
    import json

    import pandas as pd

    import kbatch
    from conftest import tiny_config

    rows = pd.DataFrame([{"id": "a", "prompt": "a red fox"}, {"id": "b", "prompt": "a boat"}])
    levels = {}
    for level in (1, 9):
        out = tmp_path / f"l{level}"
        res = kbatch.render(rows, str(out), tiny_config(tiny_models, out, output={"png_compress_level": level}))
        assert res.run.exit_code == 0
        pngs = sorted(out.rglob("*.png"))
        assert pngs
        levels[level] = {_png_zlib_level(p.read_bytes()) for p in pngs if "contact" not in p.name}
        job = json.loads((out / "_job.json").read_text())
        comp = job["compile"]
        assert comp["setting"] == "auto" and comp["on"] is False and "without CUDA" in comp["reason"]
        assert comp["batch"] == 4 and comp["inputs"]["images_per_shape"] == {"base 64x64 cfg": 2}
        assert comp["rule"] == cp.RULE and comp["inputs"]["break_even_images"] == 594
    assert levels == {1: {0}, 9: {3}}
