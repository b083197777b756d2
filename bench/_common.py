"""Shared pieces of the benchmarks: manifests, kbatch configs, the plain-diffusers baseline, RSS polling.

Nothing here imports torch/diffusers at module level, so ``bench/cpu.py --help`` is instant.
"""
from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # kbatch importable from the working tree (GPU machine: no pip install)
    sys.path.insert(0, ROOT)

@dataclass
class Workload:
    rows: int = 256
    height: int = 64
    width: int = 64
    steps: int = 10  # decoder
    prior_steps: int = 5
    guidance: float = 4.0
    prior_guidance: float = 4.0
    seed: int = 0

    def defaults(self) -> dict:
        return {"height": self.height, "width": self.width, "num_inference_steps": self.steps,
                "guidance_scale": self.guidance, "prior_num_inference_steps": self.prior_steps,
                "prior_guidance_scale": self.prior_guidance}


# ------------------------------------------------------------------------------------------------ inputs


def prompts(n: int) -> list[str]:
    from kbatch.demo import SUBJECTS

    return [f"{SUBJECTS[i % len(SUBJECTS)]}, variation {i}" for i in range(n)]


def write_manifest(path: str, n: int) -> list[dict]:
    """``n`` text2img rows (id, prompt) as Parquet; the job defaults carry size/steps/guidance."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"id": f"row-{i:06d}", "prompt": p} for i, p in enumerate(prompts(n))]
    pq.write_table(pa.Table.from_pylist(recs), path)
    return recs


def row_seeds(recs: list[dict], job_seed: int) -> list[int]:
    """The seeds kbatch derives for these rows (so the baseline renders the very same images)."""
    from kbatch.schema.rows import derive_seed

    return [derive_seed(job_seed, r["id"]) for r in recs]


def kbatch_config(models: dict, manifest: str, output: str, wl: Workload, *, dtype: str = "float32",
                  device: str = "cpu", prior: dict | None = None, decoder: dict | None = None,
                  io_cpus: float = 0.25, rows_per_shard: int = 64, max_in_flight: int = 2,
                  gallery: bool = False, extra: dict | None = None) -> dict:
    cfg = {
        "models": {"prior": models["prior"], "decoder": models["decoder"], "inpaint": models["inpaint"],
                   "dtype": dtype},
        "manifest": manifest,
        "output": {"path": output, "rows_per_shard": rows_per_shard, "gallery": gallery},
        "seed": wl.seed,
        "resources": {"prior": prior or {}, "decoder": decoder or {}, "device": device, "io_cpus": io_cpus,
                      "max_in_flight": max_in_flight},
        "defaults": wl.defaults(),
        "progress": "off",
    }
    if extra:
        from kbatch.config import deep_merge

        cfg = deep_merge(cfg, extra)
    return cfg


def write_yaml(path: str, data: dict) -> str:
    import yaml

    with open(path, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
    return path


def ray_env(tmp: str, kbatch_path: str | None = None, extra: dict | None = None) -> dict:
    """Environment for a ``kbatch run`` subprocess: no token auth, Ray files in ``tmp``, no usage stats.
    ``kbatch_path``: a folder holding another ``kbatch`` package (a patched copy) to run instead."""
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=tmp, RAY_USAGE_STATS_ENABLED="0",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    path = [p for p in (kbatch_path, ROOT, env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.pop("RAY_ADDRESS", None)
    env.update(extra or {})
    return env


# ------------------------------------------------------------------------------------------------ RSS


def _group(title: str, name: str, pid: int, root_pid: int) -> str:
    """Group label of a process: Ray's process title (``ray::PriorWorker.run`` -> ``ray::PriorWorker``)."""
    if pid == root_pid:
        return "driver (kbatch run)"
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]
    if "default_worker.py" in title:
        return "ray::(worker starting)"
    if name in ("raylet", "gcs_server"):
        return name
    for word in title.split():
        if word.endswith(".py"):
            return os.path.basename(word)
    return name or title[:40]


_GENERIC = ("ray::IDLE", "ray::(worker starting)")


@dataclass
class ProcPeak:
    group: str
    peak_rss: int = 0
    cpu_s: float = 0.0  # user + system CPU seconds at the last sample


class Poller:
    """Calls ``self._sample()`` every ``interval`` s on a daemon thread while used as a context manager."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self):
        raise NotImplementedError

    def _loop(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class RssPoller(Poller):
    """Polls the RSS of a process tree every ``interval`` s; keeps each pid's peak and its Ray role.

    A Ray worker's title changes with what it runs (``ray::IDLE`` -> ``ray::write_shard`` -> ``ray::IDLE``);
    a pid is labelled by the first non-IDLE role seen. RSS counts shared pages (torch libs, object-store
    mmap) in every process that touched them, so the sum over processes overstates the machine's use.
    """

    def __init__(self, root_pid: int, interval: float = 0.2):
        try:
            import psutil
        except ImportError:  # the GPU machine: Ray vendors psutil in ray/thirdparty_files
            import ray  # noqa: F401  (puts thirdparty_files on sys.path)
            import psutil

        super().__init__(interval)
        self.psutil = psutil
        self.root_pid = root_pid
        self.procs: dict[int, ProcPeak] = {}

    def _sample(self):
        ps = self.psutil
        try:
            root = ps.Process(self.root_pid)
            tree = [root] + root.children(recursive=True)
        except ps.Error:
            return
        for p in tree:
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    ct = p.cpu_times()
                    cmd = p.cmdline()
                    name = p.name()
            except ps.Error:
                continue
            title = " ".join(cmd) if cmd else name
            g = _group(title, name, p.pid, self.root_pid)
            pp = self.procs.setdefault(p.pid, ProcPeak(g))
            if g not in _GENERIC and (pp.group in _GENERIC or (g.startswith("ray::")
                                                              and not pp.group.startswith("ray::"))):
                pp.group = g  # labelled by the first real role (Ray sets titles after the process starts)
            pp.peak_rss = max(pp.peak_rss, rss)
            pp.cpu_s = max(pp.cpu_s, ct.user + ct.system)

    def by_group(self) -> dict[str, tuple[int, int, float]]:
        """group -> (process count, max peak RSS bytes over its processes, CPU seconds summed)."""
        out: dict[str, tuple[int, int, float]] = {}
        for pp in self.procs.values():
            n, m, c = out.get(pp.group, (0, 0, 0.0))
            out[pp.group] = (n + 1, max(m, pp.peak_rss), c + pp.cpu_s)
        return out


def self_peak_rss() -> int:
    """Peak RSS of this process in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------------ running


@dataclass
class Timed:
    name: str
    seconds: float
    images: int
    load_before: float = 0.0
    load_after: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def ips(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def run_kbatch(config_path: str, output: str, tmp: str, *, sets: list[str] | None = None, poll: bool = True,
               timeout: float = 900, log_path: str | None = None, kbatch_path: str | None = None,
               env_extra: dict | None = None) -> tuple[float, int, "RssPoller | None", str]:
    """``kbatch run CONFIG --output OUT --progress off`` as a subprocess, timed wall-clock (Python start,
    imports, Ray start, model load, render, write, Ray shutdown). Returns (seconds, exit code, poller, log)."""
    import shutil

    exe = shutil.which("kbatch")  # the console script, as a user runs it; else the module (GPU machine)
    cmd = ([exe] if exe else [sys.executable, "-m", "kbatch.cli"]) + [
        "run", config_path, "--output", output, "--progress", "off"]
    for s in sets or []:
        cmd += ["--set", s]
    env = ray_env(tmp, kbatch_path, env_extra)
    t0 = time.perf_counter()
    with open(log_path or os.devnull, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
        poller = RssPoller(proc.pid) if poll else None
        if poller:
            poller.__enter__()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        finally:
            if poller:
                poller.__exit__(None, None, None)
    seconds = time.perf_counter() - t0
    text = open(log_path).read() if log_path else ""
    return seconds, rc, poller, text


class RayHead:
    """``ray start --head --block`` in its own session (so stopping it never touches another Ray on the
    machine): the cluster a ``kbatch run`` with RAY_ADDRESS connects to, as on a real cluster."""

    def __init__(self, num_cpus: int, env: dict | None = None, timeout: float = 60):
        import socket
        import tempfile

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.tmp = tempfile.mkdtemp(prefix="kbh-", dir="/tmp")
        self.address = f"127.0.0.1:{port}"
        cmd = ["ray", "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
               "--include-dashboard=false", f"--temp-dir={self.tmp}", "--node-ip-address=127.0.0.1"]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=ray_env(self.tmp, extra=env), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        probe = "import ray; ray.init(address=%r); ray.shutdown()" % self.address
        while subprocess.run([sys.executable, "-c", probe], env=ray_env(self.tmp, extra=env),
                             capture_output=True).returncode != 0:
            if time.perf_counter() - t0 > timeout or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"ray start --head did not come up: {' '.join(cmd)}")
            time.sleep(0.5)
        self.seconds = time.perf_counter() - t0

    def stop(self):
        import shutil
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def job_result(output: str) -> dict:
    """The ``result`` kbatch wrote into ``OUTPUT/_job.json`` (stage seconds, memory per stage, ...)."""
    import json

    try:
        with open(os.path.join(output, "_job.json")) as fh:
            return json.load(fh).get("result") or {}
    except (OSError, ValueError):
        return {}


def loadavg() -> float:
    return os.getloadavg()[0]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "diffusers", "transformers", "ray"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = "missing"
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu})"


# ------------------------------------------------------------------------------------------------ baseline


def load_pipelines(models: dict, device: str = "cpu", dtype=None):
    """Plain diffusers: ``KandinskyPriorPipeline`` + ``KandinskyPipeline`` from the model folders."""
    import torch
    from diffusers import KandinskyPipeline, KandinskyPriorPipeline

    dtype = dtype or torch.float32
    prior = KandinskyPriorPipeline.from_pretrained(models["prior"], dtype=dtype, use_safetensors=True)
    decoder = KandinskyPipeline.from_pretrained(models["decoder"], dtype=dtype, use_safetensors=True)
    prior.set_progress_bar_config(disable=True)
    decoder.set_progress_bar_config(disable=True)
    return prior.to(device), decoder.to(device)


def diffusers_batches(prior, decoder, texts: list[str], seeds: list[int], wl: Workload, batch: int,
                      out_dir: str | None, stats: dict | None = None) -> int:
    """The plain loop: per batch one prior call and one decoder call with one generator per row (the
    same per-row generator handed from prior to decoder, as KandinskyCombinedPipeline does), PIL out,
    PNGs saved to ``out_dir``. Returns the number of images.

    ``stats`` (optional) accumulates seconds per part (prior, decoder, png) and, on CUDA, the peak memory
    allocated during each pipeline call (GiB; both pipelines' weights are resident)."""
    import torch

    cuda = decoder.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def peak(key):
        if cuda and stats is not None:
            stats[key] = max(stats.get(key, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            torch.cuda.reset_peak_memory_stats()

    n = 0
    for s in range(0, len(texts), batch):
        p, sd = texts[s:s + batch], seeds[s:s + batch]
        gens = [torch.Generator("cpu").manual_seed(x) for x in sd]
        t0 = time.perf_counter()
        if cuda and stats is not None:
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            pr = prior(prompt=p, num_inference_steps=wl.prior_steps, guidance_scale=wl.prior_guidance,
                       generator=gens, output_type="pt")
            sync()
            t1 = time.perf_counter()
            peak("prior_peak_gib")
            images = decoder(prompt=p, image_embeds=pr.image_embeds,
                             negative_image_embeds=pr.negative_image_embeds, height=wl.height, width=wl.width,
                             num_inference_steps=wl.steps, guidance_scale=wl.guidance, generator=gens,
                             output_type="pil").images
            sync()
            peak("decoder_peak_gib")
        t2 = time.perf_counter()
        if out_dir:
            for k, img in enumerate(images):
                img.save(os.path.join(out_dir, f"{s + k:06d}.png"))
        if stats is not None:
            sample = stats.setdefault("sample", [])  # two images per call, for output checks (bench/gpu.py)
            if len(sample) < 64:
                import numpy as np

                sample += [np.asarray(img) for img in images[:2]]
            stats["prior_s"] = stats.get("prior_s", 0.0) + t1 - t0
            stats["decoder_s"] = stats.get("decoder_s", 0.0) + t2 - t1
            stats["png_s"] = stats.get("png_s", 0.0) + time.perf_counter() - t2
        n += len(images)
    return n


def quiet_libs():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        dlog.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
