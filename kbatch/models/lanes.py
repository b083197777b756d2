"""Lanes: several batches at once in one worker process, sharing one copy of the weights.

A lane is a set of diffusers pipelines that share the model modules (UNet, MoVQ, text and image encoders)
with every other lane but own the state a call mutates: the scheduler (timesteps, step index) and the
tokenizer (a fast tokenizer changes its padding and truncation settings on every call, and concurrent
calls on one fails with "Already borrowed"). A worker with ``resources.<stage>.concurrency: K`` runs as a
Ray threaded actor with K threads; each call borrows a free lane for its whole batch.

Why: torch releases the GIL inside its kernels, so two threads with one torch thread each keep two cores
busy (on the 2-CPU VM, 1.6-1.7x a single 2-thread loop with the tiny models: bench/RESULTS.md), while a
second process would load a second copy of the weights (real Kandinsky 2.1 in float32: ~7 GiB for the
decoder, ~6 GiB for the prior). On a GPU, one lane's host-side work (tokenizing, copying images back,
converting them) overlaps the other lane's kernels.
"""
from __future__ import annotations

import copy
import queue
import threading
from contextlib import contextmanager

_OWN = ("scheduler", "tokenizer")  # per-lane state; everything else in ``components`` is shared


def clone_pipeline(pipe):
    """A pipeline of the same class over the same modules, with its own scheduler and tokenizer."""
    comps = dict(pipe.components)
    for name in _OWN:
        if comps.get(name) is not None:
            comps[name] = copy.deepcopy(comps[name])
    twin = type(pipe)(**comps)
    twin.set_progress_bar_config(disable=True)
    return twin


class Lanes:
    """A pool of ``k`` lane objects made by ``make(i)``; ``with lanes.take() as lane:`` borrows one."""

    def __init__(self, k: int, make):
        if k < 1:
            raise ValueError(f"concurrency must be >= 1, got {k!r}")
        self.all = [make(i) for i in range(k)]
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for lane in self.all:
            self._free.put(lane)
        self.lock = threading.Lock()  # for lazy loads shared by all lanes

    @contextmanager
    def take(self):
        lane = self._free.get()
        try:
            yield lane
        finally:
            self._free.put(lane)
