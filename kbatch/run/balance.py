"""How an ``auto`` prior pool and the decoders share the cluster: by their speeds measured during the run.

Each model stage's pool keeps a :class:`Speed`: seconds per image of one replica, from the wall time of its
own batches as its actors report them (``Status.seconds``; a moving average over the last ~``SPAN`` images,
so a change in the mix of modes and sizes moves it). The configured ``models.sim`` speeds are never read:
real models have none.

The pipeline's rate with ``p`` prior and ``d`` decoder replicas is ``min(p / prior_s, d / decoder_s)``
img/s. :class:`Balance` keeps the prior target ``p`` (the decoders take what is left: ``decoders_for(p)``):

* before both stages are measured it is 1 (one prior, the rest decoders: a prior image costs ~1/7 of a
  decoder image for Kandinsky 2.1 on an H200, measured while planning kbatch);
* at most every ``every`` seconds it finds the ``p`` with the best rate for the measured speeds and the
  nodes alive now (the ideal prior share of the GPUs is ``prior_s / (prior_s + decoder_s)``), and moves
  there only when that rate beats the current split's by ``margin`` (hysteresis: two splits of nearly the
  same rate do not take turns; a move costs a model load);
* each stage keeps at least one replica (``p`` in 1 .. ``max_priors()``, ``decoders_for(p) >= 1``).

A move only changes the pools' targets: the pool above its target drains its least loaded replicas (they
finish their batches, then stop; ``kbatch.run.stage_pool``), and the other pool's new replicas are placed
on the room they free. Every move is kept in ``history`` (``_job.json``: ``driver.balance``).
"""
from __future__ import annotations

import math
import time
from typing import Callable

SPAN = 64.0  # images: the moving average's memory (weight of a batch of n images: 1 - exp(-n / SPAN))
EVERY = 10.0  # seconds between decisions
MARGIN = 0.10  # a new split must beat the current one's rate by this fraction
MIN_IMAGES = 16  # images each stage must have measured before the first decision
HISTORY = 50  # moves kept (the first one, the start, is always kept)


class Speed:
    """Seconds per image of one replica of a stage, from its batches' wall times (a moving average)."""

    def __init__(self, lanes: int = 1, span: float = SPAN):
        self.lanes, self.span = max(1, lanes), span
        self.value: float | None = None
        self.images = 0

    def add(self, images: int, seconds: float) -> None:
        """A batch of ``images`` took ``seconds`` in its replica (with ``lanes`` batches at once in a
        replica, the replica makes ``lanes`` times as many images in that time)."""
        if images <= 0 or seconds <= 0:
            return
        x = seconds / images / self.lanes
        w = 1.0 - math.exp(-images / self.span)
        self.value = x if self.value is None else self.value + w * (x - self.value)
        self.images += images

    @property
    def img_s(self) -> float | None:
        return 1.0 / self.value if self.value else None


def rate(priors: int, decoders: int, prior_s: float, decoder_s: float) -> float:
    """img/s of ``priors`` and ``decoders`` replicas at these per-image seconds (the slower stage's)."""
    return min(priors / prior_s, decoders / decoder_s)


def best_split(prior_s: float, decoder_s: float, decoders_for: Callable[[int], int], max_priors: int) -> int:
    """The prior count in 1 .. ``max_priors`` with the best :func:`rate` (fewest priors among equals), each
    stage keeping at least one replica."""
    best, best_rate = 1, -1.0
    for p in range(1, max(1, max_priors) + 1):
        d = decoders_for(p)
        if d < 1:
            break
        r = rate(p, d, prior_s, decoder_s)
        if r > best_rate * (1 + 1e-9):
            best, best_rate = p, r
    return best


class Balance:
    """The prior target of an ``auto`` prior pool beside the decoders (see the module's text).

    ``decoders_for(p)``: the decoder replicas beside ``p`` priors on the nodes alive now; ``max_priors()``:
    the most priors they hold with one decoder; ``speeds()``: the (prior, decoder) :class:`Speed`."""

    def __init__(self, decoders_for: Callable[[int], int], max_priors: Callable[[], int],
                 speeds: Callable[[], tuple[Speed, Speed]] | None = None, *, every: float = EVERY,
                 margin: float = MARGIN, min_images: int = MIN_IMAGES, now: float | None = None):
        self.decoders_for, self.max_priors, self.speeds = decoders_for, max_priors, speeds
        self.every, self.margin, self.min_images = every, margin, min_images
        self.t0 = time.monotonic() if now is None else now
        self.prior = 1
        self.last = -math.inf  # when the last decision was taken
        self.history: list[dict] = []
        self._note(self.t0, "start: 1 prior, the rest decoders (nothing measured yet)", None, None)

    def target(self) -> int:
        """The prior pool's target now (never above what the nodes alive now hold)."""
        return max(1, min(self.prior, self.max_priors()))

    def decoders(self) -> int:
        """The decoder pool's target now (beside the prior target)."""
        return self.decoders_for(self.target())

    def step(self, now: float) -> bool:
        """Once per driver tick: re-decide from the pools' speeds. Returns whether the split moved."""
        prior, decoder = self.speeds()
        return self.decide(now, prior, decoder)

    def decide(self, now: float, prior: Speed, decoder: Speed) -> bool:
        if now - self.last < self.every:
            return False
        if prior.value is None or decoder.value is None or min(prior.images, decoder.images) < self.min_images:
            return False
        self.last = now
        ps, ds = prior.value, decoder.value
        top = self.max_priors()
        current = self.target()
        best = best_split(ps, ds, self.decoders_for, top)
        if best == current:
            return False
        now_rate = rate(current, max(0, self.decoders_for(current)), ps, ds)
        new_rate = rate(best, self.decoders_for(best), ps, ds)
        if new_rate < (1 + self.margin) * now_rate:
            return False
        self.prior = best
        why = ("the prior holds the decoders back" if best > current else "the decoders hold the prior back")
        self._note(now, f"{why}: {now_rate:.3g} -> {new_rate:.3g} img/s expected", ps, ds)
        return True

    def _note(self, now: float, reason: str, prior_s: float | None, decoder_s: float | None) -> None:
        p = self.target()
        self.history.append({"t": round(now - self.t0, 1), "prior": p, "decoder": self.decoders_for(p),
                             "reason": reason,
                             "prior_s": None if prior_s is None else round(prior_s, 5),
                             "decoder_s": None if decoder_s is None else round(decoder_s, 5)})
        if len(self.history) > HISTORY:
            del self.history[1]
