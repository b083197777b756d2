"""Live progress: a tqdm bar in terminals and notebooks, a log line now and then elsewhere."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, initial: int = 0, mode: str = "auto", every: float = 30.0):
        self.total, self.done, self.images = total, initial, 0
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

    def update(self, rows: int, images_total: int):
        self.done += rows
        self.images = images_total
        rate = self.images / max(1e-9, time.monotonic() - self.t0)
        if self.bar is not None:
            self.bar.update(rows)
            self.bar.set_postfix_str(f"{rate:.2f} img/s", refresh=False)
        elif self.mode == "log" and (time.monotonic() - self.last >= self.every or self.done >= self.total):
            self.last = time.monotonic()
            left = self.total - self.done
            row_rate = (self.done) / max(1e-9, self.last - self.t0)
            eta = f"{left / row_rate:.0f}s" if row_rate > 0 else "?"
            print(f"kbatch progress: {self.done}/{self.total} rows, {self.images} images, {rate:.2f} img/s, "
                  f"ETA {eta}", file=sys.stderr, flush=True)

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
