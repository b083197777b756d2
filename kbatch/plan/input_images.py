"""Safe input images: URI resolution under allowed roots/protocols, size-checked decoding.

Plain functions (no Ray, no torch): they run in the driver (``kbatch validate`` / ``kbatch run``) and in
CPU Ray tasks before the GPU stage.

Rules
-----
* :func:`resolve_uri` turns a manifest string into an absolute location. Relative URIs resolve against the
  manifest's folder; the protocol must be in ``limits.allowed_protocols`` (http/https/ftp are not, by
  default: no network fetches from manifest strings unless the config allows them); the normalized
  location (``..`` resolved, local symlinks resolved with ``os.path.realpath``) must be under one of
  ``limits.allowed_roots`` (an empty list means: under the manifest's own folder).
* :func:`load_image` reads at most ``limits.max_image_bytes`` bytes, checks ``width * height <=
  limits.max_image_pixels`` from the image header *before* decoding (the global
  ``PIL.Image.MAX_IMAGE_PIXELS`` is neither relied on nor changed; PIL's own bomb error is reported the
  same way), decodes fully (truncated files fail), applies the EXIF orientation (as
  ``diffusers.utils.load_image`` does) and converts to the wanted mode.

Every problem raises :class:`InputError`, whose text is ``"<field>: <reason naming the value>"``.
"""
from __future__ import annotations

import io
import os
import posixpath
import re
import stat
import struct
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

# Image formats accepted for init images, masks and mix images. Deliberately short: e.g. EPS would run
# Ghostscript, and exotic decoders are attack surface.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")

_PROTO_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# fsspec aliases: one name per file system family (for root comparison and protocol checks)
_FAMILY = {"file": "file", "local": "file", "s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs",
           "abfs": "abfs", "az": "abfs", "abfss": "abfs"}
_LOCAL = "file"


class InputError(ValueError):
    """A bad input image or URI. ``str(e)`` is ``"<field>: <message>"``; the message names the value."""

    def __init__(self, field: str | None, value: Any, message: str):
        self.field = field
        self.value = value
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def __reduce__(self):  # picklable across Ray processes despite the 3-argument constructor
        return (type(self), (self.field, self.value, self.message))


def describe(value: Any, max_len: int = 120) -> str:
    """How a value is shown in messages: ``'uri'`` (repr, shortened) or ``<N bytes>`` for inline data."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    r = repr(value)
    return r if len(r) <= max_len else r[: max_len - 4] + "...'"


# ---------------------------------------------------------------------------------------------------------
# URIs


def split_uri(uri: str) -> tuple[str | None, str]:
    """``"s3://b/k"`` -> ``("s3", "b/k")``; a plain path -> ``(None, path)``."""
    m = _PROTO_RE.match(uri)
    if not m:
        return None, uri
    return m.group(1).lower(), uri[m.end():]


def _family(proto: str | None) -> str:
    if proto is None:
        return _LOCAL
    return _FAMILY.get(proto, proto)


def _normalize(uri: str) -> tuple[str, str]:
    """An absolute location -> (family, normalized path). Local: realpath; remote: ``..`` folded, no
    leading slash. Relative local paths are taken relative to the current directory."""
    proto, path = split_uri(uri)
    fam = _family(proto)
    if fam == _LOCAL:
        return fam, os.path.realpath(os.path.expanduser(path) if proto is None else path)
    norm = posixpath.normpath("/" + path).lstrip("/") if path else ""
    return fam, "" if norm == "." else norm


def _join_base(uri: str, base_uri: str) -> str:
    proto, base_path = split_uri(base_uri)
    if _family(proto) == _LOCAL:
        return os.path.join(os.path.abspath(base_path), uri)
    return f"{proto}://{base_path.rstrip('/')}/{uri}"


def _under(path: str, root: str) -> bool:
    if root in ("", "/"):
        return True
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def _show_roots(roots: list[str]) -> str:
    return "[" + ", ".join(repr(r) for r in roots) + "]"


def resolve_uri(uri: str, base_uri: str, limits, *, field: str | None = None) -> str:
    """Resolve a manifest URI and check it against ``limits.allowed_protocols`` / ``allowed_roots``.

    Returns an absolute local path (symlinks resolved) or a ``protocol://path`` URI. Raises
    :class:`InputError` naming ``field`` and the value.
    """
    shown = describe(uri)
    if not isinstance(uri, str):
        raise InputError(field, uri, f"URI must be a string, got {shown}")
    if not uri.strip():
        raise InputError(field, uri, "URI must not be empty")
    if "\x00" in uri:
        raise InputError(field, uri, f"URI {shown} contains a NUL character")
    if "::" in uri:
        raise InputError(field, uri, f"URI {shown} is a chained fsspec URL ('::'), which is not supported")
    proto, rest = split_uri(uri)
    if proto is None and "://" in uri:
        raise InputError(field, uri, f"URI {shown} is malformed")
    if proto is not None and "://" in rest:
        raise InputError(field, uri, f"URI {shown} is malformed (nested '://')")
    location = _join_base(uri, base_uri) if proto is None and not os.path.isabs(uri) else uri
    lproto, _ = split_uri(location)
    eff_proto = lproto or _LOCAL
    allowed = [str(p).lower() for p in limits.allowed_protocols]
    allowed_fams = {_family(p) for p in allowed}
    if _family(eff_proto) not in allowed_fams:
        raise InputError(field, uri, f"URI {shown} uses protocol {eff_proto!r}, allowed: {allowed} "
                                     "(limits.allowed_protocols)")
    fam, path = _normalize(location)
    roots = list(limits.allowed_roots) or [base_uri]
    for root in roots:
        rfam, rpath = _normalize(str(root))
        if rfam == fam and _under(path, rpath):
            break
    else:
        raise InputError(field, uri, f"URI {shown} resolves to {_format_location(fam, lproto, path)!r}, which "
                                     f"is outside the allowed roots {_show_roots(roots)} (limits.allowed_roots)")
    return _format_location(fam, lproto, path)


def _format_location(fam: str, proto: str | None, path: str) -> str:
    if fam == _LOCAL:
        return path
    return f"{proto}://{path}"


# ---------------------------------------------------------------------------------------------------------
# reading and decoding


def _read_limited(src: str, field: str, limits, storage_options: dict | None) -> bytes:
    max_bytes = int(limits.max_image_bytes)
    shown = describe(src)
    proto, path = split_uri(src)
    allowed = {_family(str(p).lower()) for p in limits.allowed_protocols}
    if _family(proto) not in allowed:
        raise InputError(field, src, f"URI {shown} uses protocol {proto or _LOCAL!r}, allowed: "
                                     f"{list(limits.allowed_protocols)} (limits.allowed_protocols)")
    too_big = f"image {shown} is too large: more than {max_bytes} bytes (limits.max_image_bytes)"
    try:
        if _family(proto) == _LOCAL:
            st = os.stat(path)
            if stat.S_ISDIR(st.st_mode):
                raise InputError(field, src, f"image {shown} is a directory, not a file")
            if not stat.S_ISREG(st.st_mode):
                raise InputError(field, src, f"image {shown} is not a regular file")
            if st.st_size > max_bytes:
                raise InputError(field, src, f"image {shown} is too large: {st.st_size} bytes > {max_bytes} "
                                             "(limits.max_image_bytes)")
            with open(path, "rb") as fh:
                data = fh.read(max_bytes + 1)
        else:
            import fsspec

            fs, fpath = fsspec.core.url_to_fs(src, **(storage_options or {}))
            try:
                size = fs.size(fpath)
            except FileNotFoundError:
                raise
            except Exception:  # noqa: BLE001 - some file systems cannot stat; the read below is bounded
                size = None
            if size is not None and size > max_bytes:
                raise InputError(field, src, f"image {shown} is too large: {size} bytes > {max_bytes} "
                                             "(limits.max_image_bytes)")
            with fs.open(fpath, "rb") as fh:
                data = fh.read(max_bytes + 1)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(field, src, f"image {shown} not found") from None
    except IsADirectoryError:
        raise InputError(field, src, f"image {shown} is a directory, not a file") from None
    except PermissionError:
        raise InputError(field, src, f"image {shown} cannot be read: permission denied") from None
    except Exception as e:  # noqa: BLE001 - any storage error becomes a row error
        raise InputError(field, src, f"image {shown} cannot be read: {type(e).__name__}: {e}") from None
    if len(data) > max_bytes:
        raise InputError(field, src, too_big)
    return data


def _open_header(data: bytes) -> Image.Image:
    """Open (parse the header of, without decoding) ``data`` as one of :data:`ALLOWED_FORMATS`.

    Does what ``Image.open`` does, minus its check against the global ``Image.MAX_IMAGE_PIXELS``: the caller
    checks the size against its own limit, before anything is decoded, whatever the global is set to.
    """
    registry = getattr(Image, "OPEN", None)
    if not isinstance(registry, dict):  # pragma: no cover - a Pillow without the plugin registry
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    prefix = data[:16]
    for fmt in ALLOWED_FORMATS:
        if fmt not in registry:
            Image.init()
        entry = registry.get(fmt)
        if entry is None:
            continue
        factory, accept = entry
        try:
            ok = not accept or accept(prefix)
            if isinstance(ok, str) or not ok:
                continue
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
    raise UnidentifiedImageError("cannot identify image file")


#: in the errors a loading task returns: the ids of rows left for another task (the batch's pixel budget)
LATER = "__later__"


class BatchFull(Exception):
    """An image would take its loading batch over ``limits.max_batch_pixels``: the row goes to another task."""


class PixelBudget:
    """Decoded pixels left to a row (``limits.max_row_pixels``: over it, the row fails) or to a loading batch
    (``limits.max_batch_pixels``: over it, the row waits for another task). Charged from an image's header,
    before the image is decoded."""

    def __init__(self, limit: int, key: str, *, row: bool):
        self.limit, self.key, self.row, self.used = int(limit), key, row, 0

    def charge(self, pixels: int, field: str, value: Any, shown: str) -> None:
        if self.used + pixels > self.limit:
            if not self.row:
                raise BatchFull(self.key)
            raise InputError(field, value, f"image {shown} would take the row's decoded input pixels to "
                                           f"{self.used + pixels} > {self.limit} ({self.key})")
        self.used += pixels


def decode_image(data: bytes, *, field: str, limits, mode: str = "RGB", shown: str | None = None,
                 value: Any = None, budgets: tuple = ()) -> Image.Image:
    """Decode encoded image bytes with the header pixel check (``limits.max_image_pixels`` and the row's and
    batch's ``budgets``), full load, EXIF orientation, ``mode``."""
    shown = shown or describe(data)
    value = value if value is not None else shown
    max_px = int(limits.max_image_pixels)
    try:
        im = _open_header(data)
    except Image.DecompressionBombError as e:
        raise InputError(field, value, f"image {shown} is too large (decompression bomb): {e}") from None
    except Image.DecompressionBombWarning as e:  # only raised when warnings are turned into errors
        raise InputError(field, value, f"image {shown} is too large (decompression bomb): {e}") from None
    except UnidentifiedImageError:
        raise InputError(field, value, f"image {shown} is not a readable image (corrupt, or not one of "
                                       f"{', '.join(ALLOWED_FORMATS)})") from None
    except Exception as e:  # noqa: BLE001 - malformed headers raise all sorts of errors
        raise InputError(field, value, f"image {shown} is corrupt: {type(e).__name__}: {e}") from None
    try:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise InputError(field, value, f"image {shown} has an empty size {w}x{h}")
        if w * h > max_px:
            raise InputError(field, value, f"image {shown} is too large: {w}x{h} = {w * h} pixels > {max_px} "
                                           "(limits.max_image_pixels)")
        for budget in budgets:
            budget.charge(w * h, field, value, shown)
        try:
            im.load()
        except Exception as e:  # noqa: BLE001 - OSError 'truncated', SyntaxError, struct.error, ...
            kind = "truncated" if "truncat" in str(e).lower() else "corrupt"
            raise InputError(field, value, f"image {shown} is {kind}: {type(e).__name__}: {e}") from None
        try:
            out = ImageOps.exif_transpose(im)
            out = out.convert(mode) if out.mode != mode else out.copy()
        except Exception as e:  # noqa: BLE001
            raise InputError(field, value, f"image {shown} cannot be converted to {mode}: "
                                           f"{type(e).__name__}: {e}") from None
        ow, oh = out.size
        if ow * oh > max_px:  # paranoia: size after orientation / conversion
            raise InputError(field, value, f"image {shown} is too large: {ow}x{oh} pixels > {max_px} "
                                           "(limits.max_image_pixels)")
        return out
    finally:
        im.close()


def load_image(src: bytes | str, *, field: str, limits, mode: str = "RGB",
               storage_options: dict | None = None, budgets: tuple = ()) -> Image.Image:
    """Read (bounded), check and decode one image. ``src`` is inline encoded bytes or a resolved URI.

    Raises :class:`InputError` ("<field>: image '<uri>' not found" / "... is too large: 20000x20000 = ...
    pixels > 16777216 (limits.max_image_pixels)" / "... is truncated: ..." / "... is not a readable
    image ..." / "... is too large: N bytes > M (limits.max_image_bytes)").
    """
    if isinstance(src, (bytearray, memoryview)):
        src = bytes(src)
    if isinstance(src, bytes):
        shown = describe(src)
        if len(src) == 0:
            raise InputError(field, shown, "image <0 bytes> is empty")
        if len(src) > int(limits.max_image_bytes):
            raise InputError(field, shown, f"image {shown} is too large: {len(src)} bytes > "
                                           f"{int(limits.max_image_bytes)} (limits.max_image_bytes)")
        return decode_image(src, field=field, limits=limits, mode=mode, shown=shown, value=shown, budgets=budgets)
    if not isinstance(src, str):
        raise InputError(field, src, f"must be image bytes or a URI string, got {type(src).__name__}")
    data = _read_limited(src, field, limits, storage_options)
    return decode_image(data, field=field, limits=limits, mode=mode, shown=describe(src), value=src,
                        budgets=budgets)


def load_row_inputs(row, limits, storage_options: dict | None = None, batch: PixelBudget | None = None) -> dict:
    """Load a validated row's input images (runs in CPU tasks before the GPU stage), within the row's decoded
    pixel budget (``limits.max_row_pixels``) and the loading batch's (``batch``: raises :class:`BatchFull`).

    Returns ``{"init_image": PIL | None, "mask": PIL | None, "mix_images": [PIL | None per mix item]}``;
    init and mix images are RGB, masks L (white = repaint). Raises :class:`InputError`, e.g.
    ``"mask: size 32x32 differs from init_image size 64x64"``.
    """
    budgets = (PixelBudget(limits.max_row_pixels, "limits.max_row_pixels", row=True),) + ((batch,) if batch else ())
    init = None
    mask = None
    if row.init_image is not None:
        init = load_image(row.init_image, field="init_image", limits=limits, mode="RGB",
                          storage_options=storage_options, budgets=budgets)
    if row.mask is not None:
        mask = load_image(row.mask, field="mask", limits=limits, mode="L", storage_options=storage_options,
                          budgets=budgets)
    if init is not None and mask is not None and mask.size != init.size:
        raise InputError("mask", _ref(row.mask), f"size {mask.size[0]}x{mask.size[1]} differs from init_image "
                                                 f"size {init.size[0]}x{init.size[1]}")
    mix_images: list = []
    for i, item in enumerate(row.mix or []):
        if item.image is not None:
            mix_images.append(load_image(item.image, field=f"mix[{i}].image", limits=limits, mode="RGB",
                                         storage_options=storage_options, budgets=budgets))
        elif item.image_uri is not None:
            mix_images.append(load_image(item.image_uri, field=f"mix[{i}].image_uri", limits=limits,
                                         mode="RGB", storage_options=storage_options, budgets=budgets))
        else:
            mix_images.append(None)
    return {"init_image": init, "mask": mask, "mix_images": mix_images}


def _ref(v):
    return describe(v) if isinstance(v, (bytes, bytearray)) else v
