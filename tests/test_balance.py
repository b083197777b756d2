"""The split of the GPUs between an ``auto`` prior and the decoders, from measured speeds (kbatch.run.balance),
as plain functions and pools (no Ray)."""
from kbatch.config import from_dict
from kbatch.run.balance import Balance, Speed, best_split, rate
from kbatch.run.layout import resolve
from kbatch.run.replicas import decoders_for, max_priors
from kbatch.run.stage_pool import StagePool


def measured(seconds_per_image: float, images: int = 64) -> Speed:
    s = Speed()
    s.add(images, seconds_per_image * images)
    return s


def whole_gpus(n):
    return lambda p: n - p


def test_best_split_gives_each_stage_its_share_of_the_gpus():
    """The ideal prior share of the GPUs is prior_s / (prior_s + decoder_s); the integer split with the best
    pipeline rate is what the pools get."""
    g = whole_gpus(16)
    assert best_split(0.032, 0.224, g, 15) == 2  # 1:7 -> 2 priors, 14 decoders: 62.5 img/s, the ideal
    assert rate(2, 14, 0.032, 0.224) == 16 / (0.032 + 0.224)
    assert best_split(0.06, 0.18, g, 15) == 4  # 1:3 -> 4 : 12
    assert best_split(0.02, 0.2, g, 15) == 2  # 1:10 -> 16/11 = 1.45: 2 priors (70 img/s) beat 1 (50)
    assert best_split(0.3, 0.1, whole_gpus(4), 3) == 3  # a prior 3x slower than a decoder: 3 : 1
    # each stage keeps a replica: a prior 100x slower still leaves one decoder
    assert best_split(10.0, 0.1, whole_gpus(4), 3) == 3
    assert best_split(0.001, 10.0, whole_gpus(4), 3) == 1
    # a pinned decoder pool (replicas: 6): the fewest priors that keep up with it
    assert best_split(0.06, 0.18, lambda p: 6, 10) == 2


def test_speed_is_a_moving_average_over_images_that_follows_a_change_of_mix():
    s = Speed()
    assert s.value is None and s.img_s is None
    s.add(16, 16 * 0.2)
    assert abs(s.value - 0.2) < 1e-12 and s.images == 16
    for _ in range(20):  # the rows got bigger: 0.4 s/img
        s.add(16, 16 * 0.4)
    assert abs(s.value - 0.4) < 0.01
    s.add(0, 1.0)
    s.add(4, 0.0)  # nothing to learn from
    assert s.images == 16 * 21
    lanes = Speed(lanes=2)
    lanes.add(8, 8 * 0.5)  # two batches at once: a replica makes an image every 0.25 s
    assert lanes.value == 0.25


def test_balance_starts_with_one_prior_then_follows_the_measured_speeds():
    b = Balance(whole_gpus(16), lambda: 15, every=10.0, margin=0.1, min_images=16, now=0.0)
    assert (b.target(), b.decoders()) == (1, 15)
    assert b.history[0]["prior"] == 1 and b.history[0]["decoder"] == 15 and b.history[0]["prior_s"] is None
    # one stage measured only, or too few images: no decision
    assert not b.decide(1.0, measured(0.06), Speed())
    assert not b.decide(2.0, measured(0.06, images=8), measured(0.18))
    assert b.decide(3.0, measured(0.06), measured(0.18))  # 1:3: the prior holds the decoders back
    assert (b.target(), b.decoders()) == (4, 12)
    last = b.history[-1]
    assert (last["t"], last["prior"], last["decoder"], last["prior_s"], last["decoder_s"]) == (3.0, 4, 12, 0.06, 0.18)
    assert "prior holds the decoders back" in last["reason"]
    # the mix changed (bigger decoder images): decoders are short now, but not before `every` seconds
    assert not b.decide(5.0, measured(0.06), measured(0.9))
    assert b.decide(13.0, measured(0.06), measured(0.9))
    assert b.target() < 4 and "decoders hold the prior back" in b.history[-1]["reason"]


def test_balance_hysteresis_does_not_flap_and_never_takes_a_stage_last_replica():
    b = Balance(whole_gpus(16), lambda: 15, every=10.0, margin=0.1, min_images=16, now=0.0)
    assert b.decide(0.0, measured(0.03), measured(0.2)) and b.target() == 2  # 66.7 img/s
    # noise around the boundary between 2 and 3 priors (3 would be < 1% better): nothing moves
    for i, ps in enumerate([0.031, 0.029, 0.0312, 0.0295, 0.031]):
        assert not b.decide(10.0 * (i + 1), measured(ps), measured(0.2))
    assert b.target() == 2 and len(b.history) == 2
    # the decoders got 1000x faster: all but one GPU to the prior, never the decoders' last
    assert b.decide(100.0, measured(0.03), measured(0.0002))
    assert (b.target(), b.decoders()) == (15, 1)
    # the cluster shrank to 4 GPUs: the target follows what the nodes hold now
    b.decoders_for, b.max_priors = whole_gpus(4), lambda: 3
    assert (b.target(), b.decoders()) == (3, 1)


def test_balance_on_a_resolved_gpu_cluster():
    """The arithmetic the pools use (kbatch.run.replicas) for 4 nodes of 4 GPUs, a head without GPUs, the
    default config: each replica asks a whole GPU; the split moves within the 16 GPUs."""
    nodes = [{"NodeID": "head", "Alive": True, "Resources": {"CPU": 2.0}}] + [
        {"NodeID": f"w{i}", "Alive": True, "Resources": {"CPU": 4.0, "GPU": 4.0}} for i in range(4)]
    cfg = resolve(from_dict({}), nodes, "head")
    assert cfg.resources.prior.replicas == "auto" and not cfg.colocated
    assert max_priors(cfg, nodes, 2) == 15 and decoders_for(cfg, nodes, 2, 1) == 15
    b = Balance(lambda p: decoders_for(cfg, nodes, 2, p), lambda: max_priors(cfg, nodes, 2), now=0.0)
    assert b.decide(0.0, measured(0.032), measured(0.224)) and (b.target(), b.decoders()) == (2, 14)


def test_one_gpu_shares_the_card_in_one_process_by_default():
    one = [{"NodeID": "n1", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}]
    cfg = resolve(from_dict({}), one, "n1")
    assert cfg.colocated and cfg.resources.decoder.gpus == 1.0 and cfg.resources.decoder.concurrency == 1
    two = one + [{"NodeID": "n2", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}]
    assert not resolve(from_dict({}), two, "n1").colocated  # a GPU per stage: separate GPUs
    assert not resolve(from_dict({"resources": {"colocate": False}}), one, "n1").colocated


class Handle:
    def __init__(self, slot):
        self.slot = slot


def test_a_move_drains_decoders_and_grows_the_prior_pool():
    """The pools follow the balance's targets: the decoder pool drains its least loaded replicas (they
    finish their batches first), the prior pool asks for new replicas on the room they free."""
    prior = StagePool("prior", Handle, {"GPU": 1}, "auto", limit=2, run_id="r")
    dec = StagePool("decoder", Handle, {"GPU": 1}, "auto", limit=2, run_id="r")
    b = Balance(whole_gpus(8), lambda: 7, lambda: (prior.speed, dec.speed), every=10.0, now=0.0)
    prior.target_fn, dec.target_fn = b.target, b.decoders
    for pool in (prior, dec):
        for r in pool.scale():
            pool.on_ready(r, {"node": "n1"})
    assert (prior.n_running(), dec.n_running()) == (1, 7)
    busy = dec.running()[:3]
    for r in busy:
        dec.add_load(r, 1)
    for _ in range(4):  # the prior is 3x slower per image than a decoder
        prior.on_success(16, 16 * 0.3)
        dec.on_success(16, 16 * 0.1)
    assert b.step(1.0) and (b.target(), b.decoders()) == (6, 2)
    new = prior.scale()
    dec.scale()
    assert len(new) == 5 and dec.drained == 5 and dec.n_running() == 2
    assert sum(r.state == "draining" for r in dec.all.values()) == 1  # a busy one finishes its batch first


def test_the_prior_bound_leaves_room_for_every_prior_replica():
    """With 3 priors per decoder the bound on images ahead of the decoders must let each prior replica hold
    batches, or the priors the balance added would idle."""
    from kbatch.run.bounds import Bounds

    b = Bounds(from_dict({"resources": {"prior_ahead": 2, "max_in_flight": 2, "prior": {"batch_size": 16},
                                        "decoder": {"batch_size": 16}}}).resources)
    assert b.prior_limit(1) == 32 and b.prior_limit(1, prior_replicas=1) == 32  # one prior: as before
    assert b.prior_limit(1, prior_replicas=3) == 32 + 2 * 2 * 16
    assert not b.prior(32, 16, 1) and b.prior(32, 16, 1, prior_replicas=3) and b.prior(80, 16, 1, 3)
    assert not b.prior(81, 16, 1, 3)
