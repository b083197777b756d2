"""``kbatch rayjob``: one kbatch job as a KubeRay RayJob (a cluster of its own), queued by Kueue.

Where every job gets its own RayCluster, the queue is Kubernetes' (Kueue), not kbatch's coordinator: the
RayJob is printed suspended with Kueue's queue label, so Kueue admits it when its quota allows, and its
cluster is deleted when the job ends. docs/clusters.md ("One cluster per job: KubeRay and Kueue") says when to
use this and when to share one cluster between jobs (`kbatch jobs`).

What is printed, as two YAML documents:

* a ``ConfigMap`` ``<name>-config`` holding the resolved job config (``job.yaml``: the config file with
  ``--set``, ``--manifest`` and ``--output`` applied). A config with ``storage_options`` is refused: a
  ConfigMap is plain text to whoever reads the namespace; credentials go in a Secret (``--storage-secret``,
  read as ``KBATCH_STORAGE_OPTIONS``) or in the pods' own cloud identity.
* the ``RayJob``: entrypoint ``python -m kbatch.cli job --config /etc/kbatch/job.yaml`` (the same job as
  ``kbatch run``, with the exit-code line ``kbatch submit`` reads), ``suspend: true`` and
  ``shutdownAfterJobFinishes: true`` (Kueue requires both), a head for the driver and the writers (no GPU),
  and one GPU worker group.

The GPU group, two ways:

* elastic (default): ``minReplicas: 0``, ``replicas: 0``, ``maxReplicas: N``, in-tree autoscaling on and
  Kueue's ``kueue.x-k8s.io/elastic-job`` annotation. kbatch's pending replicas are the demand, so the cluster
  grows to what the job can use and shrinks in its tail (docs/clusters.md "Autoscaling"). Needs Kueue's
  ElasticJobsViaWorkloadSlices feature gate; without it Kueue requires autoscaling off.
* fixed (``--gpu-workers N``): ``N`` GPU pods admitted together (gang), autoscaling off: what Kueue accepts
  without feature gates.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

import yaml

from kbatch.config import ConfigError, JobConfig

CONFIG_MOUNT = "/etc/kbatch"
CONFIG_KEY = "job.yaml"
STORAGE_SECRET_KEY = "storage_options.json"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"  # a Kueue WorkloadPriorityClass
ELASTIC_ANNOTATION = "kueue.x-k8s.io/elastic-job"
NAME_MAX = 40  # KubeRay derives RayCluster, pod and service names from it: keep room for their suffixes
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")


@dataclasses.dataclass
class RayJobOptions:
    """How the job's cluster is shaped (``kbatch rayjob`` flags)."""

    name: str = "kbatch"
    namespace: str | None = None
    image: str = "kbatch:latest"  # an image with kbatch (and its Ray) installed: docs/clusters.md
    queue: str | None = None  # Kueue LocalQueue
    priority_class: str | None = None  # Kueue WorkloadPriorityClass
    max_gpu_workers: int = 8  # elastic: the most GPU pods
    gpu_workers: int | None = None  # fixed: exactly this many GPU pods, autoscaling off
    gpus_per_worker: int = 1
    worker_cpus: str = "8"
    worker_memory: str = "64Gi"
    head_cpus: str = "4"  # the driver, the writers (0.25 CPU each) and input loading
    head_memory: str = "16Gi"
    storage_secret: str | None = None  # a Secret with key storage_options.json -> KBATCH_STORAGE_OPTIONS
    idle_timeout_s: int = 60  # elastic: how long an idle GPU pod is kept
    ttl_after_finished_s: int = 300


def _check(cond: bool, flag: str, value: Any, what: str) -> None:
    if not cond:
        raise ConfigError(f"kbatch rayjob {flag} {what}, got {value!r}")


def check_options(o: RayJobOptions) -> None:
    """Every flag checked before anything is printed (exit 2 naming the flag and the value)."""
    _check(bool(_NAME.match(o.name)) and len(o.name) <= NAME_MAX, "--name", o.name,
           f"must be lowercase letters, digits and '-', start and end with a letter or digit, at most {NAME_MAX} "
           "characters")
    if o.namespace is not None:
        _check(bool(_NAME.match(o.namespace)) and len(o.namespace) <= 63, "--namespace", o.namespace,
               "must be a Kubernetes namespace name")
    for flag, value in (("--queue", o.queue), ("--priority-class", o.priority_class)):
        if value is not None:
            _check(bool(value) and bool(_LABEL_VALUE.match(value)), flag, value,
                   "must be a Kubernetes label value (letters, digits, '-', '_', '.'; at most 63 characters)")
    _check(bool(o.image) and not any(c.isspace() for c in o.image), "--image", o.image, "must be an image name")
    _check(o.max_gpu_workers >= 1, "--max-gpu-workers", o.max_gpu_workers, "must be >= 1")
    if o.gpu_workers is not None:
        _check(o.gpu_workers >= 1, "--gpu-workers", o.gpu_workers, "must be >= 1")
    _check(o.gpus_per_worker >= 1, "--gpus-per-worker", o.gpus_per_worker, "must be >= 1")
    for flag, value in (("--worker-cpus", o.worker_cpus), ("--worker-memory", o.worker_memory),
                        ("--head-cpus", o.head_cpus), ("--head-memory", o.head_memory)):
        _check(bool(_QUANTITY.match(str(value))), flag, value, "must be a Kubernetes quantity (e.g. 8, 500m, 64Gi)")
    if o.storage_secret is not None:
        _check(bool(_NAME.match(o.storage_secret)), "--storage-secret", o.storage_secret, "must be a Secret name")


def job_yaml(cfg: JobConfig) -> str:
    """The resolved config as the pods read it. ``storage_options`` are refused: they would be plain text in a
    ConfigMap (pass them with ``--storage-secret``)."""
    if cfg.storage_options:
        raise ConfigError(f"storage_options has keys {sorted(cfg.storage_options)}: a RayJob's config is a "
                          "ConfigMap anyone who reads the namespace can read; put them in a Secret (key "
                          f"{STORAGE_SECRET_KEY}, a JSON object) and pass --storage-secret NAME, or give the pods "
                          "a cloud identity")
    d = cfg.to_dict()
    d.pop("storage_options", None)
    return yaml.safe_dump(d, sort_keys=False)


def _container(name: str, o: RayJobOptions, cpus: str, memory: str, gpus: int = 0) -> dict:
    limits = {"cpu": cpus, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    c: dict[str, Any] = {"name": name, "image": o.image,
                         "resources": {"requests": dict(limits), "limits": limits}}
    if o.storage_secret:
        from kbatch.api import STORAGE_OPTIONS_ENV

        c["env"] = [{"name": STORAGE_OPTIONS_ENV,
                     "valueFrom": {"secretKeyRef": {"name": o.storage_secret, "key": STORAGE_SECRET_KEY}}}]
    return c


def build(cfg: JobConfig, o: RayJobOptions) -> list[dict]:
    """``[ConfigMap, RayJob]`` for this config (validated first: a config error is exit 2, nothing printed)."""
    from kbatch.config import validate_config

    import ray

    check_options(o)
    validate_config(cfg)
    config_text = job_yaml(cfg)
    meta_ns = {"namespace": o.namespace} if o.namespace else {}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{o.name}-config", **meta_ns, "labels": {"app.kubernetes.io/name": "kbatch"}},
                  "data": {CONFIG_KEY: config_text}}

    head = _container("ray-head", o, o.head_cpus, o.head_memory)
    head["volumeMounts"] = [{"name": "kbatch-config", "mountPath": CONFIG_MOUNT, "readOnly": True}]
    elastic = o.gpu_workers is None
    n = o.gpu_workers or 0
    worker_group = {
        "groupName": "gpu",
        "replicas": 0 if elastic else n,
        "minReplicas": 0 if elastic else n,
        "maxReplicas": o.max_gpu_workers if elastic else n,
        "rayStartParams": {},  # GPUs come from the nvidia.com/gpu limit
        "template": {"spec": {"containers": [
            _container("ray-worker", o, o.worker_cpus, o.worker_memory, gpus=o.gpus_per_worker)]}},
    }
    cluster: dict[str, Any] = {
        "rayVersion": ray.__version__,
        "enableInTreeAutoscaling": elastic,
        "headGroupSpec": {
            # no GPU on the head: the driver and writers run there, the model stages on the GPU group
            "rayStartParams": {"num-gpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {"spec": {"containers": [head],
                                  "volumes": [{"name": "kbatch-config",
                                               "configMap": {"name": config_map["metadata"]["name"]}}]}},
        },
        "workerGroupSpecs": [worker_group],
    }
    if elastic:
        cluster["autoscalerOptions"] = {"idleTimeoutSeconds": o.idle_timeout_s}
    labels = {"app.kubernetes.io/name": "kbatch"}
    if o.queue:
        labels[QUEUE_LABEL] = o.queue
    if o.priority_class:
        labels[PRIORITY_LABEL] = o.priority_class
    metadata: dict[str, Any] = {"name": o.name, **meta_ns, "labels": labels}
    if elastic:
        metadata["annotations"] = {ELASTIC_ANNOTATION: "true"}
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": metadata,
        "spec": {
            "entrypoint": f"python -m kbatch.cli job --config {CONFIG_MOUNT}/{CONFIG_KEY}",
            # Kueue admits a suspended job (it unsuspends it); without a queue the job starts at once
            "suspend": bool(o.queue),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": o.ttl_after_finished_s,
            "rayClusterSpec": cluster,
        },
    }
    return [config_map, rayjob]


def render(cfg: JobConfig, o: RayJobOptions) -> str:
    """The printed text: a comment saying what it is, then the two documents."""
    docs = build(cfg, o)
    mode = (f"elastic GPU group (0..{o.max_gpu_workers} pods; needs Kueue's ElasticJobsViaWorkloadSlices)"
            if o.gpu_workers is None else f"fixed GPU group of {o.gpu_workers} pods")
    head = (f"# kbatch {o.name}: output {cfg.resolved_output()}; {mode}\n"
            f"# kubectl apply -f this file (the ConfigMap first); docs/clusters.md\n")
    return head + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's job.yaml) as literal blocks, readable in the printed file."""


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def warnings_for(cfg: JobConfig) -> list[str]:
    """What will not work in pods although the config is valid: local paths are the pod's own disk."""
    out = []
    for key, value in (("output.path", cfg.output.path), ("manifest", cfg.manifest)):
        scheme = str(value).partition("://")[0].lower() if "://" in str(value) else "file"
        if value and scheme in ("file", "local", "memory"):
            out.append(f"{key} {value!r} is a path on the pod's own disk (gone with the pod): use s3:// or gs://, "
                       "or mount a shared volume at that path")
    return out


def main(cfg: JobConfig, o: RayJobOptions) -> str:
    text = render(cfg, o)
    for w in warnings_for(cfg):
        print(f"kbatch: warning: {w}", file=sys.stderr)
    return text
