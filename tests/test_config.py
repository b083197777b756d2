"""Config: YAML + --set, strict keys, errors naming key and value, templates, secrets masked."""
import datetime as dt

import pytest

from kbatch.config import ConfigError, from_dict, load_config, parse_set


def test_set_overrides_nested_keys_with_yaml_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("models: {dtype: float16}\nresources: {decoder: {replicas: 7}}\n")
    cfg = load_config(str(p), sets=["defaults.height=768", "resources.decoder.gpus=0.5", "models.compile=true",
                                    "defaults.negative_prompt=blurry, dark"], output="o", manifest="m.parquet")
    assert cfg.defaults.height == 768 and cfg.resources.decoder.gpus == 0.5 and cfg.models.compile is True
    assert cfg.resources.decoder.replicas == 7 and cfg.models.dtype == "float16"
    assert cfg.defaults.negative_prompt == "blurry, dark" and cfg.output.path == "o" and cfg.manifest == "m.parquet"
    assert parse_set(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize("data, key, shown", [
    ({"models": {"dtype": "float8"}}, "models.dtype", "'float8'"),
    ({"models": {"scheduler": "euler"}}, "models.scheduler", "'euler'"),
    ({"output": {"format": "zip"}}, "output.format", "'zip'"),
    ({"resources": {"prior": {"replicas": 0}}}, "resources.prior.replicas", "0"),
    ({"resources": {"decoder": {"gpus": 1.5}}}, "resources.decoder.gpus", "1.5"),
    ({"defaults": {"height": 500}}, "defaults.height", "500"),
    ({"defaults": {"strength": 0}}, "defaults.strength", "0"),
    ({"defaults": {"guidance_scale": float("nan")}}, "defaults.guidance_scale", "nan"),
    ({"seed": -1}, "seed", "-1"),
    ({"modles": {}}, "modles", "modles"),
    ({"resources": {"decoder": {"batchsize": 4}}}, "resources.decoder.batchsize", "4"),
    ({"output": {"path": "out/{when}"}}, "output.path", "{when}"),
    ({"resources": {"decoder": {"concurrency": 0}}}, "resources.decoder.concurrency", "0"),
    ({"resources": {"prior": {"concurrency": 2}}, "models": {"offload": True}}, "resources.prior.concurrency",
     "models.offload"),
    ({"resources": {"decoder": {"concurrency": 2}}, "models": {"compile": True}}, "resources.decoder.concurrency",
     "models.compile"),
])
def test_errors_name_key_and_value(data, key, shown):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert key in str(e.value) and shown in str(e.value), str(e.value)


def test_date_template_and_masked_secrets():
    cfg = from_dict({"output": {"path": "s3://b/nightly/{date}"}, "storage_options": {"secret": "s3cr3t"}})
    when = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.timezone.utc)
    assert cfg.resolved_output(when) == "s3://b/nightly/2026-11-26"
    assert "s3cr3t" not in str(cfg.public_dict()) and "s3cr3t" in str(cfg.to_dict())


def test_progress_logs_sparingly(capsys):
    from kbatch.run.progress import Progress

    p = Progress(100, mode="log", every=3600)
    for _ in range(99):
        p.update(1, 1)
    p.update(1, 1)  # the last row always reports
    err = capsys.readouterr().err
    assert err.count("kbatch progress") == 1 and "100/100 rows" in err


@pytest.mark.parametrize("name", ["default", "nightly", "one_gpu", "cpu"])
def test_shipped_configs_load(name):
    import os

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    assert sorted(f[:-5] for f in os.listdir(root) if f.endswith(".yaml")) == ["cpu", "default", "nightly", "one_gpu"]
    cfg = load_config(os.path.join(root, f"{name}.yaml"))
    assert cfg.output.path.endswith("{date}") and cfg.models.decoder


def test_writer_count_follows_decoder_replicas():
    from kbatch.config import writer_count

    def n(decoders, **res):
        return writer_count(from_dict({"resources": res}).resources, decoders)

    assert n(1) == 1 and n(4) == 1 and n(7) == 2
    assert n(7, writers=3) == 3
    with pytest.raises(ConfigError, match="resources.writers"):
        from_dict({"resources": {"writers": -1}})


def test_storage_the_driver_cannot_open_is_a_config_error(tmp_path):
    """An unknown protocol, or one whose fsspec package is missing (gcsfs), fails as a config error naming the
    key, before any model or Ray starts; resolving the config alone (kbatch.submit) does not look."""
    import importlib.util

    from cli_helpers import kbatch
    from kbatch.config import check_storage

    cfg = from_dict({"output": {"path": "foo://bucket/x"}, "manifest": "m.parquet"})  # resolves: submit is fine
    with pytest.raises(ConfigError, match=r"'output.path' cannot be opened here \(Protocol not known: foo\)"):
        check_storage(cfg)
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(ConfigError, match=r"'manifest' cannot be opened here \(.*gcsfs"):
            check_storage(from_dict({"output": {"path": "out"}, "manifest": "gs://bucket/m.parquet"}))
    check_storage(from_dict({"output": {"path": "memory://x"}, "manifest": "s3://b/m.parquet"}))  # installed
    (tmp_path / "c.yaml").write_text("manifest: m.parquet\noutput: {path: 'foo://bucket/x'}\n")
    p = kbatch("run", tmp_path / "c.yaml", cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and "'output.path' cannot be opened here" in p.stderr, p.stderr[-2000:]
    assert "Started a local Ray" not in p.stderr
