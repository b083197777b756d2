"""Model folders on buckets as they are (issue 25): SSE-KMS buckets (ETags that are not MD5s), pulls that never
leave a mix of two versions for staging (interrupted pull, same-size re-pull, staging during a pull), and a
node-local model cache whose cleanup touches only its own files.

A moto server on loopback stands in for S3; tests/kms_bucket.py makes its SSE-KMS objects answer with non-MD5
ETags, as S3 does. The tiny models are the weights; predictors are called directly (no Ray).
"""
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from kbatch.config import ConfigError
from kbatch.models import store as ms
from kbatch.models.store import cache as mcache
from kbatch.models.store import staging
from kbatch.models.store.sources import _fs

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
from kms_bucket import kms_bucket, kms_etags  # noqa: E402
from moto_s3 import aws_env, moto_server  # noqa: E402

KMS, PLAIN = "kbatch-kms", "kbatch-plain"
UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def s3():
    with moto_server(aws_env("AKIAKBATCHKMS00001", "kbatch-kms-secret")), kms_etags():
        fs = s3fs.S3FileSystem()
        kms_bucket(fs, KMS)
        fs.mkdir(PLAIN)
        yield fs


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr("kbatch.models.store.retries.time.sleep", lambda s: None)


def _upload(fs, folder, url):
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{url.removeprefix('s3://')}/{p.relative_to(folder).as_posix()}")
    fs.invalidate_cache()
    return url


def _wanted(folder) -> dict[str, bytes]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and ms.wanted(p.relative_to(folder).as_posix())}


def _fine_tune(src, dst) -> Path:
    """A copy of a model folder whose UNet has other weights of the same size (a fine-tune)."""
    shutil.copytree(src, dst)
    data = bytearray((dst / UNET).read_bytes())
    data[-4:] = bytes(255 - b for b in data[-4:])
    (dst / UNET).write_bytes(bytes(data))
    return dst


def _bucket_bytes(fs, url, rel) -> bytes:
    """A file of the folder at ``url`` (a bucket or a local folder), read now."""
    fs, root = _fs(url, None)
    fs.invalidate_cache()
    return fs.cat_file(f"{root.rstrip('/')}/{rel}")


# --------------------------------------------------------------------------------------------------------------
# SSE-KMS buckets
# --------------------------------------------------------------------------------------------------------------


def test_kms_bucket_stages_and_renders(s3, tiny_models, tmp_path):
    """Plain copies of the tiny models in an SSE-KMS bucket (no pull manifest): every ETag is not the content's
    MD5, HEAD says aws:kms. Staging takes them (size, and the sha256 it records) and the staged models render
    exactly what the local folders render. It failed with ChecksumMismatch on every file before."""
    from kbatch.models.decoder import DecoderPredictor
    from kbatch.models.prior import PriorPredictor
    from kbatch.schema.rows import Row

    urls = {n: _upload(s3, tiny_models[n], f"s3://{KMS}/plain/{n}") for n in ("prior", "decoder")}
    info = s3.info(f"{KMS}/plain/decoder/model_index.json", refresh=True)
    local_md5 = __import__("hashlib").md5(Path(tiny_models["decoder"], "model_index.json").read_bytes()).hexdigest()
    assert info["ETag"].strip('"') != local_md5 and len(info["ETag"].strip('"')) == 32
    head = s3.call_s3("head_object", Bucket=KMS, Key="plain/decoder/model_index.json")
    assert head["ServerSideEncryption"] == "aws:kms"

    cache = tmp_path / "cache"
    for n, url in urls.items():
        ms.check_model(f"models.{n}", url, "KandinskyPriorPipeline" if n == "prior" else "KandinskyPipeline")
    staged = ms.stage(urls["decoder"], cache_dir=str(cache))
    assert staged.files_copied == len(_wanted(tiny_models["decoder"]))
    journal = json.loads((Path(staged.path) / ms.JOURNAL).read_text())
    for rel, data in _wanted(tiny_models["decoder"]).items():
        assert journal["files"][rel]["sha256"] == __import__("hashlib").sha256(data).hexdigest()

    rows = [Row(id="a", prompt="a red fox in the snow", seed=3, height=64, width=64, num_inference_steps=3,
                prior_num_inference_steps=2)]

    def render(prior, decoder):
        return np.stack([o.images for o in decoder(rows, prior(rows))])

    want = render(PriorPredictor(tiny_models["prior"], device="cpu", threads=1),
                  DecoderPredictor(tiny_models["decoder"], device="cpu", threads=1))
    got = render(PriorPredictor(urls["prior"], device="cpu", threads=1, cache_dir=str(cache)),
                 DecoderPredictor(urls["decoder"], device="cpu", threads=1, cache_dir=str(cache)))
    np.testing.assert_array_equal(got, want)


def test_etag_counts_as_md5_only_on_unencrypted_objects(s3, tiny_models, tmp_path, monkeypatch):
    """The same corrupted download (bytes whose md5 differs from the listing's ETag): refused on a plain
    bucket, where the ETag is the MD5; on an SSE-KMS bucket the ETag proves nothing and the pull manifest's
    sha256 decides: a pulled folder still refuses it."""
    from kbatch.models.store.integrity import _source_md5, sse_reason

    md5 = "0123456789abcdef0123456789abcdef"
    assert _source_md5({"ETag": f'"{md5}"'}) == md5
    assert _source_md5({"ETag": f'"{md5}-3"'}) is None  # multipart: never an MD5
    assert _source_md5({"md5Hash": "ASNFZ4mrze8BI0VniavN7w=="}) == md5  # GCS, base64
    assert sse_reason({"ServerSideEncryption": "AES256"}) is None and sse_reason({}) is None
    assert sse_reason({"ServerSideEncryption": "aws:kms"}) == "SSE-KMS (aws:kms)"
    assert sse_reason({"ServerSideEncryption": "aws:kms:dsse"}).startswith("SSE-KMS")
    assert sse_reason({"SSECustomerAlgorithm": "AES256"}) == "SSE-C"

    real = staging._download

    def corrupting(fs, src, tmp):
        size, md5, sha = real(fs, src, tmp)
        if src.endswith("scheduler/scheduler_config.json"):
            with open(tmp, "r+b") as fh:  # one byte flipped on the way: same size
                b = fh.read(1)
                fh.seek(0)
                fh.write(bytes([b[0] ^ 1]))
            return size, "0" * 32, "0" * 64
        return size, md5, sha

    plain = _upload(s3, tiny_models["prior"], f"s3://{PLAIN}/md5/prior")
    kms = _upload(s3, tiny_models["prior"], f"s3://{KMS}/md5/prior")
    monkeypatch.setattr(staging, "_download", corrupting)
    with pytest.raises(ms.ChecksumMismatch, match="md5"):
        ms.stage(plain, cache_dir=str(tmp_path / "c1"))
    ms.stage(kms, cache_dir=str(tmp_path / "c2"))  # no manifest: size is all an SSE-KMS listing can prove
    pulled = f"s3://{KMS}/md5/pulled"
    ms.pull_model(tiny_models["prior"], pulled)
    with pytest.raises(ms.ChecksumMismatch, match="sha256"):
        ms.stage(pulled, cache_dir=str(tmp_path / "c3"))


def test_pull_to_kms_bucket_skips_by_recorded_sha_and_stages(s3, tiny_models, tmp_path):
    dest = f"s3://{KMS}/pulled/decoder"
    files = _wanted(tiny_models["decoder"])
    first = ms.pull_model(tiny_models["decoder"], dest)
    assert first["uploaded"] == len(files)
    manifest = json.loads(_bucket_bytes(s3, dest, ms.PULL_MANIFEST))
    assert manifest["state"] == "complete" and manifest["pull"]["id"] == first["pull"]
    assert all(e["version"].startswith("ETag:") for e in manifest["files"].values())
    again = ms.pull_model(tiny_models["decoder"], dest)  # ETags never equal the md5 here: the recorded sha256
    assert again["uploaded"] == 0 and again["skipped"] == len(files)
    staged = ms.stage(dest, cache_dir=str(tmp_path / "cache"))
    assert _wanted(staged.path) == files


# --------------------------------------------------------------------------------------------------------------
# Pull versions
# --------------------------------------------------------------------------------------------------------------


def _record(errors: list, fn, *args):
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 - the test asserts there was none
        errors.append(e)


class _Killed(BaseException):
    """The pull process dies here (not an Exception: nothing retries or handles it)."""


def _interrupt_after(monkeypatch, dest, rel):
    """The destination's filesystem dies right after uploading ``rel``."""
    fs = _fs(dest, None)[0]
    real = fs.put_file

    def put_file(lpath, rpath, *a, **kw):
        out = real(lpath, rpath, *a, **kw)
        if rpath.endswith(rel):
            raise _Killed(rpath)
        return out

    monkeypatch.setattr(fs, "put_file", put_file)


@pytest.mark.parametrize("where", ["kms-bucket", "local-folder"])
def test_interrupted_pull_is_refused_by_name_then_completed(s3, tiny_models, tmp_path, monkeypatch, where):
    """An interrupted pull (same-size fine-tune of a pulled model) leaves its manifest 'pulling': the start-up
    check and staging refuse the folder naming the pull; re-pulling the ORIGINAL then uploads the UNet again
    (its object is no longer the version whose sha256 the first pull recorded), never skips it by that stale
    sha256, and the folder stages as the original, byte for byte. Before: no refusal, and the re-pull to a
    folder (no MD5 in its listing) skipped the UNet by the stale sha256, leaving the fine-tune's UNet."""
    dest = f"s3://{KMS}/versions/decoder" if where == "kms-bucket" else str(tmp_path / "pulled" / "decoder")
    v1 = _wanted(tiny_models["decoder"])
    tuned = _fine_tune(tiny_models["decoder"], tmp_path / "tuned")
    ms.pull_model(tiny_models["decoder"], dest)
    with monkeypatch.context() as m:
        _interrupt_after(m, dest, UNET)
        with pytest.raises(_Killed):
            ms.pull_model(str(tuned), dest)
    manifest = json.loads(_bucket_bytes(s3, dest, ms.PULL_MANIFEST))
    pull_id = manifest["pull"]["id"]
    assert manifest["state"] == "pulling" and manifest["pull"]["source"] == str(tuned)
    assert _bucket_bytes(s3, dest, UNET) == (tuned / UNET).read_bytes()  # the bucket now holds a mix

    with pytest.raises(ConfigError, match=f"config key 'models.decoder' is '{dest}': kbatch models pull of "
                                          f"'{tuned}' \\(pull {pull_id},"):
        ms.check_model("models.decoder", dest, "KandinskyPipeline")
    with pytest.raises(ms.PullInProgress, match=f"pull {pull_id}.*run it again"):
        ms.stage(dest, cache_dir=str(tmp_path / "cache"))

    redo = ms.pull_model(tiny_models["decoder"], dest)  # back to the original, same sizes everywhere
    assert redo["uploaded"] == 1, redo  # the UNet: the stale sha256 of the first pull is not trusted
    assert _bucket_bytes(s3, dest, UNET) == v1[UNET]
    ms.check_model("models.decoder", dest, "KandinskyPipeline")
    staged = ms.stage(dest, cache_dir=str(tmp_path / "cache"))
    assert _wanted(staged.path) == v1 and staged.kind == ("url" if where == "kms-bucket" else "local")


def test_same_size_repull_uploads_the_changed_file(s3, tiny_models, tmp_path):
    """A fine-tune with the same shapes pulled over its base on an SSE-KMS bucket (no MD5 to compare): only the
    changed UNet is uploaded, and staging gets the fine-tune."""
    dest = f"s3://{KMS}/repull/decoder"
    tuned = _fine_tune(tiny_models["decoder"], tmp_path / "tuned")
    ms.pull_model(tiny_models["decoder"], dest)
    second = ms.pull_model(str(tuned), dest)
    assert second["uploaded"] == 1 and second["skipped"] == len(_wanted(tuned)) - 1
    assert _wanted(ms.stage(dest, cache_dir=str(tmp_path / "cache")).path) == _wanted(tuned)


def test_a_pulled_folder_changed_without_a_pull_is_refused(s3, tiny_models, tmp_path):
    """A file of a pulled folder replaced by hand (another size): not one version any more; staging says which
    file and what to do, instead of copying it beside the pulled rest."""
    dest = f"s3://{PLAIN}/byhand/decoder"
    ms.pull_model(tiny_models["decoder"], dest)
    rel = "scheduler/scheduler_config.json"
    s3.pipe_file(f"{PLAIN}/byhand/decoder/{rel}", Path(tiny_models["decoder"], rel).read_bytes() + b"\n")
    with pytest.raises(ms.PullInProgress, match=f"{rel} has .* bytes, .kbatch-manifest.json says .*run kbatch "
                                                "models pull again"):
        ms.stage(dest, cache_dir=str(tmp_path / "cache"))
    ms.pull_model(tiny_models["decoder"], dest)
    assert _wanted(ms.stage(dest, cache_dir=str(tmp_path / "cache")).path) == _wanted(tiny_models["decoder"])


def test_staging_during_a_pull(s3, tiny_models, tmp_path, monkeypatch, caplog):
    """A pull running while a node stages: refused by name while the pull writes; a copy that began before
    the pull and reads files the pull replaced starts again and ends as one version (the new one)."""
    dest = f"s3://{KMS}/during/decoder"
    v1 = _wanted(tiny_models["decoder"])
    tuned = _fine_tune(tiny_models["decoder"], tmp_path / "tuned")
    ms.pull_model(tiny_models["decoder"], dest)

    # 1. staging while the pull is blocked midway
    fs = _fs(dest, None)[0]
    real, entered, release = fs.put_file, threading.Event(), threading.Event()

    def slow_put(lpath, rpath, *a, **kw):
        out = real(lpath, rpath, *a, **kw)
        entered.set()
        assert release.wait(120)
        return out

    errors = []
    with monkeypatch.context() as m:
        m.setattr(fs, "put_file", slow_put)
        pull = threading.Thread(target=lambda: _record(errors, ms.pull_model, str(tuned), dest), daemon=True)
        pull.start()
        assert entered.wait(120)
        with pytest.raises(ms.PullInProgress, match=f"kbatch models pull of '{tuned}'"):
            ms.stage(dest, cache_dir=str(tmp_path / "cache"))
        with pytest.raises(ConfigError, match="is writing this folder, or was interrupted"):
            ms.check_model("models.decoder", dest, "KandinskyPipeline")
        release.set()
        pull.join(120)
    assert not pull.is_alive() and not errors, errors
    assert _wanted(ms.stage(dest, cache_dir=str(tmp_path / "cache")).path) == _wanted(tuned)

    # 2. a pull (back to the original) that runs while a copy is under way
    real_download, calls = staging._download, []

    def download(fs, src, tmp):
        calls.append(src)
        if len(calls) == 2:
            ms.pull_model(tiny_models["decoder"], dest)
        return real_download(fs, src, tmp)

    monkeypatch.setattr(staging, "_download", download)
    caplog.set_level("WARNING", logger="kbatch")
    staged = ms.stage(dest, cache_dir=str(tmp_path / "cache2"))
    assert _wanted(staged.path) == v1  # one version, never the fine-tune's UNet with the rest
    assert "changed while it was staged" in caplog.text  # the copy started again from a new listing


# --------------------------------------------------------------------------------------------------------------
# The node-local cache
# --------------------------------------------------------------------------------------------------------------


def test_default_cache_is_node_local(monkeypatch, tmp_path):
    monkeypatch.delenv("KBATCH_MODEL_CACHE", raising=False)
    path = ms.default_cache_dir()
    home = os.path.expanduser("~")
    assert not path.startswith(os.path.join(home, "")), path
    assert path.startswith(("/var/tmp/kbatch-", os.path.join(__import__("tempfile").gettempdir(), "kbatch-")))
    monkeypatch.setenv("KBATCH_MODEL_CACHE", str(tmp_path / "mine"))
    assert ms.default_cache_dir() == str(tmp_path / "mine")


def test_cleanup_touches_only_its_own_temp_files(s3, tiny_models, tmp_path):
    """Temp files in a cache folder carry host and pid: a re-stage removes those of dead processes of this
    host, and never those of another host (a cache on a shared mount), of a live process, or without both."""
    url = _upload(s3, tiny_models["prior"], f"s3://{PLAIN}/cleanup/prior")
    cache = tmp_path / "cache"
    dest = Path(ms.stage(url, cache_dir=str(cache)).path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        me = mcache.HOST
        part = "prior/x.safetensors.part"
        names = {"dead": f"{part}-{me}-{dead.pid}", "live": f"{part}-{me}-{live.pid}",
                 "other_host": f"{part}-othernode-{dead.pid}", "legacy": f"{part}-{dead.pid}",
                 "journal_tmp": f".kbatch-stage.json.tmp-{me}-{dead.pid}"}
        for rel in names.values():
            (dest / rel).write_bytes(b"partial")
        again = ms.stage(url, cache_dir=str(cache))
        assert again.path == str(dest) and again.files_copied == 0
        left = {k for k, rel in names.items() if (dest / rel).exists()}
        assert left == {"live", "other_host", "legacy"}, left
    finally:
        live.kill()
        live.wait()


_CHILD_STAGE = "import sys; from kbatch.models.store import stage; print(stage(sys.argv[1], cache_dir=sys.argv[2]).path)"


@pytest.mark.parametrize("mount", [None, ("/mnt/models", "fuse.sshfs")])
def test_old_versions_are_evicted_only_from_a_node_local_cache(s3, tiny_models, tmp_path, monkeypatch, caplog,
                                                               mount):
    """A version no process holds any more is evicted when a new one is staged, on a node-local cache; on a
    cache whose locks are per node (a network mount) it is kept: a process of another node may load it."""
    url = _upload(s3, tiny_models["prior"], f"s3://{PLAIN}/evict{bool(mount)}/prior")
    cache = tmp_path / "cache"
    child = subprocess.run([sys.executable, "-c", _CHILD_STAGE, url, str(cache)], capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    old = Path(child.stdout.strip().splitlines()[-1])
    assert old.is_dir()  # staged by a process that has exited: nobody holds it now
    rel = "scheduler/scheduler_config.json"
    s3.pipe_file(f"{url.removeprefix('s3://')}/{rel}", Path(tiny_models["prior"], rel).read_bytes() + b"\n")
    s3.invalidate_cache()
    monkeypatch.setattr(mcache.local_store, "mount_of", lambda path: mount)
    caplog.set_level("WARNING", logger="kbatch")
    new = ms.stage(url, cache_dir=str(cache))
    assert Path(new.path) != old and new.files_copied == 1
    assert old.is_dir() == bool(mount)
    assert ("whose locks are per node" in caplog.text) == bool(mount)


_CHILD_HOLDS_LOCK = """
import fcntl, os, signal, sys
fh = open(sys.argv[1], "a+")
fcntl.flock(fh, fcntl.LOCK_EX)
fh.write(f"somehost {os.getpid()}"); fh.flush()
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)  # a frozen stager: alive, holding the lock, making no progress
"""


def test_a_frozen_stager_does_not_hang_the_node(s3, tiny_models, tmp_path, monkeypatch):
    """Another process of the node holds the staging lock and is stopped: a waiter gives up after the stall
    time (no cache file changed), naming the holder, instead of waiting forever."""
    import signal

    url = _upload(s3, tiny_models["prior"], f"s3://{PLAIN}/frozen/prior")
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = cache / f"{mcache._cache_name(url)}.lock"
    child = subprocess.Popen([sys.executable, "-c", _CHILD_HOLDS_LOCK, str(lock)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        monkeypatch.setattr(mcache, "STALL_SECONDS", 1.0)
        with pytest.raises(ms.StagingStalled, match=f"host and pid: somehost {child.pid}.*no progress for 1 s"):
            ms.stage(url, cache_dir=str(cache))
    finally:
        child.send_signal(signal.SIGCONT)
        child.kill()
        child.wait()
    assert ms.stage(url, cache_dir=str(cache)).files_copied == len(_wanted(tiny_models["prior"]))  # lock gone
