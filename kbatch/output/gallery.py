"""Static gallery of an output location (``gallery.html`` + ``contact_sheet.png``) and the inline Jupyter view.

``gallery.html`` is self-contained for its thumbnails (JPEG data: URIs) and links each thumbnail to the
full-size image: for the ``files`` format the image file itself (relative link), for ``webdataset`` and
``parquet`` a full-size copy written under ``gallery/<key>.<ext>``. All user text is HTML-escaped.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import datetime as _dt
import html
import io
import urllib.parse
from dataclasses import dataclass
from typing import Any

from kbatch import storage
from kbatch.output.job_file import JOB_FILE
from kbatch.output.writer import EXTENSIONS

MAX_ERRORS = 1000  # error records shown (and read) at most

_PAGE_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:20px;margin:0 0 4px} .sub{color:#666;font-size:13px;margin-bottom:12px}
.counts span{display:inline-block;margin-right:14px;font-size:14px}
table.err{border-collapse:collapse;margin-top:8px;font-size:13px}
table.err td,table.err th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
"""
# scoped, so that the inline (Jupyter) view does not restyle the notebook
_GRID_CSS = """
.kbatch-gallery .grid{display:flex;flex-wrap:wrap;gap:10px}
.kbatch-gallery .card{width:%(w)dpx;background:#fff;color:#222;border:1px solid #ddd;border-radius:6px;padding:6px;
  font-size:11px;overflow-wrap:anywhere}
.kbatch-gallery .card img{display:block;margin:0 auto 4px;max-width:100%%;height:auto}
.kbatch-gallery .card .id{font-weight:600;font-size:12px} .kbatch-gallery .card .p{margin:2px 0;color:#333}
.kbatch-gallery .card .k{color:#777}
.kbatch-gallery .card.wide{width:%(wide)dpx} .kbatch-gallery .pair{display:flex;gap:4px;justify-content:center}
.kbatch-gallery .inputs{display:flex;flex-direction:column;gap:2px;color:#777;font-size:10px;text-align:center}
.kbatch-gallery .inputs img{margin:0}
.kbatch-gallery .score{font-weight:600;color:#0a5}
.kbatch-gallery .sort{font-size:13px;margin:0 0 8px}
.kbatch-gallery > input.kb-best:checked ~ .grid > .card{order:var(--best)}
.kbatch-gallery > input.kb-worst:checked ~ .grid > .card{order:var(--worst)}
"""


def _grid_css(thumb: int) -> str:
    return _GRID_CSS % {"w": thumb + 12, "wide": thumb + max(32, thumb // 2) + 16}


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _isnull(v: Any) -> bool:
    if v is None:
        return True
    try:
        import pandas as pd

        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _isnull_list(v: Any) -> bool:
    """A list cell (candidate_seeds): None / NaN, or an array."""
    if v is None:
        return True
    return not hasattr(v, "__len__") and _isnull(v)


def _fmt(v: Any) -> str:
    if _isnull(v):
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _thumbnail(data: bytes, thumb: int):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    full_size = img.size
    img = img.convert("RGB")
    img.thumbnail((thumb, thumb), Image.LANCZOS)
    return img, full_size


def _data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _caption(rec: dict, full_size: tuple[int, int] | None) -> str:
    w, h = (rec.get("width"), rec.get("height"))
    if (_isnull(w) or _isnull(h)) and full_size:
        w, h = full_size
    prompt = rec.get("prompt")
    neg = rec.get("negative_prompt")
    parts = [f'<div class="id">{_esc(rec.get("id"))} <span class="k">#{_esc(_fmt(rec.get("image_index")))}</span></div>',
             f'<div class="p" title="prompt">{_esc(_fmt(prompt))}</div>']
    if not _isnull(neg):
        parts.append(f'<div class="p k" title="negative prompt">neg: {_esc(neg)}</div>')
    score = rec.get("clip_score")
    if not _isnull(score):
        seeds = rec.get("candidate_seeds")
        best_of = "" if _isnull_list(seeds) else f' <span class="k">best of {len(seeds)}</span>'
        parts.append(f'<div class="score" title="clip_score: 100 x CLIP cosine(image, prompt)">'
                     f'clip {float(score):.2f}{best_of}</div>')
    heads = [(k[len("score_"):], v) for k, v in rec.items() if k.startswith("score_") and not _isnull(v)]
    if heads:  # quality.heads: each head's score of the image as written (docs/quality.md)
        parts.append('<div class="score" title="quality.heads">'
                     + " &middot; ".join(f"{_esc(name)} {float(v):.3g}" for name, v in sorted(heads)) + "</div>")
    parts.append(
        f'<div class="k">seed {_esc(_fmt(rec.get("seed")))} &middot; {_esc(_fmt(rec.get("mode")))} &middot; '
        f'{_esc(_fmt(w))}&times;{_esc(_fmt(h))} &middot; steps {_esc(_fmt(rec.get("num_inference_steps")))} '
        f'&middot; guidance {_esc(_fmt(rec.get("guidance_scale")))}</div>')
    return "".join(parts)


def check_by(df, by: str) -> None:
    """``by`` names a score column of the records: clip_score, or score_<NAME> of a quality.heads head."""
    if not (by == "clip_score" or by.startswith("score_")):
        raise ValueError(f"by must be 'clip_score' or a head's 'score_<NAME>' column, got {by!r}")
    if df is not None and len(df) and by not in df:
        have = sorted(c for c in df.columns if c == "clip_score" or c.startswith("score_"))
        raise ValueError(f"by={by!r}: the output's records have no such column (score columns: {have})")


def _ok_records(df, max_images: int, sort: str | None = None, by: str = "clip_score") -> list[dict]:
    """The first ``max_images`` ok records; ``sort``: "best" / "worst" first by the score column ``by``
    (clip_score, or a head's score_<NAME>; unscored last)."""
    if df is None or not len(df):
        return []
    ok = df[df["status"] == "ok"]
    if sort is not None:
        if sort not in ("best", "worst"):
            raise ValueError(f"sort must be 'best', 'worst' or None, got {sort!r}")
        check_by(df, by)
        if by in ok:
            ok = ok.sort_values(by, ascending=sort == "worst", na_position="last", kind="stable")
    return ok.head(max(0, int(max_images))).to_dict("records")


def _error_records(df) -> list[dict]:
    if df is None or not len(df):
        return []
    return df[df["status"] == "error"].to_dict("records")


def _counts(df) -> dict:
    if df is None or not len(df):
        return {"rows": 0, "images": 0, "errors": 0, "shards": 0}
    failed_ids = set(df.loc[df["status"] == "error", "id"])
    return {"rows": int(df["id"].nunique()), "images": int((df["status"] == "ok").sum()),
            "errors": len(failed_ids), "shards": int(df["shard"].nunique()) if "shard" in df else 0}


@dataclass
class _Item:
    rec: dict
    thumb: Any  # PIL image
    full_size: tuple[int, int]
    href: str | None
    inputs: list = None  # img2img / inpaint: [(label, PIL thumbnail or None, note)] of the init image and mask


def _input_thumbs(rec: dict, size: int, storage_options: dict | None, cache: dict) -> list:
    """The init image (and mask) of an img2img / inpaint record, as small thumbnails, read from the URIs the
    record names; inline manifest bytes are not stored in the output (only their sha256): a note instead."""
    if rec.get("mode") not in ("img2img", "inpaint"):
        return []
    out = []
    for label, key in (("init", "init_image"), ("mask", "mask")):
        ref = rec.get(key)
        if _isnull(ref):
            continue
        ref = str(ref)
        if ref.startswith("sha256:"):
            out.append((label, None, "inline bytes (not stored in the output)"))
            continue
        if ref not in cache:
            try:
                fs, path = storage.get_fs(ref, storage_options)
                cache[ref] = (_thumbnail(fs.cat_file(path), size)[0], ref)
            except Exception as e:  # noqa: BLE001 - moved, no credentials: the card says so
                cache[ref] = (None, f"cannot read {ref}: {type(e).__name__}")
        out.append((label, *cache[ref]))
    return out


def _load_items(reader, recs: list[dict], thumb: int, copy_full: bool) -> list[_Item]:
    """Thumbnails for ``recs``; for tar/parquet formats (``copy_full``) also full-size copies under gallery/;
    img2img / inpaint records also get their init image and mask (``_input_thumbs``)."""
    fs, root = reader.fs
    input_cache: dict = {}  # one read per input URI (many rows may share an init image)

    def one(rec: dict) -> _Item:
        item = _one(rec)
        item.inputs = _input_thumbs(rec, max(32, thumb // 2), getattr(reader, "storage_options", None), input_cache)
        return item

    def _one(rec: dict) -> _Item:
        data = reader.bytes_of(rec, verify=False)
        img, size = _thumbnail(data, thumb)
        rel = str(rec.get("path") or "")
        href = None
        if "#" not in rel and rel:
            href = rel
        elif copy_full:
            ext = EXTENSIONS.get(str(rec.get("image_format")), "png")
            href = f"gallery/{rec['key']}.{ext}"
            storage.write_bytes_atomic(fs, storage.join(root, storage.check_relative(href)), data)
        return _Item(rec, img, size, href)

    if len(recs) > 1:
        with cf.ThreadPoolExecutor(max_workers=min(8, len(recs))) as ex:
            return list(ex.map(one, recs))
    return [one(r) for r in recs]


def _score_ranks(items: list[_Item], by: str = "clip_score") -> tuple[list[int], list[int]]:
    """Each card's place when sorted by the score ``by``, best first and worst first (unscored cards last)."""
    scores = [it.rec.get(by) for it in items]
    scored = [i for i, s in enumerate(scores) if not _isnull(s)]
    best, worst = [len(items) + i for i in range(len(items))], [len(items) + i for i in range(len(items))]
    for rank, i in enumerate(sorted(scored, key=lambda i: (-float(scores[i]), i))):
        best[i] = rank
    for rank, i in enumerate(sorted(scored, key=lambda i: (float(scores[i]), i))):
        worst[i] = rank
    return best, worst


def _sort_controls(uid: str, by: str = "clip_score") -> str:
    """Radio buttons that reorder the cards (CSS ``order`` from each card's ranks: no script, so it works
    in a notebook's output as in the page). Direct children of ``.kbatch-gallery``, before the grid."""
    out = ['<span class="sort">sort:</span>']
    name = "clip score" if by == "clip_score" else by[len("score_"):]
    for key, label, checked in (("as", "as written", " checked"), ("best", f"{name}, best first", ""),
                                ("worst", f"{name}, worst first", "")):
        out.append(f'<input type="radio" class="kb-sort kb-{key}" name="kbs-{uid}" id="kbs-{uid}-{key}"{checked}>'
                   f'<label for="kbs-{uid}-{key}">{label}</label> ')
    return "".join(out)


def _inputs_html(inputs: list) -> str:
    parts = []
    for label, img, note in inputs:
        if img is None:
            parts.append(f'<div title="{_esc(note)}">{_esc(label)}: -</div>')
        else:
            parts.append(f'<div><img src="{_esc(_data_uri(img))}" width="{img.size[0]}" height="{img.size[1]}" '
                         f'alt="{_esc(label)}" title="{_esc(note)}"><div>{_esc(label)}</div></div>')
    return '<div class="inputs">' + "".join(parts) + "</div>"


def _cards(items: list[_Item], thumb: int, by: str = "clip_score") -> str:
    import uuid

    out = []
    best, worst = _score_ranks(items, by)
    for k, it in enumerate(items):
        img = (f'<img src="{_esc(_data_uri(it.thumb))}" width="{it.thumb.size[0]}" height="{it.thumb.size[1]}" '
               f'alt="{_esc(it.rec.get("id"))}" title="{_esc(it.rec.get("prompt"))}">')
        if it.href:
            img = f'<a href="{_esc(urllib.parse.quote(it.href, safe="/~-_."))}">{img}</a>'
        score = it.rec.get(by)
        attrs = f' style="--best:{best[k]};--worst:{worst[k]}"'
        if not _isnull(score):
            attrs += f' data-score="{float(score):.4f}"'
        cls = "card"
        if it.inputs:  # img2img / inpaint: the init image (and mask) beside the output
            cls, img = "card wide", f'<div class="pair">{img}{_inputs_html(it.inputs)}</div>'
        out.append(f'<div class="{cls}"{attrs}>{img}{_caption(it.rec, it.full_size)}</div>')
    controls = _sort_controls(uuid.uuid4().hex[:8], by) if any(s < len(items) for s in best) else ""
    return controls + '<div class="grid">' + "\n".join(out) + "</div>"


def _error_table(errors: list[dict], limit: int = 1000) -> str:
    if not errors:
        return ""
    rows = "\n".join(f"<tr><td>{_esc(e.get('id'))}</td><td>{_esc(_fmt(e.get('error')))}</td></tr>"
                     for e in errors[:limit])
    more = f"<p>... and {len(errors) - limit} more</p>" if len(errors) > limit else ""
    return (f'<h2 id="errors">Failed rows ({len(errors)})</h2><table class="err"><tr><th>id</th><th>reason</th></tr>'
            f"{rows}</table>{more}")


def contact_sheet(thumbs: list, thumb: int = 128, labels: list[str] | None = None, columns: int | None = None):
    """A grid image of thumbnails (a small blank image when there are none)."""
    from PIL import Image, ImageDraw

    n = len(thumbs)
    cols = columns or max(1, min(10, n))
    rows = max(1, -(-n // cols))
    label_h = 14 if labels else 0
    pad = 4
    cell_w, cell_h = thumb + pad, thumb + pad + label_h
    sheet = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for i, t in enumerate(thumbs):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * cell_w, pad + r * cell_h
        sheet.paste(t, (x0 + (thumb - t.size[0]) // 2, y0 + (thumb - t.size[1]) // 2))
        if labels:
            text = labels[i]
            if len(text) > thumb // 6:
                text = text[: max(1, thumb // 6 - 1)] + "~"
            draw.text((x0, y0 + thumb + 1), text, fill=(220, 220, 220))
    return sheet


def write_gallery(root: str, df=None, max_images: int = 200, thumb: int = 128,
                  storage_options: dict | None = None, counts: dict | None = None) -> dict:
    """Write ``gallery.html`` and ``contact_sheet.png`` at ``root`` (atomically); returns their paths.

    Bounded whatever the size of the output: ``df`` defaults to a sample of the committed shards' metadata
    (``writer.summarize_records``: the ok records of the newest shards, up to ``max_images``, and up to
    ``MAX_ERRORS`` failed rows), read a few shards at a time. ``counts``: the numbers for the header (rows,
    images, errors; e.g. a run's own accounting; ``shards`` is filled in if missing); without them, counted
    over every committed record, a few shards at a time. With ``counts`` saying ``errors: 0`` only the
    newest shards are read."""
    from kbatch.output.image_reader import ImageReader
    from kbatch.output.writer import summarize_records

    if df is None:
        want_errors = counts is None or bool(counts.get("errors", 1))
        df, found = summarize_records(root, storage_options, max_images, MAX_ERRORS, count=counts is None,
                                      errors=want_errors)
        counts = {**found, **(counts or {})}
    counts = counts or _counts(df)
    if "shards" not in counts:
        from kbatch.output.writer import list_committed_shards

        counts = {**counts, "shards": len(list_committed_shards(root, storage_options))}
    reader = ImageReader(root, storage_options)
    fs, base = reader.fs
    recs = _ok_records(df, max_images)
    items = _load_items(reader, recs, thumb, copy_full=True)
    errors = _error_records(df)
    job = storage.read_json(root, JOB_FILE, storage_options) or {}
    run = job.get("run_id")
    title = f"kbatch gallery: {storage.display_path(fs, base)}"
    head = (f"<h1>{_esc(title)}</h1><div class=\"sub\">"
            + (f"run {_esc(run)} &middot; " if run else "")
            + f"written {_esc(_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC'))}</div>"
            + '<div class="counts">'
            + f"<span>rows: <b>{counts['rows']}</b></span><span>images: <b>{counts['images']}</b></span>"
            + f"<span>failed rows: <b>{counts['errors']}</b></span><span>shards: <b>{counts['shards']}</b></span>"
            + (f"<span>total rows: <b>{_esc(job['total_rows'])}</b></span>" if job.get("total_rows") is not None
               else "")
            + f"<span>shown: <b>{len(items)}</b> of {counts['images']} images</span></div>")
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_PAGE_CSS}{_grid_css(thumb)}</style></head><body>\n"
            f"{head}\n<div class=\"kbatch-gallery\">{_cards(items, thumb)}</div>\n{_error_table(errors)}\n"
            '<p class="sub"><a href="contact_sheet.png">contact sheet</a></p>\n</body></html>\n')
    html_path = storage.join(base, "gallery.html")
    sheet_path = storage.join(base, "contact_sheet.png")
    sheet = contact_sheet([it.thumb for it in items], thumb, labels=[str(it.rec.get("id")) for it in items])
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    storage.write_bytes_atomic(fs, sheet_path, buf.getvalue())
    storage.write_bytes_atomic(fs, html_path, page.encode("utf-8"))
    return {"html": storage.display_path(fs, html_path), "contact_sheet": storage.display_path(fs, sheet_path)}


class InlineGallery:
    """Thumbnails with prompt/seed for Jupyter (``_repr_html_``); images embedded as data: URIs."""

    def __init__(self, html_text: str, n: int):
        self.html = html_text
        self.n = n

    @classmethod
    def from_records(cls, df, reader, root: str, max_images: int = 50, thumb: int = 160,
                     sort: str | None = None, by: str = "clip_score") -> "InlineGallery":
        """``sort``: "best" / "worst": the ``max_images`` best (worst) images of ``df`` by the score ``by``
        (clip_score, or a head's score_<NAME>), in that order (the view's sort buttons reorder what is shown)."""
        check_by(df, by)
        recs = _ok_records(df, max_images, sort, by)
        items = _load_items(reader, recs, thumb, copy_full=False)
        for it in items:
            it.href = None  # inline view: no links to files the notebook cannot serve
        counts = _counts(df)
        header = (f"<div><b>{_esc(root)}</b>: {counts['rows']} rows, {counts['images']} images, "
                  f"{counts['errors']} failed rows; showing {len(items)}</div>")
        style = _grid_css(thumb)
        return cls(f"<div class=\"kbatch-gallery\"><style>{style}</style>{header}{_cards(items, thumb, by)}</div>",
                   len(items))

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return f"InlineGallery({self.n} images)"
