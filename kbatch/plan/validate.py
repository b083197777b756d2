"""Row validation: the same code for ``kbatch validate`` and ``kbatch run``.

* :func:`check_params` checks generation parameters (manifest rows and the config's ``defaults``).
* :func:`validate_table` turns each manifest row into a :class:`kbatch.schema.rows.Row` (job defaults applied,
  URIs resolved and checked) or exactly one :class:`RowError`; one bad row never stops the others.
* :func:`validate_images` loads every input image of valid rows (no models) to find missing, corrupt,
  oversized or mismatched images up front (``kbatch validate``).
* :func:`format_problems` renders errors one per line.

Messages name the field and the value, e.g. ``"height: must be a multiple of 64, got 500"``.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import pyarrow as pa

from kbatch.plan.input_images import InputError, describe, load_row_inputs, resolve_uri
from kbatch.schema.params import check_params, is_int as _is_int, is_real as _is_real
from kbatch.schema.rows import ID_RE, PARAM_FIELDS, MixItem, Row, derive_seed, raw_fingerprint

if TYPE_CHECKING:  # pragma: no cover
    from kbatch.config import JobConfig

MODES = ("text2img", "img2img", "inpaint", "interpolate")  # same as kbatch.config.MODES
_INT_FIELDS = ("num_images", "height", "width", "num_inference_steps", "prior_num_inference_steps")
_MIX_SOURCES = ("prompt", "image", "image_uri")


# ---------------------------------------------------------------------------------------------------------
# rows


@dataclass
class RowError:
    """Why manifest row ``index`` is invalid. ``id`` is the row's id, or ``_row<index>`` when the id itself is
    unusable (null, malformed, duplicate): synthetic ids never match ``ID_RE``, so they cannot collide with a
    real id and are always path-safe. ``field``/``value`` are the first problem; ``message`` lists all of them
    (``"field: must be ..., got value"``, joined by ``"; "``)."""

    index: int
    id: str | None
    field: str
    value: object
    message: str
    raw_hash: str | None = None  # fingerprint of the row's cells: a rerun can tell whether it changed

    def __str__(self) -> str:
        return f"row {self.index} (id {self.id}): {self.message}"


def synthetic_id(index: int) -> str:
    return f"_row{index}"


def _got(v: Any) -> str:
    return describe(v)


def _shown_value(v: Any) -> Any:
    return describe(v) if isinstance(v, (bytes, bytearray, memoryview)) else v


def _as_int(v: Any) -> Any:
    """Integral floats (pandas turns int columns with nulls into floats) become ints; others unchanged."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return v


class _Problems:
    def __init__(self):
        self.items: list[tuple[str, object, str]] = []

    def add(self, field: str, value: Any, what: str):
        self.items.append((field, _shown_value(value), f"{field}: {what}, got {_got(value)}"))

    def add_input(self, e: InputError):
        self.items.append((e.field or "?", _shown_value(e.value), str(e)))

    def __bool__(self):
        return bool(self.items)


def _check_length(field: str, text: Any, limits, probs: _Problems) -> None:
    """Prompts have a length limit (CLIP reads 77 tokens; a megabyte prompt only costs memory and time)."""
    n = int(limits.max_prompt_chars)
    if isinstance(text, str) and len(text) > n:
        probs.items.append((field, f"<{len(text)} characters>", f"{field}: must be at most {n} characters "
                                                                f"(limits.max_prompt_chars), got {len(text)}"))


def _image_ref(v: Any, field: str, base_uri: str, limits, probs: _Problems) -> bytes | str | None:
    """An init_image / mask / mix image cell: inline bytes (size-checked) or a URI (resolved, checked)."""
    if isinstance(v, (bytearray, memoryview)):
        v = bytes(v)
    if isinstance(v, bytes):
        if not v:
            probs.add(field, v, "must be non-empty image bytes")
            return None
        if len(v) > limits.max_image_bytes:
            probs.add(field, v, f"must be at most {limits.max_image_bytes} bytes (limits.max_image_bytes)")
            return None
        return v
    if isinstance(v, str):
        try:
            return resolve_uri(v, base_uri, limits, field=field)
        except InputError as e:
            probs.add_input(e)
            return None
    probs.add(field, v, "must be encoded image bytes or a URI string")
    return None


def _check_mix(mix: Any, base_uri: str, limits, probs: _Problems) -> list[MixItem]:
    what = "must be a non-empty list of {prompt | image | image_uri, weight} for mode 'interpolate'"
    if mix is None or not isinstance(mix, (list, tuple)) or len(mix) == 0:
        probs.add("mix", mix, what)
        return []
    if len(mix) > limits.max_mix_items:
        probs.items.append(("mix", f"<{len(mix)} items>", f"mix: must have at most {limits.max_mix_items} items "
                                                          f"(limits.max_mix_items), got {len(mix)} items"))
        return []
    items = []
    for i, it in enumerate(mix):
        f = f"mix[{i}]"
        if not isinstance(it, dict):
            probs.add(f, it, "must be a struct {prompt | image | image_uri, weight}")
            continue
        given = [k for k in _MIX_SOURCES if it.get(k) is not None]
        if len(given) != 1:
            shown = {k: _shown_value(it.get(k)) for k in given}
            probs.add(f, shown, "must set exactly one of prompt / image / image_uri")
            continue
        w = it.get("weight")
        if not _is_real(w):
            probs.add(f"{f}.weight", w, "must be a finite number")
            continue
        src = given[0]
        val = it[src]
        item = MixItem(weight=float(w))
        if src == "prompt":
            if not isinstance(val, str):
                probs.add(f"{f}.prompt", val, "must be a string")
                continue
            _check_length(f"{f}.prompt", val, limits, probs)
            item.prompt = val
        else:
            if src == "image" and isinstance(val, str):
                probs.add(f"{f}.image", val, "must be encoded image bytes (use image_uri for URIs)")
                continue
            if src == "image_uri" and not isinstance(val, str):
                probs.add(f"{f}.image_uri", val, "must be a URI string (use image for bytes)")
                continue
            ref = _image_ref(val, f"{f}.{src}", base_uri, limits, probs)
            if ref is None:
                continue
            setattr(item, src, ref)
        items.append(item)
    return items


def _validate_row(r: dict, index: int, cfg, base_uri: str, first_at: int | None,
                  columns: set[str]) -> tuple[Row | None, RowError | None]:
    limits = cfg.limits
    defaults = cfg.defaults
    probs = _Problems()

    # id
    rid = r.get("id")
    id_ok = False
    if rid is None:
        probs.add("id", rid, "must not be null")
    elif not isinstance(rid, str):
        probs.add("id", rid, "must be a string")
    elif not ID_RE.fullmatch(rid):
        probs.add("id", rid, f"must match {ID_RE.pattern} (letters, digits, '.', '_', '-'; at most 128 "
                             "characters; starting with a letter or digit)")
    elif first_at is not None:
        probs.items.append(("id", rid, f"id: duplicate id {rid!r} (first at row {first_at})"))
    else:
        id_ok = True

    # mode
    mode = r.get("mode")
    if mode is None:
        mode = "text2img"
    elif mode not in MODES:
        probs.add("mode", mode, f"must be one of {list(MODES)}")
        mode = None

    # prompts
    prompt = r.get("prompt")
    if prompt is None:
        probs.add("prompt", prompt, "must not be null")
    elif not isinstance(prompt, str):
        probs.add("prompt", prompt, "must be a string")
    elif mode not in (None, "interpolate") and not prompt.strip():
        probs.add("prompt", prompt, f"must not be empty for mode {mode!r}")
    _check_length("prompt", prompt, limits, probs)
    negative = r.get("negative_prompt")
    if negative is None:
        negative = defaults.negative_prompt
    elif not isinstance(negative, str):
        probs.add("negative_prompt", negative, "must be a string or null")
    _check_length("negative_prompt", negative, limits, probs)

    # seed
    seed = _as_int(r.get("seed"))
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        probs.add("seed", r.get("seed"), "must be an integer in [0, 2**63)")

    # generation parameters: per-row value, else the job default
    params: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    for f in PARAM_FIELDS:
        v = r.get(f) if f in columns else None
        if v is None:
            v = getattr(defaults, f)
        else:
            raw[f] = v
        params[f] = _as_int(v) if f in _INT_FIELDS else v
    if mode != "img2img" and "strength" not in raw:
        params.pop("strength")  # the default only matters for img2img (and the config checks it)
    for f, v, what in check_params(params, limits):
        probs.add(f, raw.get(f, v), what)

    # input images
    init_image = mask = None
    mix: list[MixItem] = []
    if mode in ("img2img", "inpaint"):
        v = _cell(r, "init_image")
        if v is None:
            probs.add("init_image", v, f"is required for mode {mode!r}")
        else:
            init_image = _image_ref(v, "init_image", base_uri, limits, probs)
    if mode == "inpaint":
        v = _cell(r, "mask")
        if v is None:
            probs.add("mask", v, "is required for mode 'inpaint' (white = repaint, black = keep)")
        else:
            mask = _image_ref(v, "mask", base_uri, limits, probs)
    if mode == "interpolate":
        mix = _check_mix(r.get("mix"), base_uri, limits, probs)

    if probs:
        field, value, _ = probs.items[0]
        message = "; ".join(text for _, _, text in probs.items)
        return None, RowError(index, rid if id_ok else synthetic_id(index), field, value, message,
                              raw_fingerprint(r))

    row = Row(
        id=rid,
        prompt=prompt,
        mode=mode,
        negative_prompt=negative,
        seed=int(seed) if seed is not None else derive_seed(cfg.seed, rid),
        num_images=int(params["num_images"]),
        height=int(params["height"]),
        width=int(params["width"]),
        num_inference_steps=int(params["num_inference_steps"]),
        guidance_scale=float(params["guidance_scale"]),
        prior_num_inference_steps=int(params["prior_num_inference_steps"]),
        prior_guidance_scale=float(params["prior_guidance_scale"]),
        strength=float(params["strength"]) if mode == "img2img" else None,
        init_image=init_image,
        mask=mask,
        mix=mix,
    )
    row.row_hash = row.fingerprint()
    return row, None


def validate_record(r: dict, index: int, cfg: "JobConfig", base_uri: str, columns: set[str],
                    first_at: int | None = None) -> Row | RowError:
    """One manifest row (a dict of its cells) at manifest position ``index``: a :class:`Row`, or exactly one
    :class:`RowError`. ``first_at``: the position of an earlier row with the same id, when this row is a
    duplicate (the caller knows: a whole-manifest question). Never raises for odd cells."""
    try:
        row, err = _validate_row(r, index, cfg, base_uri, first_at, columns)
    except Exception as e:  # noqa: BLE001 - never let one odd cell stop the other rows
        rid = r.get("id")
        safe = rid if isinstance(rid, str) and ID_RE.fullmatch(rid) and first_at is None else synthetic_id(index)
        return RowError(index, safe, "?", None, f"row could not be validated: {type(e).__name__}: {e}",
                        raw_fingerprint(r))
    return row if row is not None else err


def validate_indexed(table: pa.Table, cfg: "JobConfig", base_uri: str,
                     start_index: int = 0) -> tuple[list[tuple[int, Row]], list[RowError]]:
    """Like :func:`validate_table`, but each valid row comes with its manifest row index. Keeps a dict of
    every id (duplicates): for tables that fit in memory; jobs stream (``kbatch.plan.planner``)."""
    rows: list[tuple[int, Row]] = []
    errors: list[RowError] = []
    seen: dict[str, int] = {}
    columns = set(table.column_names)
    index = start_index
    for batch in table.to_batches(max_chunksize=4096):
        for r in batch.to_pylist():
            rid = r.get("id")
            first_at = seen.get(rid) if isinstance(rid, str) else None
            out = validate_record(r, index, cfg, base_uri, columns, first_at)
            if isinstance(out, Row):
                rows.append((index, out))
            else:
                errors.append(out)
            if first_at is None and isinstance(rid, str) and ID_RE.fullmatch(rid):
                seen[rid] = index
            index += 1
    return rows, errors


def _cell(r: dict, col: str):
    """An image cell: ``col`` (bytes or URI), else ``col_uri`` (a URI column beside a bytes column)."""
    v = r.get(col)
    return v if v is not None else r.get(f"{col}_uri")


def validate_table(table: pa.Table, cfg: "JobConfig", base_uri: str) -> tuple[list[Row], list[RowError]]:
    """Validate every manifest row, in order: valid rows become :class:`Row` (defaults applied, seeds derived,
    URIs resolved under the allowed roots/protocols, ``row_hash`` set); every other row yields exactly one
    :class:`RowError`. Duplicate ids: the first occurrence is valid, later ones are errors."""
    indexed, errors = validate_indexed(table, cfg, base_uri)
    return [row for _, row in indexed], errors


# ---------------------------------------------------------------------------------------------------------
# images (kbatch validate): decode every input without any model


def _check_row_images(index: int, row: Row, limits, storage_options) -> RowError | None:
    try:
        load_row_inputs(row, limits, storage_options)
    except InputError as e:
        return RowError(index, row.id, e.field or "?", _shown_value(e.value), str(e))
    except Exception as e:  # noqa: BLE001
        return RowError(index, row.id, "?", None, f"input images could not be read: {type(e).__name__}: {e}")
    return None


def validate_images(rows: Sequence[Row], limits, *, storage_options: dict | None = None,
                    indices: Sequence[int] | None = None, workers: int = 8) -> list[RowError]:
    """Load every input image / mask / mix image of ``rows`` (header pixel check, full decode, mask size ==
    init image size); one :class:`RowError` per failing row, in row order. ``indices`` gives each row's
    manifest index (default: its position in ``rows``)."""
    rows = list(rows)
    idx = list(indices) if indices is not None else list(range(len(rows)))
    if len(idx) != len(rows):
        raise ValueError("validate_images: indices and rows differ in length")
    todo = [(i, r) for i, r in zip(idx, rows) if r.init_image is not None or r.mask is not None
            or any(m.image is not None or m.image_uri is not None for m in r.mix)]
    if workers > 1 and len(todo) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(todo))) as ex:
            results = list(ex.map(lambda t: _check_row_images(t[0], t[1], limits, storage_options), todo))
    else:
        results = [_check_row_images(i, r, limits, storage_options) for i, r in todo]
    return [e for e in results if e is not None]


def validate_manifest(table: pa.Table, cfg: "JobConfig", base_uri: str, *, check_images: bool = False,
                      storage_options: dict | None = None, workers: int = 8) -> tuple[list[Row], list[RowError]]:
    """:func:`validate_table`, plus (``check_images``) :func:`validate_images` on the valid rows. Rows whose
    images fail move to the errors; errors are sorted by manifest index."""
    indexed, errors = validate_indexed(table, cfg, base_uri)
    rows = [r for _, r in indexed]
    if check_images and indexed:
        img_errors = validate_images(rows, cfg.limits, storage_options=storage_options,
                                     indices=[i for i, _ in indexed], workers=workers)
        bad = {e.index for e in img_errors}
        rows = [r for i, r in indexed if i not in bad]
        errors = sorted(errors + img_errors, key=lambda e: e.index)
    return rows, errors


def format_problems(errors: Iterable[RowError], max_lines: int | None = None) -> str:
    """One line per error: ``row 3 (id a-1): height: must be a multiple of 64, got 500``; at most
    ``max_lines`` lines, then ``... and N more invalid rows``. Empty string when there are none."""
    errors = list(errors)
    shown = errors if max_lines is None else errors[:max_lines]
    lines = [str(e) for e in shown]
    if len(errors) > len(shown):
        lines.append(f"... and {len(errors) - len(shown)} more invalid rows")
    return "\n".join(lines)
