"""Issue "Every GPU busy" on ``ray.cluster_utils.Cluster`` (fake GPUs) with the simulated models and a config
without ``resources:``: one GPU shares the card; a slow prior gets more GPUs, taken from the decoders.

Each case runs in a subprocess: a Cluster cannot share a process with the suite's local Ray."""
from test_clusters import _run


def base_config(out, prior_s: float, decoder_s: float) -> dict:
    """No ``resources:`` section: what a new user writes."""
    return {"models": {"prior": "sim", "decoder": "sim",
                       "sim": {"prior_seconds_per_image": prior_s, "decoder_seconds_per_image": decoder_s}},
            "output": {"path": str(out), "rows_per_shard": 64, "gallery": False, "format": "parquet"},
            "defaults": {"height": 64, "width": 64}, "progress": "off"}


GPUS = """
        def where(w):  # "node:ab12cd34/gpu:1(sim)/pid:9" -> {("ab12cd34", "1")}
            node, dev = w.split("/", 1)
            ids = dev.split(":", 1)[1].split("(")[0] if dev.startswith("gpu:") else ""
            return {(node, g) for g in ids.split(",") if g}
"""  # indented as the scripts below (textwrap.dedent of the whole)


def test_one_gpu_default_config_shares_the_card_and_completes(tmp_path):
    """One fake GPU, no ``resources:``: before, the prior took the GPU and no decoder could be placed (exit 3
    after placement_timeout); now both stages run in one process on the card."""
    cfg = base_config(tmp_path / "o", 0.002, 0.004)
    cfg["resources"] = {"placement_timeout": 30}  # fail fast if it regresses (the default is 600 s)
    out = _run(GPUS + """
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            t, box = render_in_thread(df(300))
            res = finished(t, box, 150)
            job = json.load(open(os.path.join(cfg["output"]["path"], "_job.json")))
            d = res.df
            report(res, layout=job["layout"], gpus=sorted({g for w in set(d.decoder_worker) for g in where(w)}),
                   same=bool((d.prior_worker == d.decoder_worker).all()))
        finally:
            ray.shutdown(); cluster.shutdown()
    """, cfg, timeout=240, head_gpus=1)
    assert out["exit"] == 0 and out["complete"] and out["n"] == 300 and out["unique"] and out["ok"] == 300, out
    assert out["layout"]["colocate"] and out["layout"]["shares_card"], out["layout"]
    assert len(out["gpus"]) == 1 and out["same"], out  # one process on the one GPU made every row


def test_a_slow_prior_gets_gpus_from_the_decoders(tmp_path):
    """4 fake GPUs on a worker node (the head has none), a prior 3x slower per image than a decoder, no
    ``resources:``: the run starts with 1 prior and 3 decoders, measures both stages, and moves to 3 priors
    and 1 decoder (drained decoders finish their batches first). Every row exactly once; the prior and the
    decoder of every row on different GPUs; the split's history in ``_job.json``."""
    cfg = base_config(tmp_path / "o", 0.024, 0.008)
    out = _run(GPUS + """
        cluster.add_node(num_cpus=4, num_gpus=4)
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            cluster.wait_for_nodes()
            t, box = render_in_thread(df(1200))
            res = finished(t, box, 200)
            job = json.load(open(os.path.join(cfg["output"]["path"], "_job.json")))
            d = res.df
            report(res, balance=job["driver"]["balance"], replicas=job["driver"]["replicas"],
                   layout=job["layout"], shared=int(sum(bool(where(p) & where(q))
                                                       for p, q in zip(d.prior_worker, d.decoder_worker))),
                   priors=len(set(d.prior_worker)), prior_gpus=len(set().union(*map(where, set(d.prior_worker)))))
        finally:
            ray.shutdown(); cluster.shutdown()
    """, cfg, timeout=300, head_gpus=0)
    assert out["exit"] == 0 and out["complete"] and out["n"] == 1200 and out["unique"] and out["ok"] == 1200, out
    assert out["shared"] == 0, out  # prior and decoder of a row never on one GPU
    history = out["balance"]
    assert history[0]["prior"] == 1 and history[0]["decoder"] == 3, history
    moved = [h for h in history[1:] if h["prior"] > 1]
    assert moved and moved[0]["prior_s"] > moved[0]["decoder_s"], history  # measured, not configured
    assert out["replicas"]["decoder"]["drained"] >= 1 and out["replicas"]["prior"]["started"] >= 2, out
    assert out["priors"] >= 2 and out["prior_gpus"] >= 2, out  # rows were made by more than one prior
