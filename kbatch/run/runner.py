"""One run of a job: plan (no models), then drive the stages on Ray, then account and commit.

``run_job`` is the entry point of ``kbatch run``, ``jobs/render.py`` and ``kbatch.render``. Planning
(``Runner.plan``) takes the output's lease, opens the manifest, scans it against the output's records
(``kbatch.plan.resume_scan``: what to skip, what to render again, duplicates) and checks the models, all before Ray or
any model; the run (``Runner.run``) resolves the layout for the cluster (``kbatch.run.layout``), builds the stage
pools and runs the driver loop (``kbatch.run.driver``); the end writes ``_job.json`` with honest counts of this
manifest's ids, the gallery, and ``_SUCCESS`` when every row has its records.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
import traceback
from dataclasses import dataclass, field

from kbatch.cluster.seat import RunCancelled
from kbatch.config import SIM, ConfigError, JobConfig, check_storage
from kbatch.output.job_file import JOB_FILE, SUCCESS_FILE, check_config, fingerprint, meaning, new_run_id, now_iso, versions
from kbatch.run.progress import Progress

log = logging.getLogger("kbatch")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_INCOMPLETE = 0, 1, 2, 3
PROGRESS_EVERY = 5.0  # seconds between progress writes to _job.json (read by kbatch status --watch)


@dataclass
class RunResult:
    output: str
    run_id: str
    exit_code: int
    complete: bool
    rows_total: int  # rows of this manifest
    rows_skipped: int  # had records before this run (resume): ok, or failed and not rendered again
    rows_ok: int  # rendered by this run
    rows_failed: int  # failed in this run
    rows_missing: int  # without records (never negative)
    images: int
    seconds: float
    images_per_second: float
    stage_seconds: dict = field(default_factory=dict)
    failed_by_reason: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)  # per stage: peak worker RSS, peak GPU memory (GiB)
    rows_failed_before: int = 0  # of the skipped rows: those whose only records are errors
    error: str | None = None  # why the run stopped early (a stage that cannot go on, an unexpected error)
    rows_filtered: int = 0  # ended by this run as ``filtered``: quality.gate kept no candidate (docs/quality.md)

    def summary_line(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.failed_by_reason.items()))
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items())
        before = f", {self.rows_failed_before} failed before" if self.rows_failed_before else ""
        return (f"kbatch: {'complete' if self.complete else 'INCOMPLETE'} | rows {self.rows_total} "
                f"(ok {self.rows_ok}, " + (f"filtered {self.rows_filtered}, " if self.rows_filtered else "")
                + f"failed {self.rows_failed}, missing {self.rows_missing}, "
                f"skipped {self.rows_skipped}{before}) | images {self.images} | {self.images_per_second:.2f} img/s | "
                f"{self.seconds:.1f}s | stages: {stages}" + (f" | failures: {reasons}" if reasons else "")
                + (f" | stopped: {self.error}" if self.error else ""))


class Runner:
    """One run of a job on the connected Ray cluster."""

    def __init__(self, cfg: JobConfig, *, overwrite: bool = False, retry_failed: bool = False,
                 progress: str | None = None, table=None):
        from kbatch.storage import absolute_local

        self.cfg = cfg
        self.table = table  # an in-memory manifest (kbatch.render of a DataFrame); URIs resolve from cwd
        self.overwrite, self.retry_failed = overwrite, retry_failed
        self.progress_mode = progress or cfg.progress
        self.run_id = new_run_id()
        self.output = absolute_local(cfg.resolved_output())  # writers may run in another directory
        if self.output != cfg.resolved_output() and "_ray_pkg_" in self.output:
            log.warning("kbatch: output %r is relative and this job runs in Ray's temporary copy of its working "
                        "dir, so the images would land in %s and be deleted with it; use an absolute path, "
                        "a shared filesystem or object storage", cfg.resolved_output(), self.output)
        self.so = dict(cfg.storage_options) or None  # fsspec options (endpoint, credentials): config only
        self.lease = None
        # on a Ray this process did not start (a cluster others may use), the run takes a seat at the
        # cluster's coordinator and follows its allotment (kbatch.run.share); run_job sets it
        self.shared = False
        self.share = None

    # ------------------------------------------------------------------------------------------ planning
    def plan(self) -> "Runner":
        """Lease, manifest, resume scan, model checks. Loads no model, starts no Ray. Raises ConfigError."""
        from kbatch.plan.resume_scan import ChangedRows, scan
        from kbatch.output.job_file import ResumeError
        from kbatch.output.lease import Lease
        from kbatch.plan.manifest import ManifestSource
        from kbatch.plan.planner import Planner

        cfg = self.cfg
        check_storage(cfg)
        if self.table is not None:
            source = ManifestSource.from_table(self.table, os.getcwd())
        elif not cfg.manifest:
            raise ConfigError("config key 'manifest' must be set (config or --manifest), got None")
        elif cfg.stage == "decoder":
            from kbatch.plan.manifest import embeddings_source

            source = embeddings_source(cfg.manifest, self.so, cfg.limits)
        else:
            source = ManifestSource.open(cfg.manifest, self.so)
        self.source = source
        self.lease = Lease.acquire(self.output, self.run_id, self.so, ttl=cfg.output.lease_ttl)
        self.lease.start_renewing()  # from now until the run's last byte: planning, Ray's start, the finish
        try:
            self.previous = self.lease.read_marker(JOB_FILE)  # and its version: the first write is if-version
            pending = self.lease.overwrite_pending  # a run that held the output before did not finish one
            if self.overwrite or pending:
                from kbatch.output.overwrite import overwrite

                if pending and not self.overwrite:
                    log.warning("kbatch: run %r was overwriting %s when it lost the output; finishing its "
                                "overwrite first", pending.get("run_id"), self.output)
                overwrite(self.lease, self.so)  # fenced: stops with LeaseLost once the lease is not this run's
                self.previous = None
            check_config(self.previous, cfg)
            stamp = source.stamp()
            prev = self.previous or {}
            trusted = prev.get("stamp_since") if stamp is not None and prev.get("manifest_stamp") == stamp else None
            self.stamp_since = trusted or self.run_id
            self.planner = Planner(cfg, source, None, self.run_id)
            t0 = time.perf_counter()
            try:
                self.scan = scan(source, self.output, self.so, trusted_since=trusted, retry_failed=self.retry_failed,
                                 check=self.planner.fingerprints, runs=prev.get("runs") or [])
            except ChangedRows as e:
                raise ResumeError(f"manifest rows changed since their records were written (ids: {e.ids}"
                                  f"{' ...' if e.count > len(e.ids) else ''}; {e.count} rows); use a new output "
                                  "path, or --overwrite to start over") from None
            self.planner.scan = self.scan
            self.scan_seconds = time.perf_counter() - t0
            from kbatch.models.compile_plan import ShapeImages, check_before_start

            self.shapes = job_shapes(source, cfg) if self.scan.to_render and cfg.stage != "prior" else ShapeImages()
            self.need_inpaint = any(s[0] == "inpaint" for s in self.shapes)
            check_models(cfg, self.need_inpaint, self.so, bool(self.scan.to_render))
            if cfg.quality.heads:  # every head loads and fits the prior's image encoder (docs/quality.md)
                from kbatch.models.heads import check_heads

                check_heads(cfg, self.so)
            if cfg.models.decoder != SIM:  # models.compile: true that would recompile mid-run: exit 2 now
                check_before_start(cfg.models.compile, cfg.resources.device, self.shapes,
                                   self.shapes.max_num_images, cfg.resources.decoder.batch_size)
        except BaseException:
            self.lease.release()
            raise
        return self

    # ------------------------------------------------------------------------------------------ running
    def run(self) -> RunResult:
        from kbatch import storage

        cfg = self.cfg
        t_start = time.perf_counter()
        scan = self.scan
        self.job = {"output": self.output, "run_id": self.run_id, "status": "running", "started": now_iso(),
                    "fingerprint": fingerprint(cfg), "meaning": meaning(cfg), "config": cfg.public_dict(),
                    "manifest": self.source.uri if self.table is None else "<in-memory>",
                    "manifest_base": self.source.base_uri,
                    "manifest_stamp": self.source.stamp(), "stamp_since": self.stamp_since,
                    "total_rows": scan.total, "versions": versions(),
                    "models": {"prior": cfg.models.prior, "decoder": cfg.models.decoder, "inpaint": cfg.models.inpaint},
                    "plan": {"rows": scan.total, "skipped_ok": scan.skipped_ok, "skipped_failed": scan.skipped_failed,
                             "to_render": scan.to_render, "checked": scan.checked,
                             "scan_seconds": round(self.scan_seconds, 3)},
                    "runs": (self.previous or {}).get("runs", []) + [self.run_id],
                    "lease": {"epoch": self.lease.epoch, "ttl": self.lease.ttl}}
        from kbatch.output.lease import LeaseLost

        try:  # fenced: only while this run holds the output's lease
            self.lease.remove(SUCCESS_FILE)
            self.lease.write_json(JOB_FILE, self.job)
        except LeaseLost as e:
            self.lease.release()
            return self._lost(t_start, e)
        self.progress = Progress(scan.total, initial=scan.skipped_ok + scan.skipped_failed, mode=self.progress_mode,
                                 failed_before=scan.skipped_failed, root=self.output, run_id=self.run_id)
        self.driver = None
        self.metrics = None  # kbatch.run.metrics.RunMetrics, once Ray is up
        interrupted, error, unexpected, lost = False, None, False, None
        self.cancelled = None
        previous_handler = _sigterm_interrupts()
        try:
            if scan.to_render:
                self._drive()
        except LeaseLost as e:  # another run holds the output now: stop, write nothing more
            lost = e
        except KeyboardInterrupt:
            interrupted = True
            log.warning("kbatch: interrupted; committed shards are kept, rerun to finish")
        except RunCancelled as e:  # `kbatch cancel`: as SIGTERM, with the reason
            interrupted, self.cancelled = True, str(e)
            log.warning("kbatch: %s", e)
        except Exception as e:  # a stage that cannot go on, or a bug: the run ends incomplete, with the cause
            from kbatch.run.work import StageFailed

            error = str(e) if isinstance(e, StageFailed) else f"{type(e).__name__}: {e}"
            unexpected = not isinstance(e, StageFailed)
            if unexpected:
                log.error("kbatch: run stopped by an unexpected error:\n%s", traceback.format_exc())
            else:
                log.error("kbatch: %s", error)
        finally:
            self.progress.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        try:
            if lost is None and self.lease.lost is None:
                try:
                    return self._finish(t_start, interrupted, error, unexpected)
                except LeaseLost as e:
                    lost = e
            return self._lost(t_start, lost or LeaseLost(self.lease.lost))
        finally:
            self.lease.release()  # stops the renewer; best effort

    def _lost(self, t_start: float, e: BaseException) -> RunResult:
        """The run lost its lease: it wrote nothing more (no commit, no ``_job.json``, no ``_SUCCESS``) and
        ends with exit 3, naming the run that holds the output now."""
        d = self.driver.outcomes if getattr(self, "driver", None) is not None else None
        scan = self.scan
        rows_ok, rows_failed, filtered = (d.rows_ok, d.rows_failed, d.rows_filtered) if d else (0, 0, 0)
        skipped = scan.skipped_ok + scan.skipped_failed
        seconds = time.perf_counter() - t_start
        message = f"stopped, writing nothing more: {e}"
        log.error("kbatch: %s", message)
        return RunResult(self.output, self.run_id, EXIT_INCOMPLETE, False, scan.total, skipped, rows_ok, rows_failed,
                         max(0, scan.total - skipped - rows_ok - rows_failed - filtered), d.images if d else 0,
                         seconds, (d.images if d else 0) / seconds if seconds else 0.0, error=message,
                         rows_failed_before=scan.skipped_failed, rows_filtered=filtered)

    def _drive(self):
        import ray

        from kbatch.run.driver import Driver
        from kbatch.run.stage_pool import NodeTable
        from kbatch.run.stage_setup import build_stages

        self.nodes = NodeTable(ray)
        self.nodes.refresh(force=True)
        stages = build_stages(ray, self.cfg, self.run_id, self.output, self.so, self.nodes, self.need_inpaint,
                              sorted(self.shapes),
                              shape_images=self.shapes.scaled(self.scan.to_render / max(1, self.scan.total)),
                              budget=lambda: self.share.budget() if self.share is not None else None)
        models = [p for p in (stages.prior, stages.decoder) if p is not None]
        self.models = [p for i, p in enumerate(models) if p not in models[:i]]  # colocated: one pool
        if self.shared:  # a seat at the cluster's coordinator before any replica: a queued run starts none
            from kbatch.cluster.seat import Seat
            from kbatch.run.share import Share

            seat = Seat(ray, Share.demand_for(stages.cfg, self.run_id, self.output, self.models, self.nodes))
            seat.start()
            self.share = Share(self.cfg, seat)
            for p in self.models:
                p.queued = self.share.queued
            try:
                self._schedule_tick(self.progress)
            except BaseException:
                self.share.close()
                raise
        self.run_cfg = stages.cfg
        self.job["layout"] = stages.layout
        if stages.compile is not None:  # models.compile / decoder batch: the decision, its rule and inputs
            self.job["compile"] = stages.compile
        from kbatch.run.metrics import RunMetrics

        self.metrics = RunMetrics(self.run_id)
        self._last_write = time.monotonic()
        self.lease.check()
        spec = dataclasses.replace(stages.spec, fence=self.lease.fence())  # every write call carries the fence
        self.driver = Driver(ray, stages.cfg, self.planner, self.run_id, spec=spec, prior=stages.prior,
                             decoder=stages.decoder, writers=stages.writers, loaders=stages.loaders,
                             stored_priors=stages.stored_priors, nodes=self.nodes,
                             describe_cluster=stages.describe, on_tick=self._tick, balance=stages.balance,
                             share=self.share)
        try:
            self.driver.run()
        finally:  # also on Ctrl-C / SIGTERM: never leave actors holding GPUs on a long-lived cluster
            self.driver.stop()
            from kbatch.models.actors import kv_del_prefix

            kv_del_prefix(self.run_id)
            if self.share is not None:  # its share goes back to the others at once
                self.job["schedule"] = self.share.snapshot()
                self.share.close()

    def _schedule_tick(self, progress) -> bool:
        """The run's share of a shared cluster (kbatch.run.share): demand sent, cancel and queue_timeout
        checked, ``_job.json``'s ``schedule`` and the progress view updated. Whether the state moved."""
        writers = self.driver.writers if getattr(self, "driver", None) is not None else None
        self.share.tick(time.monotonic(), self.models, writers, progress, self.nodes)
        moved = self.share.changed
        self.job["schedule"] = self.share.snapshot()
        progress.set_schedule(self.job["schedule"])
        return moved

    def _tick(self, driver) -> None:
        """Every driver tick: the progress bar/log, and every PROGRESS_EVERY seconds ``_job.json``'s
        ``progress`` and the lease."""
        from kbatch import storage

        res = driver.outcomes
        self.progress.set(res.rows_ok + res.rows_filtered + res.rows_failed, res.images, res.rows_failed, queues=driver.queues)
        moved = self._schedule_tick(self.progress) if self.share is not None else False
        self.metrics.tick(self.progress, driver.queues)
        self.lease.check()  # the renewer found the lease lost: LeaseLost stops the driver (and its writers)
        if any("Fenced:" in f for f in res.write_failures):  # a writer was refused: whose lease is it?
            self.lease.verify()
        now = time.monotonic()
        if now - self._last_write < PROGRESS_EVERY and not moved:  # a new queue state is written at once
            return
        self._last_write = now
        self.job["progress"] = self.progress.snapshot(queues=driver.queues())
        if driver.balance is not None:  # the split so far (the finish writes the whole driver section)
            self.job.setdefault("driver", {})["balance"] = driver.balance.history
        from kbatch.output.lease import LeaseLost

        try:
            self.lease.write_json(JOB_FILE, self.job)  # fenced; raises LeaseLost
        except LeaseLost:
            raise
        except Exception as e:  # noqa: BLE001 - a storage hiccup: the next interval writes it again
            log.warning("kbatch: progress not written to %s (%s: %s); retrying in %.0f s", JOB_FILE,
                        type(e).__name__, e, PROGRESS_EVERY)

    def _finish(self, t_start: float, interrupted: bool, error: str | None, unexpected: bool = False) -> RunResult:
        from kbatch import storage

        cfg, scan = self.cfg, self.scan
        d = self.driver.outcomes if self.driver is not None else None  # the run's results
        rows_ok = d.rows_ok if d else 0
        rows_failed = d.rows_failed if d else 0
        filtered = d.rows_filtered if d else 0
        n_images = d.images if d else 0
        skipped = scan.skipped_ok + scan.skipped_failed
        missing = scan.total - skipped - rows_ok - rows_failed - filtered
        if missing < 0:  # never: every row of this run is one of scan.to_render
            log.error("kbatch: accounting error: %d rows more than the manifest has", -missing)
            missing = 0
        unseen = [] if interrupted or d is None else self._unseen_shards(d.committed)
        if d is not None and d.write_failures and not error:
            error = f"{len(d.write_failures)} shard writes failed (e.g. {d.write_failures[0]})"
        complete = missing == 0 and not interrupted and not unseen and error is None
        seconds = time.perf_counter() - t_start
        failed_total = rows_failed + scan.skipped_failed
        tolerance = max(cfg.retries.max_failed_rows, int(cfg.retries.max_failed_fraction * scan.total))
        code = EXIT_INCOMPLETE if not complete else (EXIT_FAILED if failed_total > tolerance else EXIT_OK)
        result = RunResult(self.output, self.run_id, code, complete, scan.total, skipped, rows_ok, rows_failed,
                           missing, n_images, seconds, n_images / seconds if seconds else 0.0,
                           dict(d.stats) if d else {}, dict(d.failed_by_reason) if d else {},
                           dict(d.memory) if d else {}, scan.skipped_failed, error, filtered)
        if self.cancelled and not error:
            error = result.error = self.cancelled
        status = ("complete" if complete else "cancelled" if self.cancelled else "interrupted" if interrupted
                  else "failed" if unexpected else "incomplete")
        self.progress.set(rows_ok + filtered + rows_failed, n_images, rows_failed)
        job = self.job
        job.update(status=status, exit_code=code, finished=now_iso(), result=dataclasses.asdict(result),
                   worker_start_errors=dict(d.start_errors) if d else {}, unseen_shards=unseen, error=error,
                   progress=self.progress.snapshot(queues=self.driver.queues() if d else {}))
        self.progress.end(job)  # the notebook view shows the end
        if self.metrics is not None:  # final counts; the gauges of work in progress to 0
            self.metrics.end(self.progress, job["progress"]["queues"])
        if d is not None:
            import resource

            ru = resource.getrusage(resource.RUSAGE_SELF)
            job["driver"] = {"gets": d.driver_gets, "windows": self.planner.windows,
                             "high_water": dict(self.driver.dispatch.high),
                             "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
                             "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 2),
                             "first_image_seconds": d.first_image_at, "loop_seconds": self.driver.loop_seconds,
                             "replicas": self.driver.replica_counts(),
                             # the prior:decoder split over time and why it moved (kbatch.run.balance)
                             "balance": self.driver.balance.history if self.driver.balance is not None else None}
            if "compile" in job and getattr(d, "compile_warmups", None):  # the measured warm-up per shape
                from kbatch.models.compile_plan import warmup_summary

                job["compile"]["warmup"] = warmup_summary(d.compile_warmups)
        self.lease.write_json(JOB_FILE, job)  # fenced: raises LeaseLost once another run holds the output
        if complete:
            if cfg.output.gallery and cfg.stage != "prior":
                self.lease.check()
                try:
                    from kbatch.output.gallery import write_gallery

                    # the header's numbers are this run's accounting (this manifest's ids; complete: every
                    # row has records), so the gallery reads only the newest shards (and, when rows failed,
                    # the id/status columns of every shard, a few at a time, to list the failures)
                    counts = {"rows": skipped + rows_ok + filtered + rows_failed, "images": scan.images + n_images,
                              "errors": scan.skipped_failed + rows_failed}
                    write_gallery(self.output, max_images=cfg.output.gallery_max_images, storage_options=self.so,
                                  counts=counts)
                except Exception as e:  # the gallery is a convenience, never a reason to fail a run
                    log.warning("kbatch: gallery not written: %s", e)
            self.lease.write_json(SUCCESS_FILE, {"run_id": self.run_id, "finished": now_iso(), "rows": scan.total,
                                                 "lease_epoch": self.lease.epoch})
        return result

    def _unseen_shards(self, committed: set[int]) -> list[str]:
        """Shards this run's writers committed that the driver cannot list: written to a local path on
        another node (or any storage the driver does not share). Such a run is not complete."""
        if not committed:
            return []
        from kbatch.output.writer import list_committed_shards

        try:
            visible = {s for s in list_committed_shards(self.output, self.so) if s.startswith(self.run_id)}
        except Exception as e:  # a storage hiccup at the very end must not throw the finished run away
            log.warning("kbatch: could not list %s to check the shards of this run: %s: %s", self.output,
                        type(e).__name__, e)
            return []
        unseen = sorted(f"{self.run_id}-{s:05d}" for s in committed if f"{self.run_id}-{s:05d}" not in visible)
        if unseen:
            log.error("kbatch: %d of the %d shards written by this run are not visible from the driver at %s "
                      "(first: %s): written on another node's local disk? Use object storage (s3://, gs://) or a "
                      "shared filesystem. The run is incomplete.", len(unseen), len(committed), self.output,
                      unseen[0])
        return unseen


def job_shapes(source, cfg: JobConfig) -> "ShapeImages":
    """``Row.unet_shape()`` of every row that could render (mode, size, guided) with the images asked of it:
    which UNets the decoders load (inpaint or not), compile (``models.compile``) and whether compiling pays
    (``kbatch.models.compile_plan``); ``.max_num_images``: the most images one row renders (num_images x
    quality.best_of). A cheap pass over five columns; values that validation would reject are left out."""
    from collections import Counter

    import pyarrow.compute as pc

    from kbatch.models.compile_plan import ShapeImages

    d, lim = cfg.defaults, cfg.limits
    want = ["mode", "height", "width", "guidance_scale", "num_images"]
    out = ShapeImages()
    best_of = int(getattr(getattr(cfg, "quality", None), "best_of", 1) or 1)
    for _, batch in source.batches([c for c in want if c in source.columns], batch_size=65536):
        cols = {}
        for name, default in (("mode", "text2img"), ("height", d.height), ("width", d.width),
                              ("guidance_scale", d.guidance_scale), ("num_images", d.num_images)):
            if name in batch.schema.names:
                try:
                    cols[name] = pc.fill_null(batch.column(name), default).to_pylist()
                except Exception:  # noqa: BLE001 - odd types: validation will name them
                    cols[name] = [default] * batch.num_rows
            else:
                cols[name] = [default] * batch.num_rows
        counts = Counter(zip(cols["mode"], cols["height"], cols["width"], cols["guidance_scale"],
                             cols["num_images"]))
        for (mode, h, w, g, n), rows in counts.items():
            h, w, n = _whole(h), _whole(w), _whole(n)  # a column with nulls in pandas is float: 64.0
            if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 and h % 64 == 0 and w % 64 == 0
                    and h * w <= lim.max_pixels and isinstance(g, (int, float))
                    and isinstance(n, int) and 1 <= n <= lim.max_num_images):
                continue
            k = n * best_of  # the images one row renders (quality.best_of: k candidates of each)
            out.add((("inpaint" if mode == "inpaint" else "base"), h, w, float(g) > 1), rows * k, k)
    return out


def _whole(v):
    """An integral float (what validation accepts, kbatch.plan.validate) as an int; anything else unchanged."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return v


def check_models(cfg: JobConfig, need_inpaint: bool, storage_options, rendering: bool) -> None:
    """Every model location the job's stages load is checked before any actor starts (exit 2 if not)."""
    if not rendering:
        return
    try:
        from kbatch.models.store import check_model
    except ImportError:  # pragma: no cover
        return
    m = cfg.models
    wanted = []
    if cfg.stage != "decoder":
        wanted.append(("models.prior", m.prior, "KandinskyPriorPipeline"))
    if cfg.stage != "prior":
        wanted.append(("models.decoder", m.decoder, "KandinskyPipeline"))
        if need_inpaint and m.decoder != SIM:
            wanted.append(("models.inpaint", m.inpaint, "KandinskyInpaintPipeline"))
    for key, uri, cls in wanted:
        if uri != SIM:
            check_model(key, uri, cls, storage_options)


def _sigterm_interrupts():
    """Schedulers stop jobs with SIGTERM: end like Ctrl-C (committed shards kept, exit 3). Installed at the
    start of a run, after ray.init (whose own handler it replaces for the run's duration)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


# ----------------------------------------------------------------------------------------------- entry


def ensure_ray(num_cpus: int | None = None):
    """Connect to RAY_ADDRESS if set, else start a local Ray. Returns True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def run_job(cfg: JobConfig, *, overwrite: bool = False, retry_failed: bool = False, progress: str | None = None,
            table=None) -> RunResult:
    """Plan (no models), then render on the connected Ray, or a local one started (and stopped) here.
    ``table``: an in-memory manifest instead of ``cfg.manifest``. ``retry_failed``: also render again every
    row whose only records are errors."""
    runner = Runner(cfg, overwrite=overwrite, retry_failed=retry_failed, progress=progress, table=table).plan()
    if not runner.scan.to_render:  # nothing left (a rerun of a finished job): no Ray needed
        return runner.run()
    try:
        started = ensure_ray()
    except BaseException:
        runner.lease.release()
        raise
    runner.shared = on_shared_cluster()  # connected by address: other kbatch jobs may run there (kbatch.run.share)
    try:
        return runner.run()
    finally:
        if started:
            stop_local_ray()


def on_shared_cluster() -> bool:
    """Whether the connected Ray is a cluster other drivers may use: one this process connected to by
    address (a cluster, ``ray job submit``, a notebook attached to one), not a head it started itself
    (``ray.init()`` without an address, kbatch's own local Ray), which has no other kbatch jobs."""
    try:
        import ray

        node = ray._private.worker._global_node
        return not (node is not None and node.head)
    except Exception:  # noqa: BLE001 - a private Ray API moved: assume others may share it
        return True


def stop_local_ray():
    """``ray.shutdown()`` of the local Ray this process started. Ray stops the autoscaler monitor after the
    GCS, and the monitor then spends its whole 1 s grace period failing to report to the dead GCS; a local
    one-node Ray has nothing to autoscale, so the monitor goes first (a private call: skipped if it moves)."""
    import ray

    try:
        node = ray._private.worker._global_node
        if node is not None and node.head:
            node.kill_monitor(check_alive=False)
    except Exception:  # pragma: no cover - Ray internals changed: fall back to the plain shutdown
        pass
    ray.shutdown()
