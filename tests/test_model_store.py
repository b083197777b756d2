"""Model folders from any location (issue "Models from the fleet's own storage"): fail-fast checks, one
verified node-local copy of an ``s3://`` folder, retries, ``kbatch models pull``, ``ddpm_scheduler/``, and the
inpaint pipeline loaded at start sharing the decoder's modules by file hash.

An S3-compatible server (moto, server mode on loopback) stands in for the fleet's bucket; the tiny models are
the weights. Predictors are called directly (no Ray).
"""
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from kbatch.config import ConfigError
from kbatch.models import store as ms
from kbatch.schema.rows import Row

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
from moto_s3 import aws_env, moto_server  # noqa: E402

BUCKET = "kbatch-models"
AWS_ENV = aws_env("AKIAKBATCHMODELS01", "kbatch-models-secret")
ROWS = [Row(id="a", prompt="a red fox in the snow", seed=3, height=64, width=64, num_inference_steps=3,
            prior_num_inference_steps=2),
        Row(id="b", prompt="a lighthouse at dusk", seed=4, height=64, width=64, num_inference_steps=3,
            prior_num_inference_steps=2)]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback; this process's env (inherited by subprocesses) points botocore at it."""
    with moto_server(AWS_ENV):
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs


def _upload(fs, folder, key):
    """Every file of a local folder to s3://BUCKET/key/ (what a fleet's own sync would do)."""
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{BUCKET}/{key}/{p.relative_to(folder).as_posix()}")
    return f"s3://{BUCKET}/{key}"


@pytest.fixture(scope="module")
def s3_models(s3, tiny_models):
    return {name: _upload(s3, tiny_models[name], f"tiny/{name}") for name in ("prior", "decoder", "inpaint")}


def _wanted_files(folder) -> dict[str, int]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*")
            if p.is_file() and ms.wanted(p.relative_to(folder).as_posix())}


def _render(prior, decoder, rows=ROWS):
    return np.stack([o.images for o in decoder(rows, prior(rows))])


# --------------------------------------------------------------------------------------------------------------
# Staging from S3
# --------------------------------------------------------------------------------------------------------------


def test_model_kind():
    assert ms.is_sim("sim") and not ms.is_sim("simulated") and not ms.is_sim(None)
    assert ms.model_kind("sim") == "sim"
    assert ms.model_kind("s3://bucket/models/decoder") == "url"
    assert ms.model_kind("gs://bucket/decoder") == "url"
    assert ms.model_kind("file:///srv/models/decoder") == "local"
    assert ms.model_kind("/srv/models/decoder") == "local"
    assert ms.model_kind("./decoder") == "local"
    assert ms.model_kind("kandinsky-community/kandinsky-2-1") == "hub"
    assert ms.model_kind("a/b/c") == "local"


def test_s3_model_stages_once_and_renders_same_pixels(s3_models, tiny_models, tmp_path, caplog):
    """s3:// folders staged into the node cache load and render exactly what the local folders render; a
    second load on the node copies nothing."""
    from kbatch.models.decoder import DecoderPredictor
    from kbatch.models.prior import PriorPredictor

    want = _render(PriorPredictor(tiny_models["prior"], device="cpu", threads=1),
                   DecoderPredictor(tiny_models["decoder"], device="cpu", threads=1))
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="kbatch")
    prior = PriorPredictor(s3_models["prior"], device="cpu", threads=1, cache_dir=str(cache))
    decoder = DecoderPredictor(s3_models["decoder"], device="cpu", threads=1, cache_dir=str(cache))
    assert decoder.pipe.name_or_path.startswith(str(cache)) and prior.pipe.name_or_path.startswith(str(cache))
    np.testing.assert_array_equal(_render(prior, decoder), want)
    assert "staged s3://" in caplog.text
    # only the pickle-free files, each verified, and a completion flag
    staged = Path(decoder.pipe.name_or_path)
    assert _wanted_files(staged) == _wanted_files(tiny_models["decoder"])
    journal = json.loads((staged / ms.JOURNAL).read_text())
    assert journal["complete"] and journal["uri"] == s3_models["decoder"]
    assert set(journal["files"]) == set(_wanted_files(tiny_models["decoder"]))
    again = ms.stage(s3_models["decoder"], cache_dir=str(cache))
    assert again.path == str(staged) and again.files_copied == 0 and again.bytes_copied == 0


def test_changed_or_truncated_files_are_copied_again(s3, s3_models, tiny_models, tmp_path):
    cache = str(tmp_path / "cache")
    first = ms.stage(s3_models["prior"], cache_dir=cache)
    assert first.files_copied == len(_wanted_files(tiny_models["prior"]))
    victim = Path(first.path) / "prior" / "diffusion_pytorch_model.safetensors"
    with open(victim, "r+b") as fh:  # a truncated file on the node's disk
        fh.truncate(100)
    assert ms.stage(s3_models["prior"], cache_dir=cache).files_copied == 1
    original = Path(tiny_models["prior"]) / "prior/diffusion_pytorch_model.safetensors"
    assert victim.read_bytes() == original.read_bytes()
    # the source changed (new upload of one file): only that file is copied again
    url = _upload(s3, tiny_models["prior"], "changing/prior")
    base = ms.stage(url, cache_dir=cache)
    s3.pipe_file(f"{BUCKET}/changing/prior/scheduler/scheduler_config.json",
                 (Path(tiny_models["prior"]) / "scheduler/scheduler_config.json").read_bytes() + b"\n")
    s3.invalidate_cache()
    after = ms.stage(url, cache_dir=cache)
    # a new version of the source is a new folder (never re-staged under a process loading the old one);
    # its unchanged files come from the previous version, verified, without downloading them again
    assert after.path != base.path and after.files_copied == 1
    assert Path(base.path).is_dir()  # this process staged it: held shared, not evicted under it
    for rel in _wanted_files(tiny_models["prior"]):
        if rel != "scheduler/scheduler_config.json":
            assert (Path(after.path) / rel).read_bytes() == (Path(tiny_models["prior"]) / rel).read_bytes()


def test_a_cached_file_changed_in_place_is_copied_again(s3, s3_models, tiny_models, tmp_path):
    """Same size, other bytes (a node's disk, or someone, changed the copy): the verified stamp (size, mtime,
    inode) no longer matches, so the file is not trusted by its size and is copied again."""
    cache = str(tmp_path / "cache")
    first = ms.stage(s3_models["decoder"], cache_dir=cache)
    victim = Path(first.path) / "movq" / "diffusion_pytorch_model.safetensors"
    original = victim.read_bytes()
    with open(victim, "r+b") as fh:  # two bytes changed in place: same size
        fh.seek(len(original) - 2)
        fh.write(bytes(255 - b for b in original[-2:]))
    again = ms.stage(s3_models["decoder"], cache_dir=cache)
    assert again.path == first.path and again.files_copied == 1
    assert victim.read_bytes() == original


def test_a_bucket_key_with_an_empty_segment_writes_nothing_outside_the_cache(s3, tiny_models, tmp_path):
    """``decoder//<absolute path>/evil.json`` would name an absolute path after the model prefix: the listing
    drops it, staging writes only inside the cache, and the model still loads."""
    url = _upload(s3, tiny_models["decoder"], "evil/decoder")
    target = tmp_path / "outside" / "evil.json"
    s3.pipe_file(f"{BUCKET}/evil/decoder/{target}", b'{"owned": true}')  # key: evil/decoder//tmp/.../evil.json
    s3.invalidate_cache()
    keys = [k for k in s3.find(f"{BUCKET}/evil/decoder") if "evil.json" in k]
    assert keys and "//" in keys[0], keys  # the crafted key is really there, with its empty segment
    cache = tmp_path / "cache"
    staged = ms.stage(url, cache_dir=str(cache))
    assert not target.exists()
    assert not ms.wanted(str(target)) and not ms.safe_name("a//b.json") and not ms.safe_name("a/../b.json")
    assert staged.files_copied == len(_wanted_files(tiny_models["decoder"]))
    inside = {p.resolve() for p in cache.rglob("*") if p.is_file()}
    assert all(str(p).startswith(str(cache.resolve())) for p in inside)


_CHILD_STAGE = textwrap.dedent("""
    import json, logging, os, sys, time
    logging.basicConfig(level=logging.INFO)
    from kbatch.models.store import stage
    url, cache, ready, go = sys.argv[1:5]
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    st = stage(url, cache_dir=cache)
    print(json.dumps({"path": st.path, "files": st.files_copied, "bytes": st.bytes_copied}))
""")


def test_two_processes_on_one_node_download_once(s3_models, tiny_models, tmp_path):
    """Two actor processes start on one node at the same moment: one copies every file, the other waits on
    the node lock and reuses the copy."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs, ready = [], []
    for i in range(2):
        ready.append(tmp_path / f"ready{i}")
        procs.append(subprocess.Popen([sys.executable, "-c", _CHILD_STAGE, s3_models["decoder"], str(cache),
                                       str(ready[i]), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    deadline = time.time() + 120
    while not all(r.exists() for r in ready) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    n = len(_wanted_files(tiny_models["decoder"]))
    assert sorted(r["files"] for r in results) == [0, n]
    assert sorted(r["bytes"] for r in results)[0] == 0
    assert results[0]["path"] == results[1]["path"]
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1


_CHILD_DIES = textwrap.dedent("""
    import os, sys
    import kbatch.models.store as ms
    from kbatch.models.store import staging
    url, cache = sys.argv[1:3]
    real, calls = staging._download, []
    def dying(fs, src, tmp):
        calls.append(src)
        if len(calls) == 3:  # killed while writing the third file
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(b"half a file")
            os._exit(9)
        return real(fs, src, tmp)
    staging._download = dying
    ms.stage(url, cache_dir=cache)
""")


def test_copy_killed_midway_resumes(s3_models, tiny_models, tmp_path):
    cache = tmp_path / "cache"
    p = subprocess.run([sys.executable, "-c", _CHILD_DIES, s3_models["decoder"], str(cache)], capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 9, p.stderr[-2000:]
    (dest,) = [d for d in cache.iterdir() if d.is_dir()]
    partial = list(dest.rglob("*.part-*"))
    done = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in dest.rglob("*")
            if f.is_file() and ms.wanted(f.relative_to(dest).as_posix())}
    assert len(partial) == 1 and len(done) == 2
    assert not json.loads((dest / ms.JOURNAL).read_text())["complete"]
    st = ms.stage(s3_models["decoder"], cache_dir=str(cache))
    n = len(_wanted_files(tiny_models["decoder"]))
    assert st.files_copied == n - 2  # the two finished files are not downloaded again
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in done} == done
    assert not list(dest.rglob("*.part-*"))
    assert json.loads((dest / ms.JOURNAL).read_text())["complete"]
    for rel in _wanted_files(tiny_models["decoder"]):
        assert (dest / rel).read_bytes() == (Path(tiny_models["decoder"]) / rel).read_bytes(), rel


# --------------------------------------------------------------------------------------------------------------
# Fail fast: check_model
# --------------------------------------------------------------------------------------------------------------


def _bad_folders(tiny_models, root: Path) -> dict:
    no_index = root / "no_index"
    shutil.copytree(tiny_models["decoder"], no_index)
    (no_index / "model_index.json").unlink()
    bin_only = root / "bin_only"
    shutil.copytree(tiny_models["decoder"], bin_only)
    (bin_only / "unet/diffusion_pytorch_model.safetensors").rename(bin_only / "unet/diffusion_pytorch_model.bin")
    return {"missing": str(root / "does-not-exist"), "no_index": str(no_index), "bin_only": str(bin_only)}


@pytest.mark.parametrize("case, key, cls, expect", [
    ("missing", "models.decoder", "KandinskyPipeline", "no such folder"),
    ("no_index", "models.decoder", "KandinskyPipeline", "no model_index.json"),
    ("wrong_class", "models.prior", "KandinskyPriorPipeline", "'KandinskyPipeline'"),
    ("bin_only", "models.decoder", "KandinskyPipeline", "unet/ has no .safetensors weights (only unet/"),
    ("decoder_as_inpaint", "models.inpaint", "KandinskyInpaintPipeline", "in_channels 4"),
])
def test_check_model_errors_name_key_and_value(tiny_models, tmp_path, case, key, cls, expect):
    folders = {**_bad_folders(tiny_models, tmp_path), "wrong_class": tiny_models["decoder"],
               "decoder_as_inpaint": tiny_models["decoder"]}
    with pytest.raises(ConfigError) as err:
        ms.check_model(key, folders[case], cls)
    msg = str(err.value)
    assert f"config key '{key}'" in msg and repr(folders[case]) in msg and expect in msg, msg


def test_check_model_accepts_good_folders_and_sim(tiny_models, s3_models):
    for name, cls in (("prior", "KandinskyPriorPipeline"), ("decoder", "KandinskyPipeline"),
                      ("inpaint", "KandinskyInpaintPipeline")):
        ms.check_model(f"models.{name}", tiny_models[name], cls)
        ms.check_model(f"models.{name}", s3_models[name], cls)
    ms.check_model("models.decoder", "sim", "KandinskyPipeline")


def test_check_model_on_s3(s3, tiny_models, tmp_path):
    bad = _bad_folders(tiny_models, tmp_path)
    bin_url = _upload(s3, bad["bin_only"], "bad/bin_only")
    cases = [(f"s3://{BUCKET}/nothing/here", "nothing there"),
             (_upload(s3, bad["no_index"], "bad/no_index"), "no model_index.json"),
             (bin_url, "only unet/diffusion_pytorch_model.bin")]
    for url, expect in cases:
        with pytest.raises(ConfigError, match="config key 'models.decoder' is") as err:
            ms.check_model("models.decoder", url, "KandinskyPipeline")
        assert repr(url) in str(err.value) and expect in str(err.value), str(err.value)
    # staging never copies pickles, even from a folder that has them
    with pytest.raises(FileNotFoundError):
        ms.stage(f"s3://{BUCKET}/nothing/here", cache_dir=str(tmp_path / "c"))
    staged = ms.stage(bin_url, cache_dir=str(tmp_path / "c"))
    assert not list(Path(staged.path).rglob("*.bin"))


def _http_error(cls, status: int):
    import httpx2

    return cls(f"HTTP {status}", response=httpx2.Response(status, request=httpx2.Request("GET", "https://hub/x")))


def test_check_model_hub(monkeypatch, tiny_models, caplog):
    """Hub ids: a definite 404 is a config error; an unreachable hub only a warning; the listing is checked."""
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError
    from types import SimpleNamespace

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def missing(self, repo_id, **kw):
        raise _http_error(RepositoryNotFoundError, 404)

    monkeypatch.setattr(HfApi, "model_info", missing)
    with pytest.raises(ConfigError, match="config key 'models.decoder' is 'nobody/no-such-model': the hub has no"):
        ms.check_model("models.decoder", "nobody/no-such-model", "KandinskyPipeline")

    def offline(self, repo_id, **kw):
        raise httpx2.ConnectError("no route to the hub")

    monkeypatch.setattr(HfApi, "model_info", offline)
    caplog.set_level(logging.WARNING, logger="kbatch")
    ms.check_model("models.decoder", "kandinsky-community/kandinsky-2-1", "KandinskyPipeline")
    assert "cannot be asked" in caplog.text

    names = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin", "movq/config.json",
             "movq/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
             "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"]
    def listing(self, repo_id, **kw):
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=n) for n in names])

    monkeypatch.setattr(HfApi, "model_info", listing)
    monkeypatch.setattr("huggingface_hub.hf_hub_download",
                        lambda repo, rel, **kw: os.path.join(tiny_models["decoder"], rel))
    with pytest.raises(ConfigError, match="unet/ has no .safetensors weights"):
        ms.check_model("models.decoder", "someone/pickled-kandinsky", "KandinskyPipeline")
    names[2] = "unet/diffusion_pytorch_model.safetensors"
    ms.check_model("models.decoder", "someone/fine-kandinsky", "KandinskyPipeline")
    with pytest.raises(ConfigError, match="expected 'KandinskyPriorPipeline'"):
        ms.check_model("models.prior", "someone/fine-kandinsky", "KandinskyPriorPipeline")


# --------------------------------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------------------------------


def _flaky(errors):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "ok"

    return fn, calls


def test_with_retries_retries_transient_errors_only():
    import errno

    from botocore.exceptions import ClientError
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    slept = []
    fn, calls = _flaky([ConnectionResetError("reset"), _http_error(HfHubHTTPError, 429), TimeoutError("slow")])
    assert ms.with_retries(fn, what="t", attempts=4, base_delay=1.0, sleep=slept.append) == "ok"
    assert len(calls) == 4 and len(slept) == 3
    assert slept[0] <= 1.5 and 1.0 <= slept[1] <= 3.0 and 2.0 <= slept[2] <= 6.0  # exponential, with jitter

    throttled = OSError(errno.EBUSY, "Please reduce your request rate")  # as s3fs translates SlowDown
    throttled.__cause__ = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}},
                                      "GetObject")
    fn, calls = _flaky([throttled])
    assert ms.with_retries(fn, what="t", sleep=lambda s: None) == "ok" and len(calls) == 2

    wrapped = OSError("kandinsky-community/nope is not a valid model identifier")  # how diffusers wraps a 404
    wrapped.__cause__ = _http_error(RepositoryNotFoundError, 404)
    for permanent in (FileNotFoundError("gone"), _http_error(RepositoryNotFoundError, 404), wrapped,
                      ValueError("bad model"), PermissionError("denied"), OSError("no file named x.safetensors")):
        fn, calls = _flaky([permanent])
        with pytest.raises(type(permanent)):
            ms.with_retries(fn, what="t", sleep=lambda s: None)
        assert len(calls) == 1, permanent

    fn, calls = _flaky([ConnectionError("down")] * 5)
    with pytest.raises(ConnectionError):
        ms.with_retries(fn, what="t", attempts=3, sleep=lambda s: None)
    assert len(calls) == 3


# --------------------------------------------------------------------------------------------------------------
# kbatch models pull
# --------------------------------------------------------------------------------------------------------------


def test_pull_to_s3_then_stage(s3, tiny_models, tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(tiny_models["decoder"], src)
    (src / "unet/diffusion_pytorch_model.bin").write_bytes(b"a pickle that must not travel")
    (src / "notes.md").write_text("not part of the model")
    dest = f"s3://{BUCKET}/pulled/decoder"
    files = _wanted_files(tiny_models["decoder"])

    summary = ms.pull_model(str(src), dest)
    assert summary["files"] == summary["uploaded"] == len(files) and summary["skipped"] == 0
    assert summary["bytes"] == summary["total_bytes"] == sum(files.values())
    there = {p.split("/pulled/decoder/", 1)[1] for p in s3.find(f"{BUCKET}/pulled/decoder")}
    assert there == set(files) | {ms.PULL_MANIFEST}
    again = ms.pull_model(str(src), dest)
    assert again["uploaded"] == 0 and again["skipped"] == len(files) and again["bytes"] == 0

    # a fine-tune with the same shapes: same size, other bytes. Pulled again, it is uploaded (decided by
    # content, not size), and the manifest's sha256 matches what the bucket holds
    rel = "unet/diffusion_pytorch_model.safetensors"
    data = bytearray((src / rel).read_bytes())
    data[-2:] = bytes(255 - b for b in data[-2:])
    (src / rel).write_bytes(bytes(data))
    tuned = ms.pull_model(str(src), dest)
    assert tuned["uploaded"] == 1 and tuned["skipped"] == len(files) - 1
    s3.invalidate_cache()
    assert s3.cat_file(f"{BUCKET}/pulled/decoder/{rel}") == bytes(data)
    manifest = json.loads(s3.cat_file(f"{BUCKET}/pulled/decoder/{ms.PULL_MANIFEST}"))
    assert manifest["files"][rel]["sha256"] == ms.file_sha256(src / rel)
    (src / rel).write_bytes((Path(tiny_models["decoder"]) / rel).read_bytes())  # back to the original
    assert ms.pull_model(str(src), dest)["uploaded"] == 1
    s3.invalidate_cache()

    ms.check_model("models.decoder", dest, "KandinskyPipeline")
    staged = ms.stage(dest, cache_dir=str(tmp_path / "cache"))
    assert staged.files_copied == len(files)
    manifest = json.loads(s3.cat_file(f"{BUCKET}/pulled/decoder/{ms.PULL_MANIFEST}"))
    journal = json.loads((Path(staged.path) / ms.JOURNAL).read_text())
    shas = {k: v["sha256"] for k, v in manifest["files"].items()}
    assert {k: v["sha256"] for k, v in journal["files"].items()} == shas

    # a file replaced at the source by other bytes of the same size fails the manifest's sha256
    rel = "movq/diffusion_pytorch_model.safetensors"
    s3.pipe_file(f"{BUCKET}/pulled/decoder/{rel}", os.urandom(files[rel]))
    s3.invalidate_cache()
    monkeypatch.setattr(time, "sleep", lambda s: None)
    with pytest.raises(ms.ChecksumMismatch, match="sha256"):
        ms.stage(dest, cache_dir=str(tmp_path / "cache"))


# --------------------------------------------------------------------------------------------------------------
# ddpm_scheduler/ and the inpaint pipeline
# --------------------------------------------------------------------------------------------------------------


def test_tiny_models_have_ddpm_scheduler(tiny_models):
    for name in ("decoder", "inpaint"):
        cfg = json.loads((Path(tiny_models[name]) / "ddpm_scheduler/scheduler_config.json").read_text())
        assert cfg["_class_name"] == "DDPMScheduler"
    assert ((Path(tiny_models["decoder"]) / "ddpm_scheduler/scheduler_config.json").read_bytes()
            == (Path(tiny_models["inpaint"]) / "ddpm_scheduler/scheduler_config.json").read_bytes())


def test_ddpm_loads_from_the_repos_ddpm_scheduler(tiny_models, tmp_path):
    from diffusers import DDPMScheduler

    from kbatch.models.loading import load_decoder, placement

    place = placement("cpu", "float32", 1)
    own = tmp_path / "own"
    shutil.copytree(tiny_models["decoder"], own)
    path = own / "ddpm_scheduler/scheduler_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(beta_end=0.02, variance_type="learned_range")
    path.write_text(json.dumps(cfg))
    sched = load_decoder(str(own), place, scheduler="ddpm").scheduler
    assert isinstance(sched, DDPMScheduler)
    assert sched.config.beta_end == 0.02 and sched.config.variance_type == "learned_range"
    # a repo without the folder: the DDIM config with the DDPM class, as before
    shutil.rmtree(own / "ddpm_scheduler")
    sched = load_decoder(str(own), place, scheduler="ddpm").scheduler
    assert isinstance(sched, DDPMScheduler) and sched.config.beta_end == 0.012
    assert sched.config.variance_type == "fixed_small"


def test_same_weights_by_file_hash(tiny_models, tmp_path):
    dec, inp = Path(tiny_models["decoder"]), Path(tiny_models["inpaint"])
    assert ms.same_weights(dec / "text_encoder", inp / "text_encoder")
    assert ms.same_weights(dec / "movq", inp / "movq")
    assert not ms.same_weights(dec / "unet", inp / "unet")
    other = tmp_path / "text_encoder"
    shutil.copytree(dec / "text_encoder", other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor: same size, other weights
    weights.write_bytes(bytes(data))
    assert not ms.same_weights(dec / "text_encoder", other)


def _count_loads(monkeypatch):
    """Counts from_pretrained calls of the text encoder and MoVQ classes (= weights read from disk)."""
    from diffusers import VQModel
    from diffusers.pipelines.kandinsky.text_encoder import MultilingualCLIP

    counts = {"text_encoder": 0, "movq": 0}
    for name, cls in (("text_encoder", MultilingualCLIP), ("movq", VQModel)):
        real = cls.from_pretrained.__func__

        def counting(klass, *a, _name=name, _real=real, **kw):
            counts[_name] += 1
            return _real(klass, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(counting))
    return counts


def test_inpaint_loads_at_start_and_shares_modules(tiny_models, tmp_path, monkeypatch):
    from kbatch.models.decoder import DecoderPredictor

    counts = _count_loads(monkeypatch)
    pred = DecoderPredictor(tiny_models["decoder"], tiny_models["inpaint"], device="cpu", threads=1)
    assert pred._inpaint is not None  # at construction, not on the first inpaint row
    assert pred._inpaint.text_encoder is pred.pipe.text_encoder and pred._inpaint.movq is pred.pipe.movq
    assert pred._inpaint.unet is not pred.pipe.unet and pred._inpaint.unet.config.in_channels == 9
    assert counts == {"text_encoder": 1, "movq": 1}, "the inpaint pipeline read the shared weights again"

    # an inpaint folder whose text encoder differs gets its own
    other = tmp_path / "inpaint"
    shutil.copytree(tiny_models["inpaint"], other)
    weights = other / "text_encoder/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    pred = DecoderPredictor(tiny_models["decoder"], str(other), device="cpu", threads=1)
    assert pred._inpaint.text_encoder is not pred.pipe.text_encoder and pred._inpaint.movq is pred.pipe.movq


def test_bad_inpaint_model_fails_at_start(tiny_models, tmp_path):
    from kbatch.models.decoder import DecoderPredictor

    with pytest.raises(FileNotFoundError, match="no-inpaint-here"):
        DecoderPredictor(tiny_models["decoder"], str(tmp_path / "no-inpaint-here"), device="cpu", threads=1)
