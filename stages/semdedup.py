"""Semantic dedup (``semdedup``, SemDeDup: Abbas et al. 2023; NeMo Curator's workflow), a shuffle stage
(``stages/shuffle.py``) with a reduce step, over a CLIP image embedding (``clip_score`` with
``embeddings: true`` writes ``image_embedding``).

1. **Fit** (reduce): a seeded sample of the ``ok`` rows (row kept when ``hash(seed, key) < sample_fraction``,
   so the sample does not depend on the blocks) -> spherical k-means with faiss (``n_clusters``, seeded;
   on GPU when faiss sees one) -> the centroids, the only state (``n_clusters x dim`` floats, JSON).
2. **Partition**: each row goes to its nearest centroid (``part`` = cluster id), with its normalised
   embedding and its cosine to the centroid.
3. **Decide** per cluster: rows are ranked by ``which_to_keep`` (``hard``: farthest from the centroid
   first, as SemDeDup keeps the least prototypical; ``easy``: closest first; ``random``: seeded), and a row
   is a ``duplicate`` when its cosine to a better-ranked row is ``>= 1 - eps``; the reason names the most
   similar better-ranked key and the cosine (rule ``semantic_duplicate``):

       semdedup: cosine 0.9987 to key 000000012 (cluster 3)

Memory: the fit holds the sample (``sample_fraction x rows x dim`` floats, on one process); a decide call
holds one cluster's embeddings and compares them in blocks of ``block_rows`` rows (``block_rows x
cluster`` floats at a time). Pick ``n_clusters`` so that clusters stay in the tens of thousands.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from schemas import OK
from stages.base import StageConfig
from stages.dedup import key_rank
from stages.shuffle import PART, ShuffleStage, decisions

log = logging.getLogger(__name__)
RULE = "semantic_duplicate"


class SemDedupConfig(StageConfig):
    embedding_column: str = Field(
        "image_embedding", description="Embedding column (`<column>_image_embedding` for a named model)."
    )
    n_clusters: int = Field(100, ge=1, description="k-means clusters (fewer when the sample has fewer rows).")
    eps: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="A row is a duplicate when its cosine to a better-ranked row of its cluster is >= 1 - eps.",
    )
    which_to_keep: Literal["hard", "easy", "random"] = Field(
        "hard",
        description="Which row of a duplicate group is kept: `hard` the farthest from the centroid, `easy` "
        "the closest, `random` a seeded draw.",
    )
    sample_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="Share of the ok rows the k-means is fitted on (seeded by key)."
    )
    seed: int = Field(0, description="Seed of the sample, the k-means and `which_to_keep: random`.")
    niter: int = Field(20, ge=1, description="k-means iterations.")
    block_rows: int = Field(4096, ge=1, description="Rows compared at a time within one cluster (memory).")


def _unit(key: str, seed: int) -> float:
    """A uniform draw in [0, 1) from (seed, key)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little") / 2**64


def _normalised(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list column of equal-length vectors (no nulls) as unit rows, float32 ``[n, dim]``."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    x = flat.reshape(n, -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class SemDedup(ShuffleStage):
    name = "semdedup"
    Config = SemDedupConfig
    requires = ("key", "image_embedding")
    has_fit = True

    def __init__(self, config=None):
        super().__init__(config)
        col = self.config.embedding_column
        self.fit_columns = (col,)
        self.partition_columns = (col,)

    def required_columns(self) -> tuple[str, ...]:
        return ("key", self.config.embedding_column)

    def _ok_with_embedding(self, batch: pa.Table) -> pa.Table:
        col = self.config.embedding_column
        ok = pc.equal(batch.column("status"), OK).fill_null(False) if "status" in batch.column_names else None
        rows = batch.filter(ok) if ok is not None else batch
        return rows.filter(pc.is_valid(rows.column(col)))

    # ---- fit ------------------------------------------------------------------------------
    def fit_partial(self, batch: pa.Table) -> dict[str, Any]:
        rows = self._ok_with_embedding(batch)
        c = self.config
        keys = rows.column("key").to_pylist()
        pick = [i for i, k in enumerate(keys) if _unit(k, c.seed) < c.sample_fraction]
        emb = rows.column(c.embedding_column).take(pa.array(pick, pa.int64()))
        return {"keys": [keys[i] for i in pick], "emb": _normalised(emb).tolist() if pick else []}

    def merge(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """All samples -> k-means (the executor calls this once, over every partial state)."""
        import faiss

        keys = [k for s in states for k in s["keys"]]
        emb = [e for s in states for e in s["emb"]]
        if not keys:
            return {"centroids": [], "sample_rows": 0, "sample_cluster_sizes": []}
        # in key order: the fit does not depend on the blocks
        order = sorted(range(len(keys)), key=lambda i: key_rank(keys[i]))
        x = np.ascontiguousarray(np.asarray([emb[i] for i in order], np.float32))
        k = min(self.config.n_clusters, len(x))
        km = faiss.Kmeans(
            x.shape[1], k, niter=self.config.niter, seed=self.config.seed, spherical=True,
            gpu=faiss.get_num_gpus() > 0, verbose=False, min_points_per_centroid=1,
        )  # fmt: skip
        km.train(x)
        centroids = km.centroids / np.maximum(np.linalg.norm(km.centroids, axis=1, keepdims=True), 1e-12)
        sizes = np.bincount((x @ centroids.T).argmax(1), minlength=k)
        return {
            "centroids": centroids.tolist(),
            "sample_rows": len(x),
            "sample_cluster_sizes": sizes.tolist(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self._centroids = np.asarray(state["centroids"], np.float32)
        self._state = state

    def state_summary(self, state: dict[str, Any]) -> dict[str, Any]:
        """Clusters, the sample, and a histogram of the sample's cluster sizes (power-of-two buckets)."""
        sizes = state.get("sample_cluster_sizes", [])
        hist: dict[str, int] = {}
        for s in sizes:
            lo = 0 if s == 0 else 1 << (int(s).bit_length() - 1)
            label = "0" if s == 0 else (f"{lo}" if lo == 1 else f"{lo}-{2 * lo - 1}")
            hist[label] = hist.get(label, 0) + 1
        return {
            "n_clusters": len(sizes),
            "sample_rows": state.get("sample_rows", 0),
            "cluster_size_histogram": hist,
        }

    # ---- partition ------------------------------------------------------------------------
    def partition_rows(self, batch: pa.Table) -> pa.Table:
        rows = self._ok_with_embedding(batch)
        schema = pa.schema([(PART, pa.uint64()), ("key", pa.string()), ("emb", pa.list_(pa.float32())),
                            ("centroid_cos", pa.float32())])  # fmt: skip
        if rows.num_rows == 0 or len(self._centroids) == 0:
            return schema.empty_table()
        x = _normalised(rows.column(self.config.embedding_column))
        sims = x @ self._centroids.T
        cluster = sims.argmax(1)
        return pa.table(
            {
                PART: pa.array(cluster.astype(np.uint64), pa.uint64()),
                "key": rows.column("key"),
                "emb": pa.array(list(x), pa.list_(pa.float32())),
                "centroid_cos": pa.array(sims[np.arange(len(x)), cluster], pa.float32()),
            },
            schema=schema,
        )

    # ---- decide ---------------------------------------------------------------------------
    def _ranked(self, keys: list[str], cos: np.ndarray) -> list[int]:
        c = self.config
        if c.which_to_keep == "hard":
            return sorted(range(len(keys)), key=lambda i: (float(cos[i]), key_rank(keys[i])))
        if c.which_to_keep == "easy":
            return sorted(range(len(keys)), key=lambda i: (-float(cos[i]), key_rank(keys[i])))
        return sorted(range(len(keys)), key=lambda i: (_unit(keys[i], c.seed + 1), key_rank(keys[i])))

    def decide(self, group: pa.Table) -> pa.Table:
        parts = group.column(PART).to_numpy()
        keys_all = group.column("key").to_pylist()
        idx_out, reasons = [], []
        for cluster in np.unique(parts):
            rows = np.flatnonzero(parts == cluster)
            if len(rows) < 2:
                continue
            sub = group.take(pa.array(rows, pa.int64()))
            keys = [keys_all[i] for i in rows]
            order = self._ranked(keys, sub.column("centroid_cos").to_numpy())
            x = _normalised(sub.column("emb"))[order]
            limit = 1.0 - self.config.eps
            for start in range(1, len(order), self.config.block_rows):
                stop = min(len(order), start + self.config.block_rows)
                s = x[start:stop] @ x[:stop].T  # each row against the rows ranked before it
                s[np.arange(stop - start)[:, None] <= np.arange(stop)[None, :] - start] = -2.0
                best = s.argmax(1)
                top = s[np.arange(stop - start), best]
                for r in np.flatnonzero(top >= limit):
                    me, kept = order[start + r], order[best[r]]
                    idx_out.append(int(rows[me]))
                    reasons.append(
                        f"semdedup: cosine {top[r]:.4f} to key {keys[kept]} (cluster {int(cluster)})"
                    )
        return decisions(group, idx_out, reasons, RULE)


__all__ = ["SemDedup", "SemDedupConfig"]
