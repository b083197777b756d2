"""PNG encode rate and size of 512x512 images at zlib levels, on one core: what a writer can keep up with.

Three kinds of content, as the encoder sees them: ``noise`` (uniform random pixels: the worst case, what a
random-weight model makes), ``photo`` (blurred noise with fine grain: closer to a rendered image), ``smooth``
(gradients). Each image is encoded with ``kbatch.output.writer.encode_image`` (the writers' own code) at
each ``compress_level``, one thread, and decoded once to check the pixels come back equal (PNG is lossless
at every level). Prints a markdown table: encodes/s on one core, KiB per image, size vs level 6.

    python bench/png.py                    # levels 1,3,6; 24 images of each kind (~1 min on the 2-core box)
    python bench/png.py --levels 0,1,2,3,6,9 --n 48
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def images(kind: str, n: int, size: int = 512) -> list[np.ndarray]:
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if kind == "noise":
            a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        elif kind == "smooth":
            y, x = np.mgrid[0:size, 0:size] / size
            a = np.stack([x * 255, y * 255, (x + y + i / n) % 1 * 255], -1).astype(np.uint8)
        else:  # photo: large blurred shapes plus a little grain
            base = Image.fromarray(rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8))
            base = base.resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(3))
            a = np.asarray(base).astype(np.int16) + rng.integers(-4, 5, (size, size, 3))
            a = a.clip(0, 255).astype(np.uint8)
        out.append(a)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="1,3,6")
    p.add_argument("--n", type=int, default=24, help="images of each kind")
    p.add_argument("--kinds", default="noise,photo,smooth")
    args = p.parse_args(argv)
    from PIL import Image

    from kbatch.output.writer import encode_image

    levels = [int(x) for x in args.levels.split(",")]
    print(f"PNG encode, 512x512 RGB, one thread; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Pillow {Image.__version__}, load {os.getloadavg()[0]:.2f}")
    print("\n| content | level | encodes/s (one core) | KiB / image | size vs level 6 |\n|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        imgs = images(kind, args.n)
        sizes = {}
        rows = []
        for lv in levels:
            encode_image(imgs[0], "png", png_compress_level=lv)  # warm
            t0 = time.process_time()  # CPU time of this thread: robust to other processes on the box
            blobs = [encode_image(a, "png", png_compress_level=lv) for a in imgs]
            cpu = time.process_time() - t0
            for a, b in zip(imgs[:3], blobs[:3]):
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), a), (kind, lv)
            sizes[lv] = sum(map(len, blobs)) / len(blobs)
            rows.append((lv, len(imgs) / cpu, sizes[lv]))
        for lv, rate, size in rows:
            rel = f"{size / sizes[6]:.2f}x" if 6 in sizes else "-"
            print(f"| {kind} | {lv} | {rate:.0f} | {size / 1024:.0f} | {rel} |")
    print(f"\nload after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
