"""``kbatch rayjob``: the printed RayJob validates strictly (unknown fields are errors) against kbatch's own schema
of KubeRay's RayJob and, where the CRD file is present, against KubeRay's CRD itself; it is what Kueue admits
(suspended, queue label, shutdown after the job) with a GPU group at min 0 (elastic) or fixed; the ConfigMap
holds the config the job runs; bad flags and secrets in the config are exit 2 with nothing printed."""
import functools
import re

import jsonschema
import pytest
import yaml

import kbatch.cli as cli
from kbatch.config import load_config

from kuberay_schema import OWN_SCHEMA, crd_path, crd_schema


@functools.lru_cache(maxsize=None)
def _schemas():
    out = [("kbatch's schema of RayJob v1", OWN_SCHEMA)]
    path = crd_path()
    if path is not None:
        out.append((f"KubeRay CRD {path}", crd_schema(path)))
    return tuple(out)


def _config(tmp_path, extra=""):
    p = tmp_path / "job.yaml"
    p.write_text("models: {prior: sim, decoder: sim}\nmanifest: s3://bkt/prompts/*.parquet\n"
                 "output: {path: 's3://bkt/renders/{date}'}\n" + extra)
    return p


def _print(capsys, *args):
    code = cli.main(["rayjob", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _docs(text):
    config_map, rayjob = yaml.safe_load_all(text)
    return config_map, rayjob


def _validate(rayjob):
    for what, schema in _schemas():
        try:
            jsonschema.validate(rayjob, schema)
        except jsonschema.ValidationError as e:  # pragma: no cover - the message is the point
            raise AssertionError(f"invalid under {what}: {e.message} at {list(e.absolute_path)}") from None


def test_strict_schemas_refuse_unknown_fields(tmp_path, capsys):
    code, out, _ = _print(capsys, _config(tmp_path), "--queue", "q")
    assert code == 0
    _, rayjob = _docs(out)
    for where in (rayjob["spec"], rayjob["spec"]["rayClusterSpec"], rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0],
                  rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]):
        where["notAField"] = 1
        for what, schema in _schemas():
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(rayjob, schema)
        del where["notAField"]


def test_elastic_rayjob_for_kueue(tmp_path, capsys):
    code, out, err = _print(capsys, _config(tmp_path, "schedule: {priority: 2}\n"), "--queue", "user-queue",
                            "--priority-class", "nightly", "--name", "render-nightly", "--namespace", "ml",
                            "--image", "registry.example/kbatch:0.1", "--max-gpu-workers", "6")
    assert code == 0 and err == ""
    assert out.startswith("# kbatch render-nightly: output s3://bkt/renders/")
    config_map, rayjob = _docs(out)
    _validate(rayjob)
    meta, spec = rayjob["metadata"], rayjob["spec"]
    assert meta["name"] == "render-nightly" and meta["namespace"] == "ml"
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "user-queue"
    assert meta["labels"]["kueue.x-k8s.io/priority-class"] == "nightly"
    assert meta["annotations"] == {"kueue.x-k8s.io/elastic-job": "true"}
    assert spec["suspend"] is True and spec["shutdownAfterJobFinishes"] is True  # what Kueue requires
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    (gpu,) = cluster["workerGroupSpecs"]
    assert (gpu["minReplicas"], gpu["replicas"], gpu["maxReplicas"]) == (0, 0, 6)
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["image"] == "registry.example/kbatch:0.1"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    # the entrypoint reads the mounted ConfigMap, which holds the config as resolved here
    mount = head["template"]["spec"]["containers"][0]["volumeMounts"][0]
    assert spec["entrypoint"] == f"python -m kbatch.cli job --config {mount['mountPath']}/job.yaml"
    assert head["template"]["spec"]["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_map["metadata"]["namespace"] == "ml"
    job = yaml.safe_load(config_map["data"]["job.yaml"])
    assert job["output"]["path"] == "s3://bkt/renders/{date}"  # {date} is filled in when the job starts
    assert job["schedule"]["priority"] == 2
    path = tmp_path / "roundtrip.yaml"
    path.write_text(config_map["data"]["job.yaml"])
    assert load_config(str(path)).to_dict() == load_config(str(_config(tmp_path, "schedule: {priority: 2}\n"))).to_dict()


def test_fixed_gpu_group_and_storage_secret(tmp_path, capsys):
    code, out, _ = _print(capsys, _config(tmp_path), "--gpu-workers", "4", "--gpus-per-worker", "2",
                          "--storage-secret", "s3-creds", "--set", "output.format=webdataset")
    assert code == 0
    config_map, rayjob = _docs(out)
    _validate(rayjob)
    assert rayjob["spec"]["suspend"] is False  # no queue: KubeRay starts it at once
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is False and "annotations" not in rayjob["metadata"]
    (gpu,) = cluster["workerGroupSpecs"]
    assert (gpu["minReplicas"], gpu["replicas"], gpu["maxReplicas"]) == (4, 4, 4)
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    for c in (gpu["template"]["spec"]["containers"][0],
              cluster["headGroupSpec"]["template"]["spec"]["containers"][0]):
        assert c["env"] == [{"name": "KBATCH_STORAGE_OPTIONS", "valueFrom": {
            "secretKeyRef": {"name": "s3-creds", "key": "storage_options.json"}}}]
    assert yaml.safe_load(config_map["data"]["job.yaml"])["output"]["format"] == "webdataset"


@pytest.mark.parametrize("args, extra, says", [
    (["--queue", "no spaces"], "", "--queue"),
    (["--name", "Upper_Case"], "", "--name"),
    (["--gpu-workers", "0"], "", "--gpu-workers"),
    ([], "storage_options: {key: AKIA-secret-value, secret: shh}\n", "storage_options"),
    ([], "resources: {placement_timeout: -1}\n", "resources.placement_timeout"),
])
def test_refused_before_printing(tmp_path, capsys, args, extra, says):
    code, out, err = _print(capsys, _config(tmp_path, extra), *args)
    assert code == cli.EXIT_CONFIG and out == ""
    assert says in err
    assert "AKIA-secret-value" not in err and "shh" not in err  # names the keys, never the values


def test_local_paths_warned(tmp_path, capsys):
    p = tmp_path / "local.yaml"
    p.write_text("models: {prior: sim, decoder: sim}\nmanifest: /data/prompts.parquet\noutput: {path: out}\n")
    code, out, err = _print(capsys, p)
    assert code == 0 and out
    assert re.search(r"output.path 'out' is a path on the pod's own disk", err)
    assert "manifest '/data/prompts.parquet'" in err
