"""Shared fixtures: tiny model folders (built once per session) and one local Ray with 2 CPUs."""
import os
import shutil
import tempfile

import numpy as np
import pytest

# Tests keep Ray's files in their own temp dir and don't write ~/.ray/auth_token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from kbatch.models.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray (2 CPUs) shared by the tests that need one; shut down at the end."""
    import ray

    tmp = tempfile.mkdtemp(prefix="kbt-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def sim_models(decoder_seconds=0.0, prior_seconds=0.0):
    """``models`` for tiny_config with the simulated models (docs/clusters.md, simulated models): for tests of the driver's mechanics
    (faults, placement, accounting), where the pixels do not matter and loading torch per actor is waste."""
    return {"prior": "sim", "decoder": "sim",
            "sim": {"decoder_seconds_per_image": decoder_seconds, "prior_seconds_per_image": prior_seconds}}


def tiny_config(model_dirs, out_path, **over):
    """A job config for the tiny models: 64x64, few steps, CPU-sized resources."""
    from kbatch.config import deep_merge

    base = {
        "models": {**model_dirs, "dtype": "float32"},
        "output": {"path": str(out_path), "rows_per_shard": 4, "gallery": False},
        "seed": 0,
        # explicit layout (not the CPU auto layout): one process per stage, one batch at a time
        "resources": {"prior": {"replicas": 1, "gpus": 0, "cpus": 0.5, "batch_size": 4},
                      "decoder": {"replicas": 1, "gpus": 0, "cpus": 0.5, "batch_size": 4, "threads": 1,
                                  "concurrency": 1},
                      "device": "cpu", "io_cpus": 0.25, "colocate": False},
        "defaults": {"height": 64, "width": 64, "num_inference_steps": 4, "guidance_scale": 4.0,
                     "prior_num_inference_steps": 3, "prior_guidance_scale": 4.0, "strength": 0.5},
        "progress": "off",
    }
    return deep_merge(base, over)


def assert_pixels_close(a, b, what=""):
    """docs/manifest.md, reproducing an image: each channel within 2/255 and at most 1% of values differing."""
    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} != {b.shape}"
    d = np.abs(a - b)
    assert d.max() <= 2 and (d > 0).mean() <= 0.01, f"{what}: max diff {d.max()}, {(d > 0).mean():.3%} differ"
