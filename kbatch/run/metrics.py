"""The run's metrics in Ray's metrics system (docs/metrics.md), published by the driver: rows, images, queues,
replicas, speed and what is left; on a cluster shared by kbatch jobs, its GPUs allotted and held and its queue
position. Ray's Prometheus endpoint on each node exports them with the ``ray_``
prefix (``ray_kbatch_rows_total``, ``ray_kbatch_queue``, ...); ``dashboards/kbatch_grafana.json`` shows them
and ``docs/metrics.md`` says what each means and which alerts to set.

Every series carries the tag ``run`` (the run id), and only tags of small, fixed sets besides (``status``,
``stage``, ``state``): never a row or an id. The driver refreshes them every :data:`EVERY` seconds from its
loop (``RunMetrics.tick``, one cheap call per driver tick) and once more at the end, when the gauges of a
finished run drop to 0 (replicas, queues, img/s), so a dashboard or an alert never sees a finished run as a
stalled one. (Ray keeps exporting a series' last value after its driver exits, and sends what a process
records to its node's metrics agent every ``metrics_report_interval_ms``, 10 s by default.)

The actors' batch seconds (``kbatch_batch_seconds``, a histogram by stage) are recorded in the actor
processes themselves: ``kbatch.models.ray_metrics``. Everything is guarded there: a failure warns once and
turns metrics off; a cluster without a metrics agent simply drops them.
"""
from __future__ import annotations

import time

from kbatch.models.ray_metrics import BATCH_SECONDS, Metric, Spec, disabled

EVERY = 4.0  # seconds between refreshes (docs/metrics.md: at least every 5 s; the driver ticks every second)

ROWS = Spec("counter", "kbatch_rows", "Rows given their records by this run, by status: ok (images) or failed "
            "(error records)", ("run", "status"))
IMAGES = Spec("counter", "kbatch_images", "Images rendered by this run", ("run",))
QUEUE = Spec("gauge", "kbatch_queue", "Rows waiting for or in each stage (planned, loading, prior, "
             "waiting_for_decoder, decoder, shard_buffer) and shard writes waiting or in flight (writes)",
             ("run", "stage"))
REPLICAS = Spec("gauge", "kbatch_replicas", "Replicas of each stage (prior, decoder, writer) by state: running, "
                "pending (asked of the cluster, not started) or draining", ("run", "stage", "state"))
IMAGES_PER_SECOND = Spec("gauge", "kbatch_images_per_second", "Images per second over the last minute", ("run",))
ROWS_REMAINING = Spec("gauge", "kbatch_rows_remaining", "Rows of the manifest without records yet (the ETA is "
                      "this over the rate of ray_kbatch_rows_total)", ("run",))
ROWS_MANIFEST = Spec("gauge", "kbatch_rows_manifest", "Rows of the run's manifest (with records from earlier "
                     "runs or not)", ("run",))
GPUS = Spec("gauge", "kbatch_gpus", "GPUs of a cluster shared by kbatch jobs: allotted to this run by the "
            "coordinator, and held by its placed replicas", ("run", "state"))
QUEUE_POSITION = Spec("gauge", "kbatch_queue_position", "The run's place in its cluster's queue of kbatch jobs "
                      "(1: next to start); 0 while it runs", ("run",))

#: every metric kbatch publishes (the driver's and the actors'); the dashboard's queries use only these
SPECS: tuple[Spec, ...] = (ROWS, IMAGES, QUEUE, REPLICAS, IMAGES_PER_SECOND, ROWS_REMAINING, ROWS_MANIFEST,
                           GPUS, QUEUE_POSITION, BATCH_SECONDS)
REPLICA_STATES = ("running", "pending", "draining")
GPU_STATES = ("allotted", "held")


def exported_series() -> set[str]:
    """Every series name Ray's Prometheus endpoint exports for kbatch's metrics."""
    return {name for s in SPECS for name in s.exported()}


class RunMetrics:
    """The driver's metrics of one run. ``tick`` every driver tick (refreshes every :data:`EVERY` s);
    ``end`` once when the run ends."""

    def __init__(self, run_id: str, every: float = EVERY):
        self.run_id, self.every = run_id, every
        self.m = {s.name: Metric(s) for s in (ROWS, IMAGES, QUEUE, REPLICAS, IMAGES_PER_SECOND, ROWS_REMAINING,
                                               ROWS_MANIFEST, GPUS, QUEUE_POSITION)}
        self.sent = {"ok": 0, "failed": 0, "images": 0}  # what the counters hold already
        self.stages: set[str] = set()  # queue stages seen, zeroed at the end
        self.replica_stages: set[str] = set()
        self.scheduled = False  # the run had a schedule (a shared cluster): its gauges are zeroed at the end
        self.at = None  # monotonic time of the last refresh

    def tick(self, progress, queues) -> None:
        """``progress``: the run's ``kbatch.run.progress.Progress``; ``queues``: the driver's ``queues``
        (called only when a refresh is due)."""
        now = time.monotonic()
        if disabled() or (self.at is not None and now - self.at < self.every):
            return
        self.at = now
        self.publish(progress, queues() if callable(queues) else queues)

    def publish(self, progress, queues: dict | None, ended: bool = False) -> None:
        run = {"run": self.run_id}
        ok = progress.done - progress.initial - progress.failed
        counts = {"ok": ok, "failed": progress.failed, "images": progress.images}
        for status in ("ok", "failed"):
            self.m["kbatch_rows"].record(counts[status] - self.sent[status], {**run, "status": status})
        self.m["kbatch_images"].record(counts["images"] - self.sent["images"], run)
        self.sent = counts
        self.m["kbatch_rows_remaining"].record(max(0, progress.total - progress.done), run)
        self.m["kbatch_rows_manifest"].record(progress.total, run)
        rate = 0.0 if ended else progress.snapshot()["images_per_second_recent"]
        self.m["kbatch_images_per_second"].record(rate, run)
        queues = dict(queues or {})
        replicas = queues.pop("replicas", None) or {}
        self.stages |= set(queues)
        for stage in self.stages:
            self.m["kbatch_queue"].record(0 if ended else queues.get(stage, 0), {**run, "stage": stage})
        self.replica_stages |= set(replicas)
        for stage in self.replica_stages:
            r = replicas.get(stage) or {}
            for state in REPLICA_STATES:
                self.m["kbatch_replicas"].record(0 if ended else r.get(state, 0),
                                                 {**run, "stage": stage, "state": state})
        self.publish_schedule(getattr(progress, "schedule", None), ended)

    def publish_schedule(self, schedule: dict | None, ended: bool = False) -> None:
        """The run's share of a cluster shared by kbatch jobs (``Progress.schedule``, set by the driver from
        the coordinator's answers; None for a run alone on its Ray: nothing published): GPUs allotted and
        held, and its queue position (0 while it runs). A run on a CPU-only layout is allotted CPUs: its
        ``kbatch_gpus`` stay 0. At the end: all 0."""
        if not schedule and not self.scheduled:
            return
        self.scheduled = True
        s = schedule or {}
        gpu = not ended and (s.get("resource") or "GPU") == "GPU"
        run = {"run": self.run_id}
        for state in GPU_STATES:
            self.m["kbatch_gpus"].record(float(s.get(state) or 0) if gpu else 0.0, {**run, "state": state})
        queued = not ended and str(s.get("state", "")).upper() == "QUEUED"
        self.m["kbatch_queue_position"].record(int(s.get("queue_position") or 0) if queued else 0, run)

    def end(self, progress, queues: dict | None = None) -> None:
        """The run ended: the final counts, and the gauges of work in progress to 0."""
        if not disabled():
            self.publish(progress, queues, ended=True)
