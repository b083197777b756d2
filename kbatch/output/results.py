"""Reading an output location in any format: ``kbatch.open_results(URI)``.

>>> res = open_results("s3://bucket/renders/2026-11-26")
>>> res.df                      # metadata records of committed shards (ok and error)
>>> res.image("cat-1", 0)       # PIL.Image, read through fsspec whatever the format
>>> res.gallery()               # inline thumbnails in Jupyter
"""
from __future__ import annotations

import io
from typing import Any, Iterable

from kbatch import storage
from kbatch.output.job_file import JOB_FILE
from kbatch.output.image_reader import ImageReader
from kbatch.output.writer import list_committed_shards, read_records


_UNREAD = object()


class Results:
    """Metadata and images of the committed shards of one output location."""

    def __init__(self, uri: str, storage_options: dict | None = None, df=None, job: dict | None = None):
        self.root = str(uri)
        self.storage_options = dict(storage_options or {})
        self.df = read_records(self.root, storage_options=self.storage_options) if df is None else df
        self.job = storage.read_json(self.root, JOB_FILE, self.storage_options) if job is None else job
        self.reader = ImageReader(self.root, self.storage_options)
        self._lookup: dict[tuple[str, int], int] | None = None
        self._embeddings: Any = _UNREAD

    # -- pickling: the filesystem and caches are rebuilt on demand -------------------------------------
    def __getstate__(self):
        d = dict(self.__dict__)
        d["reader"], d["_lookup"] = ImageReader(self.root, self.storage_options), None
        if d.get("_embeddings") is _UNREAD:  # the sentinel is this process's: unpickled, it is read again
            del d["_embeddings"]
        return d

    # -- image embeddings ---------------------------------------------------------------------------------
    @property
    def embeddings(self):
        """Each record's CLIP image embedding (``quality.image_embeddings``): numpy float16 [len(df), D] aligned
        with ``.df`` (NaN rows for records without one: errors, filtered); None when the output has none.
        Read on first use."""
        if self.__dict__.get("_embeddings", _UNREAD) is _UNREAD:
            from kbatch.output.image_embeddings import embeddings_for

            self._embeddings = embeddings_for(self.root, self.df, self.storage_options)
        return self._embeddings

    # -- counts ------------------------------------------------------------------------------------------
    def _count(self, status: str) -> int:
        if len(self.df) == 0 or "status" not in self.df:
            return 0
        return int((self.df["status"] == status).sum())

    @property
    def n_images(self) -> int:
        return self._count("ok")

    @property
    def n_errors(self) -> int:
        return self._count("error")

    @property
    def n_rows(self) -> int:
        return int(self.df["id"].nunique()) if len(self.df) and "id" in self.df else 0

    @property
    def shards(self) -> list[str]:
        if len(self.df) and "shard" in self.df:
            return sorted(set(self.df["shard"].dropna()))
        return []

    def __len__(self) -> int:
        return len(self.df)

    def __repr__(self) -> str:
        return (f"Results(root={self.root!r}, records={len(self)}, rows={self.n_rows}, images={self.n_images}, "
                f"errors={self.n_errors}, shards={len(self.shards)})")

    # -- lookup ----------------------------------------------------------------------------------------
    def _record(self, id: str, image_index: int = 0) -> dict:
        if self._lookup is None:
            ids = self.df["id"].tolist() if len(self.df) else []
            idx = self.df["image_index"].tolist() if len(self.df) else []
            self._lookup = {}
            for pos, (i, k) in enumerate(zip(ids, idx)):
                self._lookup.setdefault((str(i), int(k)), pos)
        pos = self._lookup.get((str(id), int(image_index)))
        if pos is None:
            errors = self.errors_of(id)
            if errors:
                raise KeyError(f"no image for id={id!r} image_index={image_index}: the row failed: {errors[0]}")
            raise KeyError(f"no image for id={id!r} image_index={image_index} in {self.root}")
        rec = self.df.iloc[pos].to_dict()
        if rec.get("status") != "ok":
            raise KeyError(f"no image for id={id!r} image_index={image_index}: status {rec.get('status')!r}, "
                           f"error {rec.get('error')!r}")
        return rec

    def errors_of(self, id: str) -> list[str]:
        if not len(self.df):
            return []
        m = (self.df["id"] == str(id)) & (self.df["status"] == "error")
        return [str(e) for e in self.df.loc[m, "error"].tolist()]

    def record(self, id: str, image_index: int = 0) -> dict:
        """The metadata record of one image (KeyError if absent or failed)."""
        return self._record(id, image_index)

    # -- image bytes -------------------------------------------------------------------------------------
    def image_bytes(self, id: str, image_index: int = 0, verify: bool = True) -> bytes:
        """The encoded bytes of one image (checked against the record's sha256 when ``verify``)."""
        return self.reader.bytes_of(self._record(id, image_index), verify)

    # -- images --------------------------------------------------------------------------------------------
    def image(self, id: str, image_index: int = 0):
        """One image as a ``PIL.Image.Image`` (KeyError naming id and index if absent or failed)."""
        from PIL import Image

        img = Image.open(io.BytesIO(self.image_bytes(id, image_index)))
        img.load()
        return img

    def ok_records(self, ids: Iterable[str] | None = None):
        df = self.df
        if not len(df):
            return df
        ok = df[df["status"] == "ok"]
        if ids is not None:
            wanted = [str(i) for i in ids]
            ok = ok[ok["id"].isin(wanted)]
            order = {v: n for n, v in enumerate(wanted)}
            ok = ok.assign(_o=ok["id"].map(order)).sort_values(["_o", "image_index"], kind="stable").drop(
                columns="_o")
        return ok

    def images(self, ids: Iterable[str] | None = None) -> list:
        """All ok images (of ``ids``, in that order and image_index order; default: every image)."""
        if isinstance(ids, str):
            ids = [ids]
        out = []
        for rec in self.ok_records(ids).to_dict("records"):
            out.append(self.image(rec["id"], int(rec["image_index"])))
        return out

    def gallery(self, max_images: int = 50, thumb: int = 160, sort: str | None = None,
                by: str = "clip_score") -> Any:
        """An object that Jupyter shows as a grid of thumbnails with prompt and seed (and the scores, with
        buttons sorting by ``by``). ``sort="worst"`` / ``"best"``: the worst (best) ``max_images`` of the whole
        output by ``by`` (clip_score, or a quality.heads head's ``score_<NAME>``), e.g. to choose a filter
        threshold."""
        from kbatch.output.gallery import InlineGallery

        return InlineGallery.from_records(self.df, self.reader, self.root, max_images=max_images, thumb=thumb,
                                          sort=sort, by=by)

    def _repr_html_(self) -> str:
        import html

        return (f"<div><b>kbatch results</b> {html.escape(self.root)}: {self.n_rows} rows, {self.n_images} images, "
                f"{self.n_errors} errors, {len(self.shards)} shards</div>")


def open_results(uri: str, storage_options: dict | None = None) -> Results:
    """Open an output location (local path or fsspec URL) written by kbatch, in any format."""
    return Results(uri, storage_options=storage_options)


__all__ = ["Results", "open_results", "list_committed_shards"]
