"""Ray metrics that never break a run, and the one the actors publish: ``kbatch_batch_seconds``.

Every kbatch metric goes through :class:`Metric`: created and recorded through ``ray.util.metrics`` (Ray's
Prometheus endpoint on each node exports it with the ``ray_`` prefix: ``ray_kbatch_rows_total``,
``ray_kbatch_queue``, ``ray_kbatch_batch_seconds_bucket``), and any failure to create or record one (no Ray,
an old Ray, a broken metrics agent) logs one warning per process and turns that process's kbatch metrics
off: a run never fails, nor slows down, because of its metrics. A cluster without a metrics agent (a plain
``ray.init()`` without the dashboard) takes the records and drops them; nothing to handle there.

``KBATCH_METRICS=0`` in the environment turns them off (the actors inherit it through the job's runtime_env).

The histogram is recorded in the actor processes after each batch (prior, decoder, writer): the time the
batch's work took in the actor, not counting the queue in front of it. Its series carry the tags ``run``
(the run id) and ``stage``; never a row or id (cardinality).
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

log = logging.getLogger("kbatch")

#: batch seconds, from simulated stages (ms) to big CPU batches (minutes)
BATCH_BOUNDARIES = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)

_state = {"off": os.environ.get("KBATCH_METRICS", "1").strip().lower() in ("0", "false", "no", "off"),
          "warned": False}
_lock = threading.Lock()


def disabled() -> bool:
    return _state["off"]


def _give_up(what: str, e: BaseException) -> None:
    """Turn this process's metrics off, saying why once."""
    with _lock:
        _state["off"] = True
        if _state["warned"]:
            return
        _state["warned"] = True
    log.warning("kbatch: metrics are off in this process (%s failed: %s: %s); the run goes on without them",
                what, type(e).__name__, e)


@dataclass(frozen=True)
class Spec:
    """A metric kbatch publishes. ``kind``: counter | gauge | histogram. ``tags``: its tag keys (always
    ``run`` first)."""

    kind: str
    name: str
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()

    def exported(self) -> tuple[str, ...]:
        """The series names Ray's Prometheus endpoint exports for it (``ray_`` prefix; ``_total`` for
        counters; ``_bucket``/``_count``/``_sum`` for histograms)."""
        base = f"ray_{self.name}"
        if self.kind == "counter":
            return (f"{base}_total",)
        if self.kind == "histogram":
            return (f"{base}_bucket", f"{base}_count", f"{base}_sum")
        return (base,)


BATCH_SECONDS = Spec("histogram", "kbatch_batch_seconds",
                     "Seconds one batch took in its actor (prior, decoder: the model call; writer: encode and "
                     "commit a shard), by stage", ("run", "stage"), BATCH_BOUNDARIES)


class Metric:
    """One ``ray.util.metrics`` object made from a :class:`Spec`, created on first use; every call is
    guarded (see the module docstring)."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self._m = None

    def _get(self):
        if self._m is None:
            from ray.util import metrics as rm

            s = self.spec
            if s.kind == "counter":
                self._m = rm.Counter(s.name, s.description, tag_keys=s.tags)
            elif s.kind == "gauge":
                self._m = rm.Gauge(s.name, s.description, tag_keys=s.tags)
            else:
                self._m = rm.Histogram(s.name, s.description, boundaries=list(s.boundaries), tag_keys=s.tags)
        return self._m

    def record(self, value: float, tags: dict[str, str]) -> None:
        """Counter: add ``value`` (> 0); gauge: set it; histogram: observe it."""
        if _state["off"]:
            return
        try:
            m = self._get()
            tags = {k: str(v) for k, v in tags.items()}
            if self.spec.kind == "counter":
                if value > 0:
                    m.inc(value, tags=tags)
            elif self.spec.kind == "gauge":
                m.set(value, tags=tags)
            else:
                m.observe(value, tags=tags)
        except Exception as e:  # noqa: BLE001 - metrics must never stop a run
            _give_up(f"recording {self.spec.name}", e)


_batch = Metric(BATCH_SECONDS)


def observe_batch(slot: str | None, stage: str, seconds: float) -> None:
    """Record one batch's seconds in this actor process. ``slot``: the replica's KV slot,
    ``<run id>/<stage>/<n>`` (kbatch.run.stage_pool), which names the run; without one (an actor made
    outside a run) nothing is recorded."""
    if not slot or _state["off"]:
        return
    _batch.record(seconds, {"run": slot.split("/", 1)[0], "stage": stage})
