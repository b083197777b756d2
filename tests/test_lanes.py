"""Lanes (``resources.<stage>.concurrency``): batches at once in one process, one copy of the weights."""
import threading
import time

import numpy as np
import pandas as pd
from PIL import Image

import kbatch
from kbatch.models.lanes import Lanes, clone_pipeline
from kbatch.schema.rows import Row

from conftest import assert_pixels_close, tiny_config


def _rows(mode="text2img", n=4, **kw):
    return [Row(id=f"{mode}{i}", prompt=f"a {mode} of thing {i}", seed=10 + i, height=64, width=64,
                num_inference_steps=3, prior_num_inference_steps=2, mode=mode, **kw) for i in range(n)]


class _Overlap:
    """Wraps a shared module's forward: counts how many threads are inside it at once."""

    def __init__(self, module):
        self.inside = self.most = 0
        self.lock = threading.Lock()
        inner = module.forward

        def forward(*a, **kw):
            with self.lock:
                self.inside += 1
                self.most = max(self.most, self.inside)
            try:
                time.sleep(0.002)  # widen the window a little; the kernels release the GIL anyway
                return inner(*a, **kw)
            finally:
                with self.lock:
                    self.inside -= 1

        module.forward = forward


def test_clone_shares_weights_not_state(tiny_models):
    from kbatch.models.loading import load_decoder, placement

    pipe = load_decoder(tiny_models["decoder"], placement("cpu", "float32", 1))
    twin = clone_pipeline(pipe)
    assert twin.unet is pipe.unet and twin.movq is pipe.movq and twin.text_encoder is pipe.text_encoder
    assert twin.scheduler is not pipe.scheduler and twin.tokenizer is not pipe.tokenizer
    assert twin.scheduler.config == pipe.scheduler.config
    made = []
    lanes = Lanes(2, lambda i: made.append(i) or f"lane{i}")
    with lanes.take() as a, lanes.take() as b:
        assert {a, b} == {"lane0", "lane1"} and made == [0, 1]


def test_two_lanes_run_at_once_and_match_one_lane(tiny_models):
    """Two threads through one predictor with 2 lanes: both inside the shared UNet at the same time, and
    every image equal to the same row through a 1-lane predictor (text2img, img2img, inpaint)."""
    from kbatch.models.decoder import DecoderPredictor
    from kbatch.models.prior import PriorPredictor

    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    square = np.zeros((64, 64), dtype=np.uint8)
    square[16:48, 16:48] = 255
    mask = Image.fromarray(square, "L")  # white = repaint, as load_row_inputs gives it
    batches = [_rows("text2img"), _rows("img2img", strength=0.6), _rows("inpaint"), _rows("text2img", 2)]
    inputs = {"text2img": None, "img2img": {"init_image": init}, "inpaint": {"init_image": init, "mask": mask}}

    prior1 = PriorPredictor(tiny_models["prior"], device="cpu", threads=1)
    dec1 = DecoderPredictor(tiny_models["decoder"], tiny_models["inpaint"], device="cpu", threads=1)
    want = [dec1(b, prior1(b), [inputs[b[0].mode]] * len(b)) for b in batches]

    prior2 = PriorPredictor(tiny_models["prior"], device="cpu", threads=1, concurrency=2)
    dec2 = DecoderPredictor(tiny_models["decoder"], tiny_models["inpaint"], device="cpu", threads=1, concurrency=2)
    watch = _Overlap(dec2.pipe.unet)
    got: dict[int, list] = {}

    def work(i):
        b = batches[i]
        got[i] = dec2(b, prior2(b), [inputs[b[0].mode]] * len(b))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert watch.most == 2, "two lanes were inside the shared UNet at once"
    assert dec2.lanes.all[1].pipe.unet is dec2.pipe.unet
    for i, b in enumerate(batches):
        for w, g in zip(want[i], got[i]):
            assert g.id == w.id
            assert_pixels_close(g.images, w.images, w.id)


def test_colocated_lanes_job_one_process(tiny_models, ray_session, tmp_path):
    """resources.decoder.concurrency with colocate: one process renders both stages, the same pixels as the
    predictors give in this process, one batch at a time."""
    from kbatch.models.decoder import DecoderPredictor
    from kbatch.models.prior import PriorPredictor

    rows = pd.DataFrame([{"id": f"r{i}", "prompt": f"a picture of thing {i}"} for i in range(10)])
    over = {"resources": {"colocate": True, "decoder": {"replicas": 1, "cpus": 1, "concurrency": 2,
                                                        "batch_size": 2}}}
    lanes = kbatch.render(rows, str(tmp_path / "b"), tiny_config(tiny_models, tmp_path / "b", **over))
    assert lanes.run.exit_code == 0 and len(lanes.df) == 10
    assert lanes.df["decoder_worker"].nunique() == 1
    assert set(lanes.df["prior_worker"]) == set(lanes.df["decoder_worker"])
    prior = PriorPredictor(tiny_models["prior"], device="cpu", dtype="float32")
    dec = DecoderPredictor(tiny_models["decoder"], device="cpu", dtype="float32")
    seeds = lanes.df.set_index("id")["seed"]
    d = tiny_config(tiny_models, tmp_path)["defaults"]
    for i in range(10):
        row = Row(id=f"r{i}", prompt=f"a picture of thing {i}", seed=int(seeds[f"r{i}"]), height=64, width=64,
                  num_inference_steps=d["num_inference_steps"], guidance_scale=d["guidance_scale"],
                  prior_num_inference_steps=d["prior_num_inference_steps"],
                  prior_guidance_scale=d["prior_guidance_scale"])
        alone = dec([row], prior([row]))[0].images[0]
        assert_pixels_close(np.asarray(lanes.image(f"r{i}", 0)), alone, f"r{i}")
