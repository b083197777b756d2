"""Live progress: a tqdm bar in terminals, a live view in Jupyter notebooks, a log line now and then
elsewhere, and the ``progress`` block of ``_job.json`` (rows done, ok, failed and missing, img/s, ETA,
queue depth and replicas per stage).

``mode``: ``auto`` picks ``notebook`` in a Jupyter kernel (an HTML view updated in place: the same view as
``kbatch status --watch`` and ``JobHandle.progress()``, ``kbatch.run.watch``), ``bar`` on a terminal,
``log`` otherwise; ``off`` shows nothing (the ``_job.json`` block is still made).

On a cluster shared with other kbatch jobs the driver hands over the run's place among them
(:meth:`Progress.set_schedule`: ``QUEUED`` with its position and the runs ahead, ``RUNNING``, ``DRAINING``;
the dict ``_job.json`` holds as ``schedule``): the notebook view shows it, the bar and the log print a line
when it changes, and the metrics publish it (``kbatch.run.metrics``)."""
from __future__ import annotations

import sys
import time
from collections import deque

from kbatch.output.job_file import now_iso

RECENT = 60.0  # seconds: the "recent" img/s (last minute)
ETA_WINDOW = 300.0  # seconds: the row rate the ETA divides by (the last five minutes, or the run so far)
NOTEBOOK_EVERY = 2.0  # seconds between redraws of the notebook view


class Progress:
    def __init__(self, total: int, initial: int = 0, mode: str = "auto", every: float = 30.0, *,
                 failed_before: int = 0, root: str | None = None, run_id: str | None = None):
        """``initial``: rows with records before this run (``failed_before`` of them only errors)."""
        self.total, self.initial, self.done, self.images = total, initial, initial, 0
        self.failed_before, self.failed = failed_before, 0
        self.root, self.run_id = root, run_id
        self.t0 = time.monotonic()
        self.last = self.t0
        self.every = every
        self._samples: deque = deque([(self.t0, 0, 0)])  # (monotonic, rows this run, images), >= 1 s apart
        if mode == "auto":
            mode = "notebook" if _in_notebook() else "bar" if _interactive() else "log"
        self.mode = mode
        self.bar = None
        self._display = None
        self._drawn = 0.0
        self.schedule: dict | None = None  # _job.json's "schedule", set by the driver (set_schedule)
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="row", desc="kbatch", dynamic_ncols=True)
        elif mode == "notebook":
            self._draw_notebook(None, force=True)

    def set(self, rows_this_run: int, images_total: int, failed_this_run: int | None = None, queues=None):
        """Rows given records by this run so far (``failed_this_run`` of them only errors), and its images.
        ``queues``: the driver's queue depths (a dict, or a callable called only when shown)."""
        if failed_this_run is not None:
            self.failed = failed_this_run
        now = time.monotonic()
        if now - self._samples[-1][0] >= 1.0:
            self._samples.append((now, rows_this_run, images_total))
            while len(self._samples) > 2 and now - self._samples[1][0] > ETA_WINDOW:
                self._samples.popleft()
        done = self.initial + rows_this_run
        changed = done != self.done or images_total != self.images
        step, self.done, self.images = done - self.done, done, images_total
        if self.mode == "notebook":
            self._draw_notebook(queues, force=self.done >= self.total and changed)
            return
        if not changed:
            return
        if self.bar is not None:
            self.bar.update(step)
            eta = self._eta()
            self.bar.set_postfix_str(f"{self._rate(RECENT)[1]:.2f} img/s, {self.failed_before + self.failed} failed"
                                     + (f", ETA {_duration(eta)}" if eta is not None else ""), refresh=False)
        elif self.mode == "log" and (time.monotonic() - self.last >= self.every or self.done >= self.total):
            self.last = time.monotonic()
            s = self.snapshot()
            eta = f"{s['eta_seconds']:.0f}s" if s["eta_seconds"] is not None else "?"
            print(f"kbatch progress: {self.done}/{self.total} rows ({s['rows_failed']} failed), {self.images} "
                  f"images, {s['images_per_second_recent']:.2f} img/s, ETA {eta}", file=sys.stderr, flush=True)

    def set_schedule(self, schedule: dict | None) -> None:
        """The run's place among the cluster's kbatch jobs now (``_job.json``'s ``schedule``). A change of
        state or queue position is shown at once: a redraw in a notebook, a line on a bar or in a log."""
        before = _schedule_key(self.schedule)
        self.schedule = dict(schedule) if schedule else None
        if _schedule_key(self.schedule) == before or self.schedule is None:
            return
        if self.mode == "notebook":
            self._draw_notebook(None, force=True)
            return
        from kbatch.run.watch import queue_text, schedule_line, schedule_of

        s = schedule_of({"schedule": self.schedule})
        if s is None:
            return
        text = (f"kbatch: QUEUED, {queue_text(s)}; it starts when it gets GPUs" if s["state"] == "QUEUED" else
                f"kbatch: {s['state']}: {schedule_line(s)}")
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.mode == "log":
            print(text, file=sys.stderr, flush=True)

    def update(self, rows: int, images_total: int):
        self.set(self.done - self.initial + rows, images_total)

    def _rate(self, window: float) -> tuple[float, float]:
        """(rows/s, img/s) over the last ``window`` seconds (or since the start, if shorter)."""
        now = time.monotonic()
        rows, images = self.done - self.initial, self.images
        ref = self._samples[0]
        for s in self._samples:
            if now - s[0] <= window:
                ref = s
                break
        dt = now - ref[0]
        if dt < 1e-6:
            return 0.0, 0.0
        return (rows - ref[1]) / dt, (images - ref[2]) / dt

    def _eta(self) -> float | None:
        left = max(0, self.total - self.done)
        if left == 0:
            return 0.0
        row_rate = self._rate(ETA_WINDOW)[0]
        return left / row_rate if row_rate > 0 else None

    def snapshot(self, queues: dict | None = None) -> dict:
        """The ``progress`` block of ``_job.json``. ``images_per_second`` and ``rows_per_second``: over the
        run so far; ``images_per_second_recent``: over the last minute; ``eta_seconds``: rows left at the row
        rate of the last five minutes (or of the run so far, if shorter)."""
        elapsed = max(1e-9, time.monotonic() - self.t0)
        this_run = self.done - self.initial
        failed = self.failed_before + self.failed
        eta = self._eta()
        return {"updated": now_iso(), "rows_total": self.total, "rows_done": self.done,
                "rows_ok": self.done - failed, "rows_failed": failed, "rows_missing": max(0, self.total - self.done),
                "rows_this_run": this_run, "images": self.images, "seconds": round(elapsed, 1),
                "images_per_second": round(self.images / elapsed, 3),
                "images_per_second_recent": round(self._rate(RECENT)[1], 3),
                "rows_per_second": round(this_run / elapsed, 3),
                "eta_seconds": round(eta, 1) if eta is not None else None, "queues": queues or {}}

    # ----------------------------------------------------------------------------------------- notebook
    def _draw_notebook(self, queues, force: bool = False, job: dict | None = None) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < NOTEBOOK_EVERY:
            return
        self._drawn = now
        try:
            from IPython.display import HTML, display

            from kbatch.run.watch import format_html, make_view

            q = queues() if callable(queues) else queues
            if job is None:
                job = {"run_id": self.run_id, "status": "running", "schedule": self.schedule}
                view = make_view(self.root or "", job, progress=self.snapshot(q))
            else:
                view = make_view(self.root or "", job)
            if self._display is None:
                self._display = display(HTML(format_html(view)), display_id=True)
            else:
                self._display.update(HTML(format_html(view)))
        except Exception:  # noqa: BLE001 - a view that cannot draw is no reason to stop a run
            self.mode = "off"

    def end(self, job: dict) -> None:
        """The run has ended (``job``: its final ``_job.json``): the notebook view shows the end."""
        if self.mode == "notebook":
            self._draw_notebook(None, force=True, job=job)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _schedule_key(s: dict | None):
    return None if not s else (s.get("state"), s.get("queue_position"))


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _in_notebook() -> bool:
    """A Jupyter kernel (not a terminal IPython): HTML output is shown and can be updated in place."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _interactive() -> bool:
    try:
        from IPython import get_ipython  # noqa: F401

        if get_ipython() is not None:
            return True
    except ImportError:
        pass
    return sys.stderr.isatty()
