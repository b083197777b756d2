"""Issue 5: placement on a (simulated) two-node cluster with fake GPUs; stage GPU shares never overlap."""
import json
import subprocess
import sys
import textwrap

from cli_helpers import env
from conftest import sim_models, tiny_config

SCRIPT = textwrap.dedent("""
    import json, sys
    import pandas as pd
    import ray
    from ray.cluster_utils import Cluster
    import kbatch

    cfg = json.loads(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2})
    cluster.add_node(num_cpus=2, num_gpus=2)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        nodes = [n["NodeID"][:8] for n in ray.nodes() if n["Alive"]]
        driver_node = ray.get_runtime_context().get_node_id()[:8]
        df = pd.DataFrame([{"id": f"p{i}", "prompt": f"thing {i}"} for i in range(24)])
        res = kbatch.render(df, cfg["output"]["path"], cfg)
        print("RESULT" + json.dumps({"nodes": nodes, "driver_node": driver_node, "exit": res.run.exit_code,
                                     "records": res.df[["id", "prior_worker", "decoder_worker"]].to_dict("records")}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def _where(worker):  # "node:ab12cd34/gpu:1(cpu)" -> ("ab12cd34", {"1"})
    node, dev = worker.split("/", 1)
    gpus = dev.split(":", 1)[1].split("(")[0] if dev.startswith("gpu:") else ""
    return node.split(":", 1)[1], {g for g in gpus.split(",") if g}


def test_two_nodes_fake_gpus_disjoint_stages(tmp_path):
    """Simulated models (the placement is the driver's): a decoder batch takes ~1 s, so the second decoder
    replica is running long before the first alone could render all 24 rows (~12 s), even on a busy machine."""
    cfg = tiny_config(sim_models(decoder_seconds=0.5), tmp_path / "out",
                      resources={"device": "cpu", "prior": {"replicas": 1, "gpus": 1, "cpus": 0.5},
                                 "decoder": {"replicas": 2, "gpus": 1, "cpus": 0.5, "batch_size": 2},
                                 "writers": 2})  # spread, they would land one per node
    p = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cfg)], capture_output=True, text=True,
                       env=env(), timeout=400)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, p.stdout[-2000:] + p.stderr[-3000:]
    out = json.loads(line[len("RESULT"):])
    assert out["exit"] == 0 and len(out["records"]) == 24
    prior = {(n, g) for r in out["records"] for n, gs in [_where(r["prior_worker"])] for g in gs}
    decoder = {(n, g) for r in out["records"] for n, gs in [_where(r["decoder_worker"])] for g in gs}
    assert prior and decoder and prior.isdisjoint(decoder), (prior, decoder)
    assert len(decoder) == 2  # two decoder replicas, one whole GPU each
    decoder_nodes = {n for n, _ in decoder}
    assert decoder_nodes == set(out["nodes"]), "both nodes rendered rows"
    # a local output path on several nodes: warned (writers prefer the driver's node; a shared mount or object
    # storage is what keeps every shard where the driver looks)
    assert "is a local path on a cluster of several nodes" in p.stderr
    writers = {json.loads(f.read_text())["writer"] for f in (tmp_path / "out" / "stats").glob("*.json")}
    assert writers and {w.split("/")[0] for w in writers} == {"node:" + out["driver_node"]}, writers
