"""Layouts, bounds and stage pools as plain functions: what `auto` becomes on a cluster, and the policies
the driver asks before it adds work (no Ray needed)."""
import pytest

from kbatch.run.bounds import Bounds
from kbatch.config import ConfigError, from_dict
from kbatch.run.layout import resolve
from kbatch.run.replicas import auto_replicas, expected_writers
from kbatch.run.stage_pool import CRASH, NODE, StagePool


def node(cpu, gpu=0.0, nid="n1"):
    res = {"CPU": float(cpu)}
    if gpu:
        res["GPU"] = float(gpu)
    return {"NodeID": nid, "Alive": True, "Resources": res}


def test_cpu_machine_gets_the_colocated_lanes_layout_without_a_resources_section():
    """configs/cpu.yaml's layout (one process for both stages, a lane per core, one torch thread each) is
    what a config without `resources:` gets on a 2-CPU machine."""
    cfg = resolve(from_dict({}), [node(2)], "n1")
    r = cfg.resources
    assert cfg.colocated and r.decoder.gpus == 0 and r.prior.gpus == 0
    assert (r.decoder.cpus, r.decoder.concurrency, r.decoder.threads) == (1.5, 2, 1)
    assert auto_replicas(cfg, "decoder", [node(2)], writers=1) == 1
    assert auto_replicas(cfg, "decoder", [node(2, nid="a"), node(2, nid="b")], writers=1) == 2  # one per node
    big = resolve(from_dict({}), [node(16)], "n1").resources.decoder
    assert big.concurrency == 4 and big.threads == 3  # lanes capped at 4


def test_explicit_values_win_and_gpu_cluster_layout():
    cfg = resolve(from_dict({"resources": {"colocate": False, "decoder": {"concurrency": 1, "cpus": 0.5}}}),
                  [node(2)], "n1")
    assert not cfg.colocated and cfg.resources.decoder.concurrency == 1 and cfg.resources.decoder.cpus == 0.5
    gpu = [node(16, 8, "g1")]
    cfg = resolve(from_dict({}), gpu, "g1")
    r = cfg.resources
    assert not cfg.colocated and r.decoder.gpus == 1 and r.decoder.concurrency == 1 and r.decoder.cpus == 0.5
    # prior: auto, 1 GPU at the start (kbatch.run.balance); decoders: the 7 GPUs left
    assert auto_replicas(cfg, "decoder", gpu, writers=2, others={"prior": 1}) == 7
    assert auto_replicas(cfg, "decoder", gpu, writers=2, others={"prior": 3}) == 5
    pinned = resolve(from_dict({"resources": {"prior": {"replicas": 2}}}), gpu, "g1")
    assert auto_replicas(pinned, "decoder", gpu, writers=2) == 6  # a pinned prior keeps its GPUs
    two = [node(2, 1, "a"), node(2, 1, "b")]
    assert auto_replicas(resolve(from_dict({}), two, "a"), "decoder", two, writers=1, others={"prior": 1}) == 1
    assert expected_writers(cfg, gpu) == 2  # one per 4 decoders
    capped = resolve(from_dict({"resources": {"decoder": {"max_replicas": 3}}}), gpu, "g1")
    assert auto_replicas(capped, "decoder", gpu, writers=1, others={"prior": 1}) == 3
    # fractions share a card: prior 0.2 + decoder 0.8 on one GPU
    one = [node(4, 1)]
    frac = resolve(from_dict({"resources": {"prior": {"gpus": 0.2}, "decoder": {"gpus": 0.8}}}), one, "n1")
    assert not frac.colocated  # they fit side by side: two processes, as asked
    assert auto_replicas(frac, "decoder", one, writers=1, others={"prior": 1}) == 1


def test_gpus_above_one_are_refused():
    with pytest.raises(ConfigError, match=r"resources.decoder.gpus.*one GPU"):
        from_dict({"resources": {"decoder": {"gpus": 2}}})
    with pytest.raises(ConfigError, match="resources.decoder.replicas"):
        from_dict({"resources": {"decoder": {"replicas": "many"}}})


def test_bounds():
    b = Bounds(from_dict({"resources": {"plan_window": 10, "load_ahead": 2, "prior_ahead": 2,
                                        "pending_writes": 2, "decoder": {"batch_size": 4}}}).resources)
    assert b.plan(19) and not b.plan(20)
    assert b.load(1, 0, 1) and not b.load(1, 1, 1) and b.load(3, 0, 2)
    # the prior may run 2 decoder batches (of 4 images) ahead per decoder replica
    assert b.prior_limit(3) == 24 and b.prior(20, 4, 3) and not b.prior(21, 4, 3)
    assert b.prior(0, 100, 1)  # one batch always goes when nothing is ahead
    assert b.write(3, 2) and not b.write(4, 2) and not b.write(0, 0)  # no writer running yet: no room
    assert b.decode(4, 2, 3, 4) and not b.decode(4, 2, 4, 4)


class Handle:
    def __init__(self, slot):
        self.slot = slot


def _pool(replicas=2, target=None, **kw):
    return StagePool("decoder", Handle, {"GPU": 1}, replicas, limit=2, run_id="r", target_fn=target, **kw)


def test_pool_gives_work_only_to_running_replicas_least_loaded_first():
    p = _pool()
    a, b = p.scale()
    assert p.pick() is None  # pending replicas get nothing
    p.on_ready(a, {"node": "n1"})
    assert p.pick() is a
    p.add_load(a, 1)
    p.on_ready(b, {"node": "n2"})
    assert p.pick() is b  # least loaded
    p.add_load(b, 1)
    assert p.pick(solo=True) is None  # a solo batch needs an idle replica
    p.add_load(a, 1)
    p.add_load(b, 1)
    assert p.pick() is None  # both full (limit 2)
    p.drop_load(b, 2)
    assert p.pick(solo=True) is b


def test_pool_node_loss_is_free_and_crashes_are_bounded():
    p = _pool(replicas=1, max_crashes=2)
    (a,) = p.scale()
    p.on_ready(a, {"node": "n1"})
    p.lost(a, NODE)
    assert p.crashes == 0 and p.lost_to_nodes == 1 and not p.broken
    (b,) = p.scale()  # replaced
    p.on_ready(b, {"node": "n2"})
    for _ in range(2):
        p.lost(b, CRASH, "boom")
        (b,) = p.scale()
        p.on_ready(b, {"node": "n2"})
    assert not p.broken
    p.on_success()  # a finished batch resets the streak
    for _ in range(3):
        p.lost(b, CRASH, "boom")
        (b,) = p.scale() or (b,)
    assert p.broken and "keep dying" in p.broken


def test_pool_auto_follows_the_cluster_and_start_failures_stop_it():
    size = {"n": 1}
    p = _pool("auto", target=lambda: size["n"])
    assert len(p.scale()) == 1
    size["n"] = 3
    assert len(p.scale()) == 2  # nodes joined: grow
    size["n"] = 1
    p.scale()
    assert len(p.all) == 1  # nodes left: pending extras dropped
    q = _pool(replicas=2, max_start_failures=2)
    r1, _ = q.scale()
    q.start_failed(r1, "bad weights")
    assert q.scale() == []  # one replica still pending: no new attempts while starts fail
    q.start_failed(next(iter(q.all.values())), "bad weights")
    assert q.broken and "cannot start" in q.broken and "bad weights" in q.broken


def test_pool_placement_timeout_names_ask_and_cluster():
    p = _pool(replicas=1)
    (a,) = p.scale()
    p.placement_check(0.0, 10, lambda: "asks GPU 1; cluster has GPU 0")
    p.placement_check(5.0, 10, lambda: "x")
    assert not p.broken
    p.placement_check(11.0, 10, lambda: "asks GPU 1; cluster has GPU 0")
    assert "could be placed in 10 s" in p.broken and "cluster has GPU 0" in p.broken
    q = _pool(replicas=1)
    (b,) = q.scale()
    q.placement_check(0.0, 10, str)
    q.on_placed(b, "n1")  # placed, still loading its models: not a placement problem
    q.placement_check(100.0, 10, str)
    assert not q.broken


def test_pool_placement_timer_waits_while_a_node_has_room():
    """A replica whose process is slow to start (a node has room for it) is not a cluster too small."""
    p = _pool(replicas=1)
    p.scale()
    p.placement_check(0.0, 10, str, room=lambda demand: True)
    p.placement_check(100.0, 10, str, room=lambda demand: True)
    assert not p.broken and p.unplaced_since is None
    p.placement_check(101.0, 10, str, room=lambda demand: False)
    p.placement_check(112.0, 10, str, room=lambda demand: False)
    assert p.broken


def test_node_table_room_for_reads_free_resources_per_alive_node(monkeypatch):
    import ray._private.state as state
    from kbatch.run.stage_pool import NodeTable

    class FakeRay:
        def nodes(self):
            return [{"NodeID": "a", "Alive": True, "Resources": {"CPU": 4.0}},
                    {"NodeID": "b", "Alive": False, "Resources": {"CPU": 8.0}}]

    monkeypatch.setattr(state, "available_resources_per_node", lambda: {"a": {"CPU": 1.5}, "b": {"CPU": 8.0}})
    t = NodeTable(FakeRay())
    t.refresh(force=True)
    assert t.room_for({"CPU": 1.0}) and not t.room_for({"CPU": 4.0})  # b is dead: its room does not count


def test_pool_auto_drains_running_replicas_above_the_target_when_their_batches_end():
    """An auto target that overshot (a dead node still counted) shrinks back: pending extras are dropped,
    then running ones drain (no new work) and stop when their last batch ends."""
    size = {"n": 3}
    killed = []
    p = StagePool("decoder", Handle, {"GPU": 1}, "auto", limit=2, run_id="r", target_fn=lambda: size["n"],
                  kill=killed.append)
    a, b, c = p.scale()
    for r in (a, b, c):
        p.on_ready(r, {"node": "n1"})
    p.add_load(a, 2)
    p.add_load(b, 1)
    size["n"] = 1
    p.scale()
    assert c.state == "dead" and killed == [c.handle]  # idle: stopped at once
    assert b.state == "draining" and p.n_running() == 1 and p.pick() is None  # a is full; b gets no work
    p.drop_load(b, 1)
    assert b.state == "dead" and killed == [c.handle, b.handle] and p.drained == 2
    assert p.scale() == [] and list(p.all.values()) == [a]


def test_node_table_reports_a_death_found_by_a_forced_read_at_the_next_refresh():
    """A failed call forces a read of the node table (is its node gone?); the tick's next refresh must
    still report that node, or its waiting embeddings and buffered images would never be redone."""
    from kbatch.run.stage_pool import NodeTable

    nodes = [{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": True}]

    class FakeRay:
        def nodes(self):
            return nodes

    t = NodeTable(FakeRay(), every=0.0)
    assert t.refresh() == set()
    nodes[1] = {"NodeID": "b", "Alive": False}
    assert t.refresh(force=True) == set() and t.is_dead("b")
    assert t.refresh() == {"b"}
    assert t.refresh() == set()


def test_room_a_starved_stage_gets_a_replica_of_another_stage_that_has_several():
    """The prior died and the decoders took its GPU: after the grace period the decoders stop growing, drop
    their unplaced replicas and drain one running replica (one at a time, never their last); nothing happens
    while a node has room, while the prior has no work, or while what the others hold leaves room (the
    prior's own replica is then just slow to start)."""
    from kbatch.run.room_policy import Room

    prior = StagePool("prior", Handle, {"GPU": 1, "CPU": 0.5}, 1, limit=2, run_id="r")
    dec = StagePool("decoder", Handle, {"GPU": 1, "CPU": 0.5}, 4, limit=2, run_id="r")
    writers = StagePool("writer", Handle, {"CPU": 0.25}, 2, limit=2, run_id="r")
    prior.scale()
    d = dec.scale()
    for r in d[:3]:
        dec.on_ready(r, {"node": "n1"})
        dec.add_load(r, 1)  # busy: a drained one stops when its batch ends
    for r in writers.scale():
        writers.on_ready(r, {"node": "n1"})
    room = Room(grace=5.0)
    pools = [prior, dec, writers]
    capacity = {"n1": {"GPU": 3.0, "CPU": 8.0}}
    no_room = lambda demand: "GPU" not in demand  # noqa: E731 - the writers' CPU fits, a GPU does not

    def step(t, room_for=no_room, needs=lambda p: True, cap=capacity):
        room.step(t, pools, needs, room_for, lambda: cap)

    step(0.0)
    step(4.0)
    assert dec.drained == 0 and room.grows(dec)  # within the grace period
    step(6.0)
    assert not room.grows(dec) and room.grows(writers)  # writers hold CPUs, not the GPU it lacks
    assert d[3].state == "dead"  # the unplaced decoder competed for the same GPU
    assert dec.drained == 1 and writers.drained == 0 and dec.n_running() == 2
    victim = next(r for r in d[:3] if r.state == "draining")
    step(12.0)
    assert dec.drained == 1  # one at a time: the first is still finishing its batch
    dec.drop_load(victim, 1)
    assert victim.state == "dead"
    step(13.0)
    assert room.grows(dec) and dec.drained == 1  # its GPU is free: the prior's to take, nothing more drained
    # what the others hold leaves a GPU: the prior's replica is starting (holding it), not starved
    step(20.0, cap={"n1": {"GPU": 3.0, "CPU": 8.0}, "n2": {"GPU": 1.0, "CPU": 8.0}})
    step(30.0, cap={"n1": {"GPU": 3.0, "CPU": 8.0}, "n2": {"GPU": 1.0, "CPU": 8.0}})
    assert room.grows(dec) and dec.drained == 1
    step(40.0, cap={"n1": {"GPU": 2.0, "CPU": 8.0}})
    step(50.0, cap={"n1": {"GPU": 2.0, "CPU": 8.0}})
    step(60.0, cap={"n1": {"GPU": 2.0, "CPU": 8.0}})  # starved again (a node shrank)
    assert dec.drained == 2 and dec.n_running() == 1
    for r in d[:3]:
        if r.state == "draining":
            dec.drop_load(r, 1)
    step(70.0, cap={"n1": {"GPU": 1.0, "CPU": 8.0}})
    step(80.0, cap={"n1": {"GPU": 1.0, "CPU": 8.0}})
    assert dec.drained == 2 and dec.n_running() == 1  # the last decoder stays: placement_timeout decides
    step(90.0, room_for=lambda demand: True, cap={"n1": {"GPU": 1.0, "CPU": 8.0}})
    assert room.grows(dec)  # a node has room: not starved
    step(91.0, needs=lambda p: p is not prior, cap={"n1": {"GPU": 1.0, "CPU": 8.0}})
    assert room.grows(dec)  # no work left for the prior
    (p,) = prior.pending()
    prior.on_placed(p, "n1")
    step(100.0, cap={"n1": {"GPU": 1.0, "CPU": 8.0}})
    assert room.grows(dec) and dec.drained == 2  # the prior is placed
