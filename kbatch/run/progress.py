"""Live progress: a tqdm bar in terminals and notebooks, a log line now and then elsewhere, and the
``progress`` block of ``_job.json`` (rows done and failed, img/s, ETA, queue depth per stage)."""
from __future__ import annotations

import sys
import time

from kbatch.output.job_file import now_iso


class Progress:
    def __init__(self, total: int, initial: int = 0, mode: str = "auto", every: float = 30.0):
        self.total, self.initial, self.done, self.images = total, initial, initial, 0
        self.t0 = time.monotonic()
        self.last = self.t0
        self.every = every
        if mode == "auto":
            mode = "bar" if _interactive() else "log"
        self.mode = mode
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="row", desc="kbatch", dynamic_ncols=True)

    def set(self, rows_this_run: int, images_total: int):
        """Rows given records by this run so far, and its images."""
        done = self.initial + rows_this_run
        if done == self.done and images_total == self.images:
            return
        step, self.done, self.images = done - self.done, done, images_total
        rate = self.images / max(1e-9, time.monotonic() - self.t0)
        if self.bar is not None:
            self.bar.update(step)
            self.bar.set_postfix_str(f"{rate:.2f} img/s", refresh=False)
        elif self.mode == "log" and (time.monotonic() - self.last >= self.every or self.done >= self.total):
            self.last = time.monotonic()
            s = self.snapshot()
            eta = f"{s['eta_seconds']:.0f}s" if s["eta_seconds"] is not None else "?"
            print(f"kbatch progress: {self.done}/{self.total} rows, {self.images} images, "
                  f"{s['images_per_second']:.2f} img/s, ETA {eta}", file=sys.stderr, flush=True)

    def update(self, rows: int, images_total: int):
        self.set(self.done - self.initial + rows, images_total)

    def snapshot(self, queues: dict | None = None) -> dict:
        """The ``progress`` block of ``_job.json``."""
        elapsed = max(1e-9, time.monotonic() - self.t0)
        this_run = self.done - self.initial
        row_rate = this_run / elapsed
        left = max(0, self.total - self.done)
        return {"updated": now_iso(), "rows_total": self.total, "rows_done": self.done,
                "rows_this_run": this_run, "images": self.images, "seconds": round(elapsed, 1),
                "images_per_second": round(self.images / elapsed, 3), "rows_per_second": round(row_rate, 3),
                "eta_seconds": round(left / row_rate, 1) if row_rate > 0 else None, "queues": queues or {}}

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _interactive() -> bool:
    try:
        from IPython import get_ipython  # noqa: F401

        if get_ipython() is not None:
            return True
    except ImportError:
        pass
    return sys.stderr.isatty()
