"""Strict JSON schemas for the RayJob ``kbatch rayjob`` prints.

``crd_schema()`` turns a KubeRay CRD (``ray.io_rayjobs.yaml`` of ray-project/kuberay) into a strict JSON schema:
its ``v1`` ``openAPIV3Schema`` with ``additionalProperties: false`` added to every object that lists
``properties`` (Kubernetes prunes unknown fields silently; here they are errors). The CRD is read from
``$KBATCH_KUBERAY_CRD``, or from ``kuberay/ray.io_rayjobs.yaml`` in the project's shared folder beside the
repository.

``OWN_SCHEMA`` is kbatch's own strict schema of every RayJob field it writes, with the types KubeRay's API
gives them (RayJob v1: spec, rayClusterSpec, head and worker groups, core/v1 PodSpec parts); unknown fields
anywhere are errors. Tests validate against the CRD where one is found and against this schema always.
"""
from __future__ import annotations

import copy
import os
import pathlib

import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent


def crd_path() -> pathlib.Path | None:
    for p in (os.environ.get("KBATCH_KUBERAY_CRD"), REPO.parent / "shared" / "kuberay" / "ray.io_rayjobs.yaml"):
        if p and pathlib.Path(p).is_file():
            return pathlib.Path(p)
    return None


def strict(schema):
    """A copy of an OpenAPI v3 schema where every object listing ``properties`` refuses unknown fields
    (objects marked ``x-kubernetes-preserve-unknown-fields`` keep them)."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    return s


def crd_schema(path: pathlib.Path) -> dict:
    crd = yaml.safe_load(path.read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayJob", path
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(v1["schema"]["openAPIV3Schema"])


def _obj(required=(), **props):
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


_STR = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"}]}
_CONTAINER = _obj(
    ["name"], name=_STR, image=_STR,
    resources=_obj(requests={"type": "object", "additionalProperties": _QUANTITY},
                   limits={"type": "object", "additionalProperties": _QUANTITY}),
    env={"type": "array", "items": _obj(["name"], name=_STR, value=_STR, valueFrom=_obj(
        secretKeyRef=_obj(["key"], name=_STR, key=_STR, optional=_BOOL)))},
    volumeMounts={"type": "array", "items": _obj(["mountPath", "name"], name=_STR, mountPath=_STR, readOnly=_BOOL)},
)
_POD_TEMPLATE = _obj(spec=_obj(
    ["containers"], containers={"type": "array", "items": _CONTAINER, "minItems": 1},
    volumes={"type": "array", "items": _obj(["name"], name=_STR, configMap=_obj(name=_STR))},
))
OWN_SCHEMA = _obj(
    ["apiVersion", "kind", "metadata", "spec"],
    apiVersion={"const": "ray.io/v1"}, kind={"const": "RayJob"},
    metadata=_obj(["name"], name=_STR, namespace=_STR, labels=_STR_MAP, annotations=_STR_MAP),
    spec=_obj(
        ["entrypoint", "rayClusterSpec"],
        entrypoint=_STR, suspend=_BOOL, shutdownAfterJobFinishes=_BOOL, ttlSecondsAfterFinished=_INT,
        rayClusterSpec=_obj(
            ["headGroupSpec"],
            rayVersion=_STR, enableInTreeAutoscaling=_BOOL,
            autoscalerOptions=_obj(idleTimeoutSeconds=_INT),
            headGroupSpec=_obj(["template"], rayStartParams=_STR_MAP, template=_POD_TEMPLATE),
            workerGroupSpecs={"type": "array", "maxItems": 7, "items": _obj(
                ["groupName", "maxReplicas", "minReplicas", "template"], groupName=_STR,
                replicas=_INT, minReplicas=_INT, maxReplicas=_INT, rayStartParams=_STR_MAP,
                template=_POD_TEMPLATE)},
        ),
    ),
)
