"""What the cluster can become: the node types Ray's autoscaler may launch, and what it is launching now.

A cluster that scales from zero (KubeRay GPU worker groups at ``minReplicas: 0``, cluster-launcher node types
at ``min_workers: 0``) has no GPU alive when a job starts. The layout and the ``replicas: auto`` targets are
chosen from ``ClusterShape``: the alive nodes *and* the nodes the autoscaler can still add
(:meth:`ClusterShape.can_add`), so such a cluster gets the GPU layout and its pools ask for the replicas the
node types hold. Those replicas, pending, are the demand: Ray's autoscaler (v1 and v2) launches nodes for
actors that cannot be placed, and stops when they are placed or removed. kbatch therefore makes no standing
``request_resources`` call, which would outlive the job on a crash (ray issue 51559): what it asks for dies
with its actors, at the end, on errors, on SIGTERM, and with the driver's process (Ray kills a driver's
actors when it exits). A standing request would also be the cluster's, not the job's: clearing it at the end
(``request_resources(bundles=[])``) would erase another job's.

Where the node types come from, first found wins (:func:`read_cluster_shape`):

1. Ray's own record, ``ClusterConfig`` in the GCS (``ray._private.state.state.get_cluster_config()``), where
   an autoscaler reports its node groups (resources, min/max count).
2. KubeRay: the RayCluster custom resource, read from the Kubernetes API with the pod's service account
   (KubeRay gives the head pod one that may read it when in-tree autoscaling is on) and turned into node types
   by Ray's own KubeRay code (``ray.autoscaler._private.kuberay.autoscaling_config``).
3. The cluster launcher / ``ray start --autoscaling-config=FILE``: the config file of the autoscaler monitor
   of this Ray session (found by its command line on the driver's node: the head, where ``ray job submit``
   runs entrypoints; a driver elsewhere does not see it).

None found: the cluster is what is alive (no autoscaler, or one kbatch cannot read: the pools still grow as
nodes join). What the autoscaler is doing (nodes being launched, per node type) is read from its status:
``ray.autoscaler.v2.sdk.get_cluster_status`` under autoscaler v2, the monitor's status in the GCS KV under v1.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

log = logging.getLogger("kbatch")

HEAD_TYPES = ("ray.head.default", "headgroup")  # the head type names of the cluster launcher and KubeRay
STATUS_EVERY = 2.0  # seconds between reads of the autoscaler's status
UNBOUNDED = 1 << 16  # a node type without a max count


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict  # what one node of this type gives Ray: {"CPU": .., "GPU": .., ...}
    min_workers: int = 0
    max_workers: int = UNBOUNDED


def _fits(demand: dict, have: dict) -> int:
    counts = [math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in demand.items() if v > 0]
    return max(0, min(counts)) if counts else 1 << 20


@dataclass
class ClusterShape:
    """The worker node types an autoscaler can launch (the head type excluded), and where they were read."""

    node_types: tuple = ()
    source: str = ""  # "" when there is no autoscaler kbatch can read
    max_workers: int = UNBOUNDED  # the cluster-wide cap on worker nodes, where the config has one

    @property
    def autoscaling(self) -> bool:
        return any(t.max_workers > 0 for t in self.node_types)

    def max_resources(self) -> dict:
        """What every node type at its max count adds to the cluster ({"GPU": 6.0, ...})."""
        out: dict = {}
        for t in self.node_types:
            n = min(t.max_workers, self.max_workers)
            for k, v in t.resources.items():
                out[k] = out.get(k, 0.0) + v * n
        return out

    def type_of(self, node: dict, mapping: dict | None = None) -> str | None:
        """The node type of an alive node (a ``ray.nodes()`` entry): the autoscaler's own mapping, a label,
        else the type whose CPU and GPU it has."""
        for key in (node.get("NodeID"), node.get("NodeManagerAddress")):  # v2: node ids; v1: IPs
            if mapping and key in mapping:
                return mapping[key]
        labels = node.get("Labels") or {}
        for key in ("ray.io/node-group", "ray.io/node-type", "ray.io/group"):
            if labels.get(key) in {t.name for t in self.node_types}:
                return labels[key]
        res = node.get("Resources", {})
        for t in self.node_types:
            if all(abs(res.get(k, 0.0) - t.resources.get(k, 0.0)) < 1e-6 for k in ("CPU", "GPU")):
                return t.name
        return None

    def can_add(self, alive: list[dict], mapping: dict | None = None) -> list[dict]:
        """The nodes the autoscaler can still launch, as ``ray.nodes()``-like entries (``"Virtual": True``):
        per node type, its max count less its alive nodes; in all, at most the cluster's max workers less the
        alive workers. Appended to the alive nodes, they are the cluster as it can become."""
        if not self.node_types:
            return []
        count: dict = {}
        workers = 0
        names = {t.name for t in self.node_types}
        for n in alive:
            t = self.type_of(n, mapping)
            if t in names:  # not the head
                count[t] = count.get(t, 0) + 1
                workers += 1
        room = max(0, self.max_workers - workers)
        out = []
        for t in self.node_types:
            for i in range(max(0, min(t.max_workers, 64) - count.get(t.name, 0))):  # 64: enough to size pools
                if room <= 0:
                    return out
                room -= 1
                out.append({"NodeID": f"{t.name}#{i}", "Alive": True, "Virtual": True, "NodeType": t.name,
                            "Resources": dict(t.resources)})
        return out

    def describe(self) -> dict:
        return {"source": self.source, "node_types": {t.name: {"resources": {k: v for k, v in t.resources.items()
                                                                                if k in ("CPU", "GPU")},
                                                                  "min": t.min_workers, "max": t.max_workers}
                                                       for t in self.node_types}}


# ------------------------------------------------------------------------------------------- reading it
def shape_from_config(config: dict, source: str) -> ClusterShape:
    """A cluster-launcher / autoscaler config (``available_node_types``) as a ``ClusterShape``."""
    types = []
    head = config.get("head_node_type")
    for name, t in (config.get("available_node_types") or {}).items():
        if name == head or name in HEAD_TYPES:
            continue
        res = {k: float(v) for k, v in (t.get("resources") or {}).items() if isinstance(v, (int, float))}
        types.append(NodeType(name, res, int(t.get("min_workers", 0) or 0),
                              int(t.get("max_workers", config.get("max_workers", UNBOUNDED)) or 0)))
    cap = config.get("max_workers")
    return ClusterShape(tuple(types), source, int(cap) if isinstance(cap, int) and cap >= 0 else UNBOUNDED)


def shape_from_gcs_config(cc) -> ClusterShape:
    """Ray's ``autoscaler_pb2.ClusterConfig`` (node group configs) as a ``ClusterShape``."""
    types = []
    for g in cc.node_group_configs:
        res = {k: float(v) for k, v in g.resources.items()}
        if g.max_count == 0 or (g.name in HEAD_TYPES):
            continue
        types.append(NodeType(g.name or f"group{len(types)}", res, int(g.min_count),
                              UNBOUNDED if g.max_count < 0 else int(g.max_count)))
    return ClusterShape(tuple(types), "ray cluster config (GCS)")


def _from_gcs() -> ClusterShape | None:
    from ray._private.state import state

    cc = state.get_cluster_config()
    if cc is None or not cc.node_group_configs:
        return None
    shape = shape_from_gcs_config(cc)
    return shape if shape.node_types else None


def _from_kuberay() -> ClusterShape | None:
    name = os.environ.get("RAY_CLUSTER_NAME")
    ns_file = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if not name or not os.path.exists(ns_file):
        return None
    with open(ns_file) as f:
        namespace = os.environ.get("RAY_CLUSTER_NAMESPACE") or f.read().strip()
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.kuberay.node_provider import KubernetesHttpApiClient

    cr = KubernetesHttpApiClient(namespace=namespace).get(f"rayclusters/{name}")
    if not (cr.get("spec") or {}).get("enableInTreeAutoscaling"):
        return None
    return shape_from_config(_derive_autoscaling_config_from_ray_cr(cr), f"KubeRay RayCluster {namespace}/{name}")


def monitor_config_path(session_dir: str | None, proc: str = "/proc") -> str | None:
    """The ``--autoscaling-config`` of the autoscaler monitor of the Ray session ``session_dir`` running on
    this machine (the head node), from its command line."""
    if not session_dir:
        return None
    logs = os.path.join(session_dir, "logs")
    for cmdline in glob.glob(os.path.join(proc, "[0-9]*", "cmdline")):
        try:
            with open(cmdline, "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if not any(a.endswith(("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")) for a in args):
            continue
        if not any(a in (f"--logs-dir={logs}", logs) for a in args):
            continue
        for i, a in enumerate(args):
            if a.startswith("--autoscaling-config="):
                return os.path.expanduser(a.split("=", 1)[1])
            if a == "--autoscaling-config" and i + 1 < len(args):
                return os.path.expanduser(args[i + 1])
    return None


def _from_file(ray) -> ClusterShape | None:
    session = None
    try:
        session = ray._private.worker._global_node.get_session_dir_path()
    except Exception:  # noqa: BLE001 - a client connection, or the attribute moved
        pass
    path = monitor_config_path(session)  # not ~/ray_bootstrap_config.yaml blindly: it may be another cluster's
    if path is None:
        return None
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f)  # JSON is YAML too
    shape = shape_from_config(config or {}, f"autoscaler config {path}")
    return shape if shape.node_types else None


def read_cluster_shape(ray) -> ClusterShape:
    """The node types the connected cluster's autoscaler can launch (see the module's docstring); an empty
    ``ClusterShape`` where there is none or it cannot be read (logged)."""
    for how in (_from_gcs, _from_kuberay, lambda: _from_file(ray)):
        try:
            shape = how()
        except Exception as e:  # noqa: BLE001 - private or optional APIs: never a reason to fail a run
            log.debug("kbatch: autoscaler node types not read (%s): %s: %s", getattr(how, "__name__", how),
                      type(e).__name__, e)
            continue
        if shape is not None and shape.node_types:
            log.info("kbatch: the autoscaler can add %s (from %s)", ", ".join(
                f"{t.max_workers if t.max_workers < UNBOUNDED else 'any number of'} x {t.name} "
                f"{ {k: v for k, v in t.resources.items() if k in ('CPU', 'GPU')} }" for t in shape.node_types),
                shape.source)
            return shape
    return ClusterShape()


# ------------------------------------------------------------------------------------------ its status
@dataclass
class LaunchStatus:
    launching: dict = field(default_factory=dict)  # node type -> nodes asked of the provider or booting
    mapping: dict = field(default_factory=dict)  # alive node id (v2) or IP (v1) -> node type


def parse_v1_status(raw: bytes | str | None) -> LaunchStatus:
    """The v1 monitor's status (``__autoscaling_status`` in the GCS KV): pending launches and booting nodes."""
    if not raw:
        return LaunchStatus()
    st = json.loads(raw)
    rep = st.get("autoscaler_report") or {}
    launching = {k: int(v) for k, v in (rep.get("pending_launches") or {}).items() if v}
    for node in rep.get("pending_nodes") or []:  # [ip, node type, status]
        if len(node) >= 2:
            launching[node[1]] = launching.get(node[1], 0) + 1
    return LaunchStatus(launching, dict(rep.get("node_type_mapping") or {}))


def _read_status(ray) -> LaunchStatus:
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2():
        from ray.autoscaler.v2.sdk import get_cluster_status

        cs = get_cluster_status(ray.get_runtime_context().gcs_address)
        launching: dict = {}
        for p in cs.pending_launches:
            launching[p.ray_node_type_name] = launching.get(p.ray_node_type_name, 0) + int(p.count)
        for p in cs.pending_nodes:
            launching[p.ray_node_type_name] = launching.get(p.ray_node_type_name, 0) + 1
        mapping = {n.node_id: n.ray_node_type_name for n in cs.active_nodes + cs.idle_nodes if n.node_id}
        return LaunchStatus(launching, mapping)
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    return parse_v1_status(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS))


class Autoscaler:
    """The cluster's shape and what its autoscaler is doing now (read at most every ``every`` seconds)."""

    def __init__(self, ray, shape: ClusterShape | None = None, every: float = STATUS_EVERY):
        self.ray, self.every = ray, every
        self.shape = shape if shape is not None else ClusterShape()
        self._status = LaunchStatus()
        self._at = -math.inf

    def status(self) -> LaunchStatus:
        if not self.shape.autoscaling:
            return self._status
        now = time.monotonic()
        if now - self._at >= self.every:
            self._at = now
            try:
                self._status = _read_status(self.ray)
            except Exception as e:  # noqa: BLE001 - status unreadable: nothing is known to be starting
                log.debug("kbatch: autoscaler status not read: %s: %s", type(e).__name__, e)
                self._status = LaunchStatus()
        return self._status

    def starting_for(self, demand: dict) -> bool:
        """Whether the autoscaler is launching a node (asked of the provider, or booting) of a type that can
        hold one replica asking ``demand``: a stage waiting for it is not unplaceable."""
        launching = self.status().launching
        return any(launching.get(t.name, 0) > 0 and _fits(demand, t.resources) > 0 for t in self.shape.node_types)

    def can_add(self, alive: list[dict]) -> list[dict]:
        if not self.shape.autoscaling:
            return []
        return self.shape.can_add(alive, self.status().mapping)

