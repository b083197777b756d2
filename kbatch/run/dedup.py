"""Near-duplicate removal by image-embedding cosine (``kbatch export --dedup COS``, docs/export.md): a faiss
index of the embeddings kept so far, searched chunk by chunk (inner product of L2-normalized vectors, faiss'
range search), never an all-pairs loop. Deterministic: chunks are given in the output's shard order and the
first occurrence is kept; an image is dropped when its cosine with an image kept before it is >= COS.

The index is exact (flat) up to ``flat_limit`` kept embeddings (50k: a query costs 50k x D); past it, it
becomes an inverted-file index (IVF, ``nlist`` lists trained on the embeddings kept so far, ``nprobe`` lists
searched per query), whose query cost grows with kept / nlist x nprobe: a near-copy sits in its original's
list or a neighbouring one, so few are missed (docs/export.md). Memory: every kept embedding as float32
(4 x D bytes per kept image: 3 KiB at D = 768).
"""
from __future__ import annotations

import numpy as np

from kbatch.config import ConfigError

EPS = 1e-6  # cosine >= COS within float32 rounding (faiss' range search keeps scores > radius)
FLAT_LIMIT = 50_000  # kept embeddings searched exactly; past this, an IVF index
NLIST = 1024  # IVF lists (k-means centroids, trained on the FLAT_LIMIT embeddings kept first: ~49 per list)
NPROBE = 16  # lists searched per query
NITER = 10  # k-means iterations


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError("--dedup needs faiss: pip install 'kbatch[export]' (faiss-cpu)") from None
    return faiss


class NearDuplicates:
    """``keep(chunk)``: which embeddings of the next chunk are kept (True) or near-duplicates (False)."""

    def __init__(self, cos: float, flat_limit: int = FLAT_LIMIT, nlist: int = NLIST, nprobe: int = NPROBE):
        cos = float(cos)
        if not (0.0 < cos <= 1.0):
            raise ConfigError(f"--dedup must be a cosine in (0, 1], got {cos:g}")
        self.faiss = _faiss()
        self.cos = cos
        self.radius = cos - EPS
        self.index = None
        self.dim: int | None = None
        self.kept = self.dropped = self.unchecked = 0
        self.flat_limit, self.nlist, self.nprobe = flat_limit, nlist, nprobe
        self.exact = True  # False once the index is an IVF

    def _grow(self) -> None:
        """Past ``flat_limit`` kept embeddings: an IVF index trained on them (k-means with faiss' fixed seed)."""
        if not self.exact or self.index.ntotal <= self.flat_limit:
            return
        kept = self.index.reconstruct_n(0, self.index.ntotal)
        self._quantizer = self.faiss.IndexFlatIP(self.dim)  # held here: the IVF index points at it
        ivf = self.faiss.IndexIVFFlat(self._quantizer, self.dim, self.nlist, self.faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = NITER
        ivf.train(kept)
        ivf.add(kept)
        ivf.nprobe = min(self.nprobe, self.nlist)
        self.index, self.exact = ivf, False

    def keep(self, emb: np.ndarray) -> np.ndarray:
        """``emb``: [n, D] (any float dtype; rows with NaN or zero norm have no embedding: kept, never
        compared). Kept rows join the index, so later chunks are compared with them."""
        n = len(emb)
        keep = np.ones(n, dtype=bool)
        if n == 0:
            return keep
        x = np.asarray(emb, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"embeddings must be [n, D], got shape {x.shape}")
        if self.index is None:
            self.dim = x.shape[1]
            self.index = self.faiss.IndexFlatIP(self.dim)
        elif x.shape[1] != self.dim:
            raise ValueError(f"embeddings of {x.shape[1]} dimensions after {self.dim}")
        norms = np.linalg.norm(x, axis=1)
        valid = np.isfinite(norms) & (norms > 0)
        self.unchecked += int((~valid).sum())
        rows = np.flatnonzero(valid)
        if not len(rows):
            return keep
        xv = np.ascontiguousarray(x[rows] / norms[rows, None])
        m = len(rows)
        # near an embedding kept in an earlier chunk
        if self.index.ntotal:
            lims, _, _ = self.index.range_search(xv, self.radius)
            dup = lims[1:] > lims[:-1]
        else:
            dup = np.zeros(m, dtype=bool)
        # near an earlier row of this chunk that is kept: the chunk's own index, then in order
        local = self.faiss.IndexFlatIP(self.dim)
        local.add(xv)
        lims, _, ids = local.range_search(xv, self.radius)
        kept = ~dup
        counts = np.diff(lims).astype(np.int64)
        owner = np.repeat(np.arange(m), counts)
        earlier = ids < owner
        for j in np.unique(owner[earlier]):  # only rows with an earlier neighbour need the sequential test
            if kept[j]:
                nb = ids[lims[j]:lims[j + 1]]
                if kept[nb[nb < j]].any():
                    kept[j] = False
        if kept.any():
            self.index.add(xv[kept])
            self._grow()
        keep[rows[~kept]] = False
        self.kept += int(kept.sum())
        self.dropped += int((~kept).sum())
        return keep
