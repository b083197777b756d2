"""Reading the encoded image of a metadata record, whatever the output format (files, tar, parquet)."""
from __future__ import annotations

import hashlib
import tarfile

from kbatch import storage


class ImageReader:
    """Image bytes of an output location's records; caches the member index of each tar / parquet file."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.root = str(root)
        self.storage_options = dict(storage_options or {})
        self._tar_index: dict[str, dict[str, tuple[int, int]]] = {}  # tar path -> member -> (offset, size)
        self._pq_index: dict[str, dict[str, tuple[int, int]]] = {}  # parquet path -> key -> (group, row)

    @property
    def fs(self):
        """``(fs, root path)`` of the output location."""
        return storage.get_fs(self.root, self.storage_options)

    def _tar_member(self, fs, tar_path: str, member: str) -> bytes:
        index = self._tar_index.get(tar_path)
        if index is None:
            index = {}
            with fs.open(tar_path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
                for info in tar:
                    if info.isfile():
                        index[info.name] = (info.offset_data, info.size)
            self._tar_index[tar_path] = index
        if member not in index:
            raise KeyError(f"{member!r} not found in {tar_path}")
        off, size = index[member]
        return fs.cat_file(tar_path, start=off, end=off + size)

    def _parquet_image(self, fs, pq_path: str, key: str) -> bytes:
        import pyarrow.parquet as pq

        with fs.open(pq_path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            index = self._pq_index.get(pq_path)
            if index is None:
                index = {}
                for g in range(pf.num_row_groups):
                    keys = pf.read_row_group(g, columns=["key"]).column("key").to_pylist()
                    for r, k in enumerate(keys):
                        index.setdefault(k, (g, r))
                self._pq_index[pq_path] = index
            if key not in index:
                raise KeyError(f"key {key!r} not found in {pq_path}")
            g, r = index[key]
            col = pf.read_row_group(g, columns=["image"]).column("image")
            return col[r].as_py()

    def bytes_of(self, rec: dict, verify: bool = True) -> bytes:
        fs, root = self.fs
        rel = rec.get("path")
        if not rel:
            raise KeyError(f"record id={rec.get('id')!r} image_index={rec.get('image_index')} has no path")
        file_part, _, member = str(rel).partition("#")
        full = storage.join(root, storage.check_relative(file_part))
        if not member:
            data = fs.cat_file(full)
        elif file_part.endswith(".tar"):
            data = self._tar_member(fs, full, member)
        elif file_part.endswith(".parquet"):
            data = self._parquet_image(fs, full, member)
        else:
            raise ValueError(f"cannot read image path {rel!r}")
        sha = rec.get("sha256")
        if verify and sha and hashlib.sha256(data).hexdigest() != sha:
            raise ValueError(f"sha256 mismatch for id={rec.get('id')!r} image_index={rec.get('image_index')} "
                             f"at {rel!r}: the stored file is corrupt")
        return data
