"""Generation parameters: the checks shared by manifest rows (``kbatch.plan.validate``) and the config's
``defaults`` (``kbatch.config``). A leaf module: it imports neither of them."""
from __future__ import annotations

import math
import numbers
from typing import Any

from kbatch.schema.rows import PARAM_FIELDS


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def check_params(params: dict, limits) -> list[tuple[str, object, str]]:
    """Check the generation parameters present (non-None) in ``params``.

    Returns ``[(field, value, "must be ...")]`` in field order; ``[]`` when all is well. Other keys are
    ignored. Types are strict: ints must be ints (not floats, strings or bools); floats must be finite numbers.
    """
    problems: list[tuple[str, object, str]] = []
    for f, hi in (("num_images", limits.max_num_images), ("num_inference_steps", limits.max_steps),
                  ("prior_num_inference_steps", limits.max_steps)):
        v = params.get(f)
        if v is None:
            continue
        if not is_int(v):
            problems.append((f, v, f"must be an integer in [1, {hi}]"))
        elif not 1 <= v <= hi:
            limit = "limits.max_num_images" if f == "num_images" else "limits.max_steps"
            problems.append((f, v, f"must be in [1, {hi}] ({limit})"))
    sizes = {}
    for f in ("height", "width"):
        v = params.get(f)
        if v is None:
            continue
        if not is_int(v):
            problems.append((f, v, "must be an integer multiple of 64"))
        elif v < 64:
            problems.append((f, v, "must be >= 64"))
        elif v % 64:
            problems.append((f, v, "must be a multiple of 64"))
        else:
            sizes[f] = int(v)
    if len(sizes) == 2 and sizes["height"] * sizes["width"] > limits.max_pixels:
        h, w = sizes["height"], sizes["width"]
        problems.append(("height", h, f"must keep height*width <= {limits.max_pixels} (limits.max_pixels); "
                                      f"height*width = {h}*{w} = {h * w}"))
    for f in ("guidance_scale", "prior_guidance_scale"):
        v = params.get(f)
        if v is None:
            continue
        if not is_real(v) or v < 0:
            problems.append((f, v, "must be a finite number >= 0"))
    v = params.get("strength")
    if v is not None and (not is_real(v) or not 0 < v <= 1):
        problems.append(("strength", v, "must be a number in (0, 1]"))
    order = {f: i for i, f in enumerate(PARAM_FIELDS)}
    problems.sort(key=lambda p: order.get(p[0], len(order)))
    return problems
