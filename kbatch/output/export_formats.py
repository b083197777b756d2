"""What one export shard is on disk (``kbatch export``, docs/export.md): a webdataset tar, a Parquet file with
the image bytes, or a Parquet file ``datasets.load_dataset`` decodes, plus the clip-retrieval embeddings
files beside it; each file written under a temp name and published by one rename (or one PUT).

Layout of an export destination (``<i>``: the export shard's number, ``%05d`` in data file names)::

    <i>.tar                                 webdataset: <key>.<png|jpg|webp>, <key>.txt (prompt), <key>.json
                                            (the record), <key>.npy (float16 embedding) per sample
    data/<i>.parquet                        parquet: the records + ``image`` (binary, the encoded file)
                                            hf: the records + ``image`` (a ``datasets`` Image: {bytes, path})
    README.md                               hf: the dataset card naming data/*.parquet as the train split
    embeddings/img_emb/img_emb_<i>.npy      when the output has embeddings: float16 [n, D], row j = sample j
    embeddings/metadata/metadata_<i>.parquet    the samples' records (+ image_path, caption), row j = sample j
    _export.json                            the export's arguments, source, finished shards and counts

Each export shard holds the samples in the order the source output's shards list them; the data file is
published last, after its embeddings and metadata, so a data file in DEST means the whole shard is there.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import math
import os
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kbatch import storage

FORMATS = ("webdataset", "parquet", "hf")
EMB_DIR = "embeddings"
PROGRESS_FILE = "_export.json"
ROW_GROUP = 64  # samples per Parquet row group: a reader holds one group of images at a time
TMP = ".export-tmp-"  # temp files of a shard being written: ".<name>.export-tmp-<uuid>", never a data name
HF_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*.parquet
---
# kbatch export

Images exported by `kbatch export` (format `hf`): `datasets.load_dataset(THIS_FOLDER)` reads `data/*.parquet`
with the `image` column decoded to PIL images and every record column of kbatch's output beside it.
"""


def data_name(fmt: str, i: int) -> str:
    """The data file of export shard ``i`` (published last)."""
    if fmt == "webdataset":
        return f"{i:05d}.tar"
    if fmt in ("parquet", "hf"):
        return f"data/{i:05d}.parquet"
    raise ValueError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")


def emb_name(i: int) -> str:
    return f"{EMB_DIR}/img_emb/img_emb_{i}.npy"


def meta_name(i: int) -> str:
    return f"{EMB_DIR}/metadata/metadata_{i}.parquet"


@dataclass
class ExportSpec:
    """Where an export shard's samples come from and go (picklable: it travels to Ray tasks)."""

    source: str  # the kbatch output read
    dest: str  # the export destination
    format: str = "webdataset"
    storage_options: dict = field(default_factory=dict)  # for both source and dest
    mtime: int = 0  # tar member mtime (the export's start): a shard written again has the same bytes


@dataclass
class ShardWritten:
    index: int
    images: int
    bytes: int
    seconds: float


# ------------------------------------------------------------------------------------------ reading sources
class SourceImages:
    """The encoded images of records, read one source file at a time (a tar or Parquet data file is read once
    for all the records of it that an export shard takes; loose files in batches), checked by sha256."""

    FILES_BATCH = 64

    def __init__(self, root: str, storage_options: dict | None = None):
        self.fs, self.root = storage.get_fs(root, storage_options)
        self._file: str | None = None
        self._members: dict[str, bytes] = {}

    def _full(self, file_part: str) -> str:
        return storage.join(self.root, storage.check_relative(file_part))

    def _load(self, file_part: str, wanted: set[str]) -> dict[str, bytes]:
        full = self._full(file_part)
        out: dict[str, bytes] = {}
        if file_part.endswith(".tar"):
            data = self.fs.cat_file(full)
            for name, (off, size) in tar_index(data).items():
                if name in wanted:
                    out[name] = data[off:off + size]
        elif file_part.endswith(".parquet"):
            with self.fs.open(full, "rb") as fh:
                pf = pq.ParquetFile(fh)
                groups = [g for g in range(pf.num_row_groups)
                          if wanted & set(pf.read_row_group(g, columns=["key"]).column("key").to_pylist())]
                if groups:
                    t = pf.read_row_groups(groups, columns=["key", "image"])
                    for k, v in zip(t.column("key").to_pylist(), t.column("image").to_pylist()):
                        if k in wanted:
                            out.setdefault(k, v)
        else:
            raise ValueError(f"cannot read images from {file_part!r}")
        return out

    def iter_bytes(self, records: list[dict]) -> Iterator[bytes]:
        """Each record's image bytes, in order."""
        k = 0
        while k < len(records):
            rec = records[k]
            file_part, _, member = str(rec.get("path") or "").partition("#")
            if not file_part:
                raise KeyError(f"record id={rec.get('id')!r} image_index={rec.get('image_index')} has no path")
            if not member:  # format files: one object per image; read a run of them at once
                run = [rec]
                while (len(run) < self.FILES_BATCH and k + len(run) < len(records)
                       and "#" not in str(records[k + len(run)].get("path") or "#")):
                    run.append(records[k + len(run)])
                paths = [self._full(str(r["path"])) for r in run]
                if len(paths) > 1:
                    with cf.ThreadPoolExecutor(max_workers=min(16, len(paths))) as ex:
                        got = list(ex.map(self.fs.cat_file, paths))
                else:
                    got = [self.fs.cat_file(paths[0])]
                for r, data in zip(run, got):
                    yield _checked(r, data)
                k += len(run)
                continue
            if file_part != self._file:
                wanted = {str(r.get("path")).partition("#")[2] for r in records[k:]
                          if str(r.get("path") or "").partition("#")[0] == file_part}
                self._file, self._members = None, {}
                self._members = self._load(file_part, wanted)
                self._file = file_part
            if member not in self._members:
                raise KeyError(f"{member!r} not found in {file_part} (record id={rec.get('id')!r})")
            yield _checked(rec, self._members[member])
            k += 1


def _checked(rec: dict, data: bytes) -> bytes:
    sha = rec.get("sha256")
    if sha and hashlib.sha256(data).hexdigest() != sha:
        raise ValueError(f"sha256 mismatch for id={rec.get('id')!r} image_index={rec.get('image_index')} at "
                         f"{rec.get('path')!r}: the source output's file is corrupt")
    return data


# ------------------------------------------------------------------------------------------ tar files
# Python's tarfile spends ~0.3 ms per member on headers; webdataset shards have three or four members per
# sample. The plain-file ustar headers are made and read here; anything else goes through tarfile.
def tar_header(name: str, size: int, mtime: int) -> bytes:
    """The header block(s) of a regular file member (ustar; tarfile's GNU long name when it does not fit)."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or not name.isascii() or size >= 8 ** 11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, int(mtime), 0o644
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    h = bytearray(512)
    h[0:len(raw)] = raw
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % int(mtime)
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _pad(size: int) -> bytes:
    return b"\0" * (-size % 512)


def tar_index(data: bytes) -> dict[str, tuple[int, int]]:
    """``{member name: (offset, size)}`` of the regular files of a tar held in memory (ustar, GNU long names
    and pax path records; tarfile reads anything else)."""
    try:
        return _tar_index_fast(data)
    except (ValueError, UnicodeDecodeError):
        out = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if info.isfile():
                    out[info.name] = (info.offset_data, info.size)
        return out


def _tar_index_fast(data: bytes) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    pos, n, long_name = 0, len(data), None
    while pos + 512 <= n:
        h = data[pos:pos + 512]
        if not any(h):
            break
        field = h[124:136].rstrip(b"\0 ").strip()
        if field[:1] in (b"\x80", b"\xff") or sum(h[:148]) + 256 + sum(h[156:]) != int(
                h[148:156].rstrip(b"\0 ").strip() or b"-1", 8):
            raise ValueError("not a plain ustar header")  # base-256 sizes, bad checksums: tarfile decides
        size, kind, start = int(field or b"0", 8), h[156:157], pos + 512
        if kind == b"L":
            long_name = data[start:start + size].rstrip(b"\0").decode("utf-8")
        elif kind == b"x":
            long_name = _pax_path(data[start:start + size]) or long_name
        elif kind in (b"0", b"\0"):
            name = h[0:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = h[345:500].split(b"\0", 1)[0].decode("utf-8") if h[257:262] == b"ustar" else ""
            out[long_name or (f"{prefix}/{name}" if prefix else name)] = (start, size)
            long_name = None
        elif kind not in (b"g",):
            long_name = None
        pos = start + size + (-size % 512)
    return out


def _pax_path(block: bytes) -> str | None:
    path, k = None, 0
    while k < len(block):
        sp = block.index(b" ", k)
        length = int(block[k:sp])
        key, _, value = block[sp + 1:k + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        k += length
    return path


# ------------------------------------------------------------------------------------------ writing
def _ext(rec: dict) -> str:
    file_part, _, member = str(rec.get("path") or "").partition("#")
    name = member or file_part
    return name.rsplit(".", 1)[-1].lower() if "." in name else "png"


def _jsonable(rec: dict) -> dict:
    out = {}
    for k, v in rec.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        elif isinstance(v, list):
            v = [None if isinstance(x, float) and not math.isfinite(x) else x for x in v]
        out[k] = v
    return out


def _npy(vec: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(vec, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


class _Publisher:
    """Files of one shard written to temp names (in DEST on a local disk, else in a local temp folder) and
    published in order, each by one rename (local) or one upload (object stores)."""

    def __init__(self, dest: str, storage_options: dict | None):
        self.fs, self.root = storage.get_fs(dest, storage_options)
        self.local = storage.is_local(self.fs)
        self.pending: list[tuple[str, str]] = []  # (temp path, final path)

    def temp(self, name: str) -> str:
        final = storage.join(self.root, storage.check_relative(name))
        head, base = os.path.split(final)
        if self.local:
            os.makedirs(head, exist_ok=True)
            tmp = os.path.join(head, f".{base}{TMP}{uuid.uuid4().hex}")
        else:
            fd, tmp = tempfile.mkstemp(prefix=f".{base}{TMP}")
            os.close(fd)
        self.pending.append((tmp, final))
        return tmp

    def publish(self) -> int:
        total = 0
        for tmp, final in self.pending:
            total += os.path.getsize(tmp)
            if self.local:
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, final)
            elif storage.renames_atomically(self.fs):
                part = f"{final}{TMP}{uuid.uuid4().hex}"
                self.fs.put_file(tmp, part)
                self.fs.mv(part, final)
                os.unlink(tmp)
            else:  # object stores: one upload is atomic per object
                self.fs.put_file(tmp, final)
                os.unlink(tmp)
        self.pending = []
        return total

    def discard(self) -> None:
        for tmp, _ in self.pending:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self.pending = []


def _hf_image_type() -> pa.DataType:
    return pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _with_image(records: pa.Table, images: list[bytes], exts: list[str], fmt: str) -> pa.Table:
    if fmt == "hf":
        keys = records.column("key").to_pylist()
        col = pa.array([{"bytes": b, "path": f"{k}.{e}"} for b, k, e in zip(images, keys, exts)],
                       type=_hf_image_type())
    else:
        col = pa.array(images, type=pa.binary())
    return records.append_column("image", col)


def _parquet_schema(records: pa.Schema, fmt: str) -> pa.Schema:
    schema = records.append(pa.field("image", _hf_image_type() if fmt == "hf" else pa.binary()))
    if fmt == "hf":  # the datasets library decodes the column to PIL images
        schema = schema.with_metadata({b"huggingface": json.dumps({"info": {"features": {
            "image": {"_type": "Image"}}}}).encode()})
    return schema


def write_export_shard(spec: ExportSpec, index: int, records: pa.Table,
                       embeddings: np.ndarray | None) -> ShardWritten:
    """Write export shard ``index``: ``records`` (the samples' records, in order) with their images read
    from ``spec.source`` and ``embeddings`` (float16 [n, D] aligned with ``records``, or None), in
    ``spec.format``. Holds one source data file's images and one Parquet row group at a time."""
    t0 = time.perf_counter()
    recs = records.to_pylist()
    if embeddings is not None and len(embeddings) != len(recs):
        raise ValueError(f"export shard {index}: {len(recs)} records but {len(embeddings)} embeddings")
    source = SourceImages(spec.source, spec.storage_options)
    pub = _Publisher(spec.dest, spec.storage_options)
    try:
        if embeddings is not None:
            with open(pub.temp(emb_name(index)), "wb") as fh:  # a file object: np.save adds .npy to a name
                np.save(fh, np.asarray(embeddings, dtype=np.float16), allow_pickle=False)
            keys = [r["key"] for r in recs]
            exts = [_ext(r) for r in recs]
            where = data_name(spec.format, index)
            meta = records.append_column("image_path", pa.array(
                [f"{where}#{k}.{e}" if spec.format == "webdataset" else f"{where}#{k}" for k, e in zip(keys, exts)],
                pa.string())).append_column("caption", records.column("prompt"))
            pq.write_table(meta, pub.temp(meta_name(index)))
        data_tmp = pub.temp(data_name(spec.format, index))
        images = source.iter_bytes(recs)
        if spec.format == "webdataset":
            with open(data_tmp, "wb") as tar:
                for j, (rec, data) in enumerate(zip(recs, images)):
                    key = rec["key"]
                    members = [(f"{key}.{_ext(rec)}", data), (f"{key}.txt", (rec.get("prompt") or "").encode()),
                               (f"{key}.json", json.dumps(_jsonable(rec), ensure_ascii=False).encode())]
                    if embeddings is not None and np.isfinite(embeddings[j]).all():
                        members.append((f"{key}.npy", _npy(embeddings[j])))
                    for name, blob in members:
                        tar.write(tar_header(name, len(blob), spec.mtime))
                        tar.write(blob)
                        tar.write(_pad(len(blob)))
                tar.write(b"\0" * (2 * 512 + (-(tar.tell() + 1024) % tarfile.RECORDSIZE)))  # end, as tarfile pads
        else:
            with pq.ParquetWriter(data_tmp, _parquet_schema(records.schema, spec.format)) as w:
                for lo in range(0, len(recs), ROW_GROUP):
                    part = records.slice(lo, ROW_GROUP)
                    blobs = [next(images) for _ in range(part.num_rows)]
                    exts = [_ext(r) for r in recs[lo:lo + part.num_rows]]
                    w.write_table(_with_image(part, blobs, exts, spec.format))
        nbytes = pub.publish()
    except BaseException:
        pub.discard()
        raise
    return ShardWritten(index, len(recs), nbytes, time.perf_counter() - t0)


def write_card(dest: str, storage_options: dict | None = None) -> None:
    """``README.md`` of an ``hf`` export: the dataset card ``datasets.load_dataset(DEST)`` reads."""
    fs, root = storage.get_fs(dest, storage_options)
    storage.write_bytes_atomic(fs, storage.join(root, "README.md"), HF_CARD.encode())


def remove_temps(dest: str, storage_options: dict | None = None) -> int:
    """Remove the temp files an interrupted export left in DEST (local disks: they are written there)."""
    fs, root = storage.get_fs(dest, storage_options)
    if not storage.is_local(fs) or not os.path.isdir(root):
        return 0
    n = 0
    for folder in (root, os.path.join(root, "data"), os.path.join(root, EMB_DIR, "img_emb"),
                   os.path.join(root, EMB_DIR, "metadata")):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.startswith(".") and TMP in name:
                    os.unlink(os.path.join(folder, name))
                    n += 1
    return n
