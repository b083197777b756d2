"""How the cluster is divided among kbatch runs (kbatch/cluster/allotment.py) and what the coordinator answers
(kbatch/cluster/coordinator.py), without Ray: priorities, weights, what a run cannot use, whole replicas,
non-kbatch usage, queue states, expiry of a silent run, and a new coordinator that learns the runs again."""
import math

from kbatch.cluster.allotment import allot, capacity_left, queue_states
from kbatch.cluster.coordinator import Coordinator
from kbatch.cluster.state import DRAINING, QUEUED, RUNNING, JobDemand


def job(run_id, t=0.0, **kw):
    kw.setdefault("minimum", 2.0)  # one prior + one decoder replica of 1 GPU each
    return JobDemand(run_id, f"/out/{run_id}", started_at=t, **kw)


def test_a_job_alone_gets_everything():
    assert allot([job("a")], 16) == {"a": 16.0}
    assert allot([job("a", can_use=math.inf)], 3) == {"a": 3.0}


def test_three_equal_jobs_share_within_one_gpu():
    got = allot([job("a", 1), job("b", 2), job("c", 3)], 16)
    assert sum(got.values()) == 16
    assert all(abs(v - 16 / 3) <= 1 for v in got.values()), got
    assert got["a"] == 6  # what rounding leaves goes to the earliest


def test_strict_priority_takes_everything_it_can_use():
    got = allot([job("low", 1), job("high", 2, priority=1)], 16)
    assert got == {"low": 0.0, "high": 16.0}
    # what the high one cannot use (its tail: 5 GPUs of work left) goes to the low one
    got = allot([job("low", 1), job("high", 2, priority=1, can_use=5)], 16)
    assert got == {"low": 11.0, "high": 5.0}


def test_weights_share_a_level():
    got = allot([job("a", 1, weight=1), job("b", 2, weight=3)], 16)
    assert got == {"a": 4.0, "b": 12.0}


def test_what_a_job_cannot_use_goes_to_the_others():
    got = allot([job("a", 1, can_use=3), job("b", 2), job("c", 3)], 16)
    assert got["a"] == 3 and got["b"] + got["c"] == 13 and abs(got["b"] - got["c"]) <= 1, got
    # a job whose work is done (can use nothing) gets nothing and queues nobody
    got = allot([job("done", 1, can_use=0), job("b", 2)], 8)
    assert got == {"done": 0.0, "b": 8.0}


def test_whole_units_and_fractional_replicas():
    # replicas of 0.8 GPU (decoders) with a minimum of 1.0 (a 0.2 prior + a 0.8 decoder)
    got = allot([job("a", 1, unit=0.8, minimum=1.0), job("b", 2, unit=0.8, minimum=1.0)], 4)
    for v in got.values():
        assert abs((v - 1.0) / 0.8 - round((v - 1.0) / 0.8)) < 1e-6, got  # minimum + whole units
    assert sum(got.values()) <= 4 + 1e-9 and sum(got.values()) >= 4 - 0.8, got


def test_minimums_queue_the_later_job_but_the_head_always_runs():
    got = allot([job("a", 1, minimum=3), job("b", 2, minimum=3)], 4)
    assert got == {"a": 4.0, "b": 0.0}
    assert allot([job("big", 1, minimum=5)], 4) == {"big": 5.0}  # too small a cluster: placement decides
    # a later, smaller job may use what the earlier one cannot
    got = allot([job("a", 1, minimum=10), job("b", 2, minimum=10), job("c", 3, minimum=2)], 16)
    assert got == {"a": 10.0, "b": 0.0, "c": 6.0}


def test_non_kbatch_usage_counts_as_taken():
    assert capacity_left(16, used=10, kbatch_held=6) == 12  # 4 GPUs held by something else
    assert capacity_left(16, used=6, kbatch_held=6) == 16
    assert capacity_left(16, used=3, kbatch_held=6) == 16  # replicas just stopped: never above the total


def test_queue_states_positions_and_ahead():
    jobs = [job("a", 1), job("b", 2, held=4.0), job("c", 3, priority=-1), job("d", 4, priority=-1)]
    amounts = {"a": 16.0, "b": 0.0, "c": 0.0, "d": 0.0}
    s = queue_states(jobs, amounts)
    assert s["a"] == (RUNNING, None, [])
    assert s["b"][0] == DRAINING  # holds 4, allotted 0: giving them back
    assert s["c"] == (QUEUED, 1, ["a"]) and s["d"] == (QUEUED, 2, ["a", "c"])


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_coordinator_preempts_expires_and_cancels():
    clock = Clock()
    c = Coordinator(resources=lambda: ({"GPU": 16.0}, {"GPU": 16.0}), clock=clock)
    a = c.heartbeat(job("a", 1))
    assert (a.amount, a.state, a.capacity) == (16.0, RUNNING, 16.0)
    b = c.heartbeat(job("b", 2))
    assert b.amount == 8.0 and b.state == RUNNING
    a = c.heartbeat(job("a", 1, held=16.0))
    assert a.amount == 8.0 and a.state == DRAINING
    b = c.heartbeat(job("b", 2))
    assert b.handing_over == 8.0  # a still holds 8 of b's: b's placement clock waits
    hi = c.heartbeat(job("hi", 3, priority=1, can_use=4.0))
    assert hi.amount == 4.0
    rows = {r.run_id: r for r in c.jobs_rows()}
    assert rows["hi"].allotted == 4.0 and rows["a"].allotted + rows["b"].allotted == 12.0
    # "a" stops heartbeating (SIGKILL): after its ttl, its share goes to the others
    clock.t += 10
    c.heartbeat(job("b", 2))
    c.heartbeat(job("hi", 3, priority=1, can_use=4.0))
    clock.t += 10
    b = c.heartbeat(job("b", 2))
    assert b.amount == 12.0 and "a" not in {r.run_id for r in c.jobs_rows()}
    row = c.cancel("b")
    assert row.state == "CANCELLING"
    b = c.heartbeat(job("b", 2, held=12.0))
    assert b.cancel and b.amount == 0.0
    assert c.cancel("nobody") is None
    c.deregister("b")
    assert [r.run_id for r in c.jobs_rows()] == ["hi"]


def test_coordinator_counts_other_workloads_as_taken():
    clock = Clock()
    # 16 GPUs, 10 in use; the run says it holds 6: 4 are someone else's
    c = Coordinator(resources=lambda: ({"GPU": 16.0}, {"GPU": 6.0}), clock=clock)
    a = c.heartbeat(job("a", 1, held=6.0))
    assert a.capacity == 12.0 and a.amount == 12.0
    # replicas Ray has just placed, before the run knows: its pending ones are counted as its own
    c = Coordinator(resources=lambda: ({"GPU": 16.0}, {"GPU": 6.0}), clock=clock)
    a = c.heartbeat(job("a", 1, held=6.0, asked=10.0))
    assert a.capacity == 16.0 and a.amount == 16.0


def test_a_new_coordinator_keeps_allotments_until_it_heard_every_run():
    """The old coordinator died: the runs listed as registered keep what they hold; a new run waits until
    every listed run was heard (or the warm-up ends), then the cluster is divided again."""
    clock = Clock()
    c = Coordinator(resources=lambda: ({"GPU": 16.0}, {"GPU": 0.0}), registered=lambda: ["a", "b"], clock=clock)
    a = c.heartbeat(job("a", 1, held=10.0, allotted=10.0))
    assert a.amount == 10.0  # not 16: b has not been heard yet
    n = c.heartbeat(job("new", 5))
    assert n.amount == 0.0 and n.state == QUEUED
    b = c.heartbeat(job("b", 2, held=6.0, allotted=6.0))
    assert b.amount in (5.0, 6.0)  # every run heard: divided again among a, b and new
    got = {r.run_id: r.allotted for r in c.jobs_rows()}
    assert sum(got.values()) == 16 and got["new"] >= 5, got
    # a listed run that never comes back does not hold the others for longer than the warm-up
    c2 = Coordinator(resources=lambda: ({"GPU": 8.0}, {"GPU": 8.0}), registered=lambda: ["gone"], clock=clock)
    assert c2.heartbeat(job("x", 1)).amount == 0.0
    clock.t += 60
    assert c2.heartbeat(job("x", 1)).amount == 8.0


def test_an_allotment_caps_the_auto_targets_and_the_balance():
    """kbatch/run/replicas.py with a budget (the run's allotment): 4 nodes of 4 GPUs, the default config."""
    from kbatch.config import from_dict
    from kbatch.run.layout import resolve
    from kbatch.run.replicas import auto_replicas, decoders_for, max_priors

    nodes = [{"NodeID": "head", "Alive": True, "Resources": {"CPU": 2.0}}] + [
        {"NodeID": f"w{i}", "Alive": True, "Resources": {"CPU": 4.0, "GPU": 4.0}} for i in range(4)]
    cfg = resolve(from_dict({}), nodes, "head")
    assert decoders_for(cfg, nodes, 2, 1) == 15 and decoders_for(cfg, nodes, 2, 1, None) == 15  # alone
    assert decoders_for(cfg, nodes, 2, 1, {"GPU": 8.0}) == 7  # 1 prior + 7 decoders = the 8 allotted
    assert decoders_for(cfg, nodes, 2, 3, {"GPU": 8.0}) == 5
    assert max_priors(cfg, nodes, 2, {"GPU": 6.0}) == 5  # beside one decoder
    assert decoders_for(cfg, nodes, 2, 1, {"GPU": 2.0}) == 1  # the minimum: one of each
    assert auto_replicas(cfg, "decoder", nodes, 2, {"prior": 1}, budget={"GPU": 0.0}) == 1  # never below 1:
    # a run allotted nothing is QUEUED, which the pools read apart (StagePool.queued: target 0)


def test_a_queued_run_drains_every_replica_at_its_batch_boundary():
    """StagePool.queued (allotment 0): target 0 whatever ``replicas`` says; running replicas drain (a busy one
    stops when its batch ends: nothing started twice), then the pool grows back when the run gets GPUs."""
    from kbatch.run.stage_pool import StagePool

    queued = [False]
    pool = StagePool("decoder", lambda slot: object(), {"GPU": 1.0}, "auto", limit=2, run_id="r",
                     target_fn=lambda: 3)
    pool.queued = lambda: queued[0]
    for r in pool.scale(0.0):
        pool.on_ready(r, {"node": "n"})
    assert pool.n_running() == 3
    busy = pool.running()[0]
    pool.add_load(busy, 1)
    queued[0] = True
    assert pool.target == 0 and pool.scale(1.0) == []
    assert [r.state for r in pool.all.values()] == ["draining"] and busy.state == "draining"
    pool.drop_load(busy, 1)  # its batch ended
    assert not pool.all
    queued[0] = False
    assert len(pool.scale(2.0)) == 3
