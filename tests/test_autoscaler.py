"""kbatch.run.autoscaler without a cluster: node types read from the configs an autoscaler runs with, the
cluster as it can become, what is booting, and their effect on the layout, the targets and placement_timeout.
(The whole path on Ray's fake autoscaler: tests/test_zz_autoscaling.py.)"""
import json
import os

from kbatch.config import from_dict
from kbatch.run.autoscaler import (Autoscaler, ClusterShape, LaunchStatus, NodeType, monitor_config_path,
                                   parse_v1_status, shape_from_config)
from kbatch.run.layout import resolve
from kbatch.run.replicas import auto_replicas, decoders_for, demand
from kbatch.run.room_policy import Room
from kbatch.run.stage_pool import NodeTable, StagePool

HEAD = {"NodeID": "head", "NodeManagerAddress": "10.0.0.1", "Alive": True, "Resources": {"CPU": 2.0}}
GPU_NODE = {"resources": {"CPU": 2, "GPU": 2}, "min_workers": 0, "max_workers": 3, "node_config": {}}
CONFIG = {"max_workers": 3, "head_node_type": "ray.head.default", "idle_timeout_minutes": 0.5,
          "available_node_types": {"ray.head.default": {"resources": {"CPU": 2}, "max_workers": 0, "node_config": {}},
                                   "gpu_node": GPU_NODE}}


class FakeRay:
    def __init__(self, nodes):
        self._nodes = nodes

    def nodes(self):
        return self._nodes


def shape() -> ClusterShape:
    return shape_from_config(CONFIG, "test")


def table(nodes, launching=None, mapping=None) -> NodeTable:
    t = NodeTable(FakeRay(nodes))
    t.refresh(force=True)
    t.scaler = Autoscaler(None, shape(), every=1e9)
    t.scaler._status, t.scaler._at = LaunchStatus(dict(launching or {}), dict(mapping or {})), 0.0
    t.scaler._at = float("inf")  # never re-read (no Ray here)
    return t


def test_node_types_from_an_autoscaler_config():
    s = shape()
    assert [t.name for t in s.node_types] == ["gpu_node"]  # the head type is not something to add
    t = s.node_types[0]
    assert t.resources == {"CPU": 2.0, "GPU": 2.0} and (t.min_workers, t.max_workers) == (0, 3)
    assert s.autoscaling and s.max_resources()["GPU"] == 6.0


def test_the_cluster_as_it_can_become_counts_alive_nodes_of_each_type_and_the_global_cap():
    s = shape()
    assert [n["Resources"]["GPU"] for n in s.can_add([HEAD])] == [2.0, 2.0, 2.0]
    gpu = {"NodeID": "n1", "NodeManagerAddress": "10.0.0.2", "Alive": True, "Resources": {"CPU": 2.0, "GPU": 2.0}}
    assert len(s.can_add([HEAD, gpu])) == 2  # by its resources
    assert len(s.can_add([HEAD, dict(gpu, Resources={"CPU": 8.0})], {"10.0.0.2": "gpu_node"})) == 2  # v1: by IP
    capped = shape_from_config({**CONFIG, "max_workers": 1}, "test")
    assert len(capped.can_add([HEAD])) == 1
    assert ClusterShape().can_add([HEAD]) == []  # no autoscaler: what is alive


def test_a_cluster_that_can_add_gpu_nodes_gets_the_gpu_layout_and_asks_for_what_they_hold():
    """Before: the layout came from the alive nodes (head: 2 CPUs, no GPU): the CPU layout, prior colocated,
    GPU asks dropped to 0, and one decoder replica: no demand for a GPU node."""
    cfg = from_dict({"models": {"prior": "sim", "decoder": "sim"}})  # the default resources
    nodes = table([HEAD])
    cpu = resolve(cfg, [HEAD], "head")
    assert cpu.colocated and cpu.resources.decoder.gpus == 0  # what alive nodes alone give
    rc = resolve(cfg, nodes.can_become(), "head")
    assert not rc.colocated and rc.resources.decoder.gpus == 1 and rc.resources.prior.gpus == 1
    # 3 nodes x 2 GPUs: one prior, five decoders pending = the demand the autoscaler launches nodes for
    assert decoders_for(rc, nodes.can_become(), 1, 1) == 5
    capped = from_dict({"models": {"prior": "sim", "decoder": "sim"},
                        "resources": {"decoder": {"replicas": "auto", "max_replicas": 2}}})
    assert auto_replicas(resolve(capped, nodes.can_become(), "head"), "decoder", nodes.can_become(), 1) == 2


def test_placement_timeout_waits_while_a_node_boots_for_the_stage():
    """No GPU alive, a GPU node launching: not unplaceable; nothing launching: the timeout counts."""
    d = {"CPU": 0.5, "GPU": 1.0}
    booting = table([HEAD], launching={"gpu_node": 1})
    idle = table([HEAD])
    booting._free = idle._free = {"head": {"CPU": 2.0}}
    booting._free_at = idle._free_at = float("inf")
    assert booting.room_for(d) and not idle.room_for(d)
    assert not booting.room_for({"CPU": 0.5, "GPU": 4.0})  # a launching node that cannot hold it
    for nodes, broken in ((booting, False), (idle, True)):
        pool = StagePool("decoder", lambda slot: object(), d, 1, limit=2, run_id="r")
        pool.scale(0.0)
        pool.placement_check(0.0, 10.0, lambda: "", nodes.room_for)
        pool.placement_check(11.0, 10.0, lambda: "", nodes.room_for)
        assert bool(pool.broken) is broken


def test_no_alive_node_holds_the_stage_is_not_starved_by_the_others():
    """The room policy must not stop the decoders' pending replicas (the autoscaler's demand) because the
    prior waits for a GPU node that no alive node could give it."""
    d = {"CPU": 0.5, "GPU": 1.0}
    prior = StagePool("prior", lambda slot: object(), d, 1, limit=2, run_id="r")
    decoder = StagePool("decoder", lambda slot: object(), d, 5, limit=2, run_id="r")
    prior.scale(0.0), decoder.scale(0.0)
    room = Room(grace=1.0)
    for now in (0.0, 2.0, 4.0):
        room.step(now, [prior, decoder], lambda p: True, lambda dem: False, lambda: {"head": {"CPU": 2.0}})
    assert len(decoder.pending()) == 5 and room.grows(decoder)


def test_v1_status_launching_and_types():
    raw = json.dumps({"autoscaler_report": {
        "pending_launches": {"gpu_node": 2}, "pending_nodes": [["10.0.0.3", "gpu_node", "setting-up"]],
        "node_type_mapping": {"10.0.0.1": "ray.head.default"}}})
    st = parse_v1_status(raw)
    assert st.launching == {"gpu_node": 3} and st.mapping == {"10.0.0.1": "ray.head.default"}
    assert parse_v1_status(None).launching == {}
    scaler = Autoscaler(None, shape(), every=1e9)
    scaler._status, scaler._at = st, float("inf")
    assert scaler.starting_for({"GPU": 1}) and not scaler.starting_for({"GPU": 3})


def test_the_monitor_config_of_this_session_is_found_by_its_command_line(tmp_path):
    session = "/tmp/ray/session_x"
    for pid, args in ((11, ["python", "/x/ray/autoscaler/_private/monitor.py", "--logs-dir=/tmp/ray/session_y/logs",
                            "--autoscaling-config=/other.yaml"]),
                      (12, ["python", "-u", "/x/ray/autoscaler/_private/monitor.py", f"--logs-dir={session}/logs",
                            "--autoscaling-config=~/ray_bootstrap_config.yaml"])):
        os.makedirs(tmp_path / str(pid))
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")
    assert monitor_config_path(session, str(tmp_path)) == os.path.expanduser("~/ray_bootstrap_config.yaml")
    assert monitor_config_path("/tmp/ray/session_z", str(tmp_path)) is None


def test_kuberay_gpu_worker_group_at_min_zero_is_a_node_type():
    """A RayCluster's worker group, through Ray's own KubeRay translation, as the autoscaler sees it."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    container = {"name": "ray", "image": "rayproject/ray:2.60.0-gpu",
                 "resources": {"limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}}}
    head = {"name": "ray-head", "resources": {"limits": {"cpu": "2", "memory": "8Gi"}}}
    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "kb", "namespace": "ml"},
          "spec": {"enableInTreeAutoscaling": True,
                   "headGroupSpec": {"rayStartParams": {"num-cpus": "0"},
                                     "template": {"spec": {"containers": [head]}}},
                   "workerGroupSpecs": [{"groupName": "gpu", "replicas": 0, "minReplicas": 0, "maxReplicas": 3,
                                         "rayStartParams": {}, "template": {"spec": {"containers": [container]}}}]}}
    s = shape_from_config(_derive_autoscaling_config_from_ray_cr(cr), "kuberay")
    assert [(t.name, t.resources.get("GPU"), t.resources.get("CPU"), t.max_workers) for t in s.node_types] == \
        [("gpu", 2.0, 8.0, 3)]
    rc = resolve(from_dict({"models": {"prior": "sim", "decoder": "sim"}}),
                 [dict(HEAD, Resources={"CPU": 0.0})] + s.can_add([]), "head")
    assert demand(rc, "decoder")["GPU"] == 1.0 and not rc.colocated


def test_near_the_tail_an_auto_pool_stops_asking_and_drains_idle_replicas():
    """The work left caps an ``auto`` target: pending replicas (the autoscaler's demand) are dropped first,
    then idle running ones drain, so their nodes go idle and the autoscaler can remove them."""
    d = {"CPU": 0.5, "GPU": 1.0}
    pool = StagePool("decoder", lambda slot: object(), d, "auto", limit=2, run_id="r", target_fn=lambda: 5)
    left = [None]
    pool.work_cap = lambda: left[0]
    pool.scale(0.0)
    assert len(pool.pending()) == 5  # the cluster as it can become: 5 asked for
    for r in list(pool.pending())[:3]:
        pool.on_ready(r, {"node": "n", "worker": "w"})
    busy = pool.pick()
    pool.add_load(busy, 1)
    left[0] = 1  # one batch left: the one running
    pool.scale(1.0)
    assert pool.pending() == [] and [r.state for r in pool.all.values()] == ["running"], pool.all
    assert pool.all[busy.seq] is busy and pool.drained == 2
    left[0] = None  # not known (the manifest not all planned): the cluster's size alone
    assert pool.target == 5
