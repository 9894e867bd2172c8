"""Eval-set decontamination (``decontaminate``), a per-batch stage: a pool row whose image embedding has a
cosine ``>= min_similarity`` to any image of a given evaluation set is ``contaminated`` (DataComp removes
near-duplicates of its evaluation images from its pools the same way). The reason names the eval item:

    decontaminate: cosine 0.9931 to eval item eval-000017

Rule tag ``contaminated:eval``. The eval set (``eval_path``) is one of:

* a Parquet with an id column (``id_column``) and an embedding column (``embedding_column``), embeddings
  of the same model that wrote the pool's ``embedding_column``;
* a Parquet with an id column and an ``image`` column (bytes), or a folder of images (ids: file names):
  embedded once in ``setup()`` with ``model``/``pretrained``, loaded as ``clip_score`` loads them (use the
  same model as the ``clip_score`` stage that wrote the pool's embeddings). With ``image_size`` set, each is
  first resized and re-encoded by img2dataset's resizer as the ``download`` stage stored the pool's images
  (same ``image_size``, ``resize_mode``, ``encode_format``, ``encode_quality``), so that an eval image and its
  copy in the pool are framed and compressed alike (``border`` pads, the model's own transform centre-crops).

Memory: a faiss inner-product index of the eval set (``eval rows x dim`` floats) per worker, built once in
``setup()``; each batch is one ``search`` against it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from schemas import Status
from stages.base import Stage, StageConfig, StageFailed, path_field, set_status
from stages.download.config import RESIZE_MODES

RULE = "contaminated:eval"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class DecontaminateConfig(StageConfig):
    eval_path: str = path_field(
        description="The evaluation set: a Parquet (id + embedding, or id + `image` bytes) or a folder of images.",
        always=True,
    )
    min_similarity: float = Field(
        0.95,
        ge=-1.0,
        le=1.0,
        description="A pool row is contaminated when its cosine to an eval image is >= this (model-dependent: "
        "measure the cosines of known copies with your model).",
    )
    embedding_column: str = Field(
        "image_embedding",
        description="Embedding column of the pool rows (and of the eval Parquet, if it has one).",
    )
    id_column: str = Field("key", description="Id column of the eval Parquet (named in the reasons).")
    model: str | None = path_field(
        None,
        prefixed=True,
        description="open_clip model that embeds eval images (as in `clip_score`); needed unless the eval "
        "Parquet holds embeddings.",
    )
    pretrained: str | None = path_field(None, description="Its pretrained tag or checkpoint path.")
    image_size: int | None = Field(
        None,
        ge=1,
        description="Resize and re-encode eval images first, as the `download` stage stored the pool's "
        "(img2dataset's resizer): give the download stage's `image_size` (and below, its other settings). "
        "`null`: embed them as they are.",
    )
    resize_mode: Literal[RESIZE_MODES] = Field(
        "border", description="With `image_size`: the download stage's `resize_mode`."
    )
    encode_format: Literal["jpg", "png", "webp"] = Field(
        "jpg", description="With `image_size`: the download stage's `encode_format`."
    )
    encode_quality: int = Field(95, description="With `image_size`: the download stage's `encode_quality`.")
    batch_size: int = Field(1024, ge=1, description="Rows per `process` call.")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Decontaminate(Stage):
    name = "decontaminate"
    Config = DecontaminateConfig
    requires = ("key", "image_embedding")

    def required_columns(self) -> tuple[str, ...]:
        return ("key", self.config.embedding_column)

    def model_info(self) -> dict:
        c = self.config
        return {"eval_path": c.eval_path, "model": c.model, "pretrained": c.pretrained}

    # ---- the eval set -----------------------------------------------------------------------
    def _eval_set(self) -> tuple[list[str], np.ndarray]:
        c = self.config
        path = Path(c.eval_path)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            return [str(p.relative_to(path)) for p in files], self._embed([p.read_bytes() for p in files])
        t = pq.read_table(path)
        if c.id_column not in t.column_names:
            raise ValueError(f"{path}: no id column {c.id_column!r} (columns: {', '.join(t.column_names)})")
        ids = [str(v) for v in t.column(c.id_column).to_pylist()]
        if c.embedding_column in t.column_names:
            return ids, _unit_rows(np.asarray(t.column(c.embedding_column).to_pylist(), np.float32))
        if "image" in t.column_names:
            return ids, self._embed(t.column("image").to_pylist())
        raise ValueError(f"{path}: neither {c.embedding_column!r} nor 'image' column")

    def _embed(self, images: list[bytes]) -> np.ndarray:
        """Image embeddings (normalised) with the configured open_clip model, as ``clip_score`` computes them."""
        import torch
        import torch.nn.functional as F

        from stages.clip_score import models as _models
        from stages.clip_score.config import ModelPlan

        if not self.config.model:
            raise ValueError("eval images need 'model' (the open_clip model of the pool's embeddings)")
        plan = ModelPlan("eval", self.config.model, self.config.pretrained, None, True, False, None, "", "")
        m = _models.load_model(plan, torch.device("cpu"))
        images = self._resized(images)
        out = []
        with torch.inference_mode():
            for s in range(0, len(images), 64):
                x = torch.stack([m.preprocess(_models.decode_image(b)) for b in images[s : s + 64]])
                out.append(F.normalize(m.model.encode_image(x).float(), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)

    def _resized(self, images: list[bytes]) -> list[bytes]:
        """``images`` through img2dataset's resizer with the download stage's size and mode (``image_size``)."""
        c = self.config
        if c.image_size is None:
            return images
        from stages.download.images import img2dataset_module

        resizer = img2dataset_module("resizer").Resizer(
            image_size=c.image_size, resize_mode=c.resize_mode, resize_only_if_bigger=False,
            encode_format=c.encode_format, encode_quality=c.encode_quality,
        )  # fmt: skip
        out = []
        for i, b in enumerate(images):
            data, *_, err = resizer(io.BytesIO(b))
            if err is not None:
                raise ValueError(f"{c.eval_path}: eval image {i} cannot be resized: {err}")
            out.append(data)
        return out

    def setup(self) -> None:
        import faiss

        self._ids, emb = self._eval_set()
        if not self._ids:
            raise ValueError(f"{self.config.eval_path}: the evaluation set is empty")
        self._index = faiss.IndexFlatIP(emb.shape[1])
        self._index.add(emb)

    # ---- per batch --------------------------------------------------------------------------
    def process(self, batch: pa.Table) -> pa.Table:
        col = batch.column(self.config.embedding_column)
        valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
        if not valid.any():
            return batch
        rows = np.flatnonzero(valid)
        x = _unit_rows(np.asarray(col.take(pa.array(rows, pa.int64())).to_pylist(), np.float32))
        if x.shape[1] != self._index.d:
            raise StageFailed(  # the eval set's model is not the pool's: the run's error, not a row's
                self.name,
                f"{self.config.eval_path}: eval embeddings have {self._index.d} dims, the pool's {x.shape[1]}",
            )
        sims, found = self._index.search(x, 1)
        hit = sims[:, 0] >= self.config.min_similarity
        if not hit.any():
            return batch
        mask = np.zeros(batch.num_rows, bool)
        reasons: list[str | None] = [None] * batch.num_rows
        for r in np.flatnonzero(hit):
            mask[rows[r]] = True
            reasons[rows[r]] = f"decontaminate: cosine {sims[r, 0]:.4f} to eval item {self._ids[found[r, 0]]}"
        return set_status(batch, mask.tolist(), Status.CONTAMINATED, reasons, rule=RULE)


__all__ = ["Decontaminate", "DecontaminateConfig"]
