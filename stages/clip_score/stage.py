"""CLIP scoring with open_clip: ``clip_score`` (raw cosine of the image and caption embeddings), or one
score column per model of a ``models:`` list, plus heads on the image embeddings — one decode per image.

Models, all through open_clip's own factory (its transform and tokenizer, truncation to the context length):

* ``model: ViT-L-14`` + ``pretrained: datacomp_xl_s13b_b90k`` — a named architecture and a pretrained
  tag (or ``pretrained: /path/to/checkpoint.pt``);
* ``model: hf-hub:ORG/NAME`` — a Hugging Face Hub model;
* ``model: local-dir:PATH`` — a folder with ``open_clip_config.json`` and weights (the demo's toy CLIP);
* ``model_config_path: PATH.json`` + ``pretrained: CHECKPOINT`` — a custom architecture file.

Several models: ``models:`` lists entries with those keys and a ``column`` each (``clip_l14``,
``dfn_b32``...). Each image is decoded once per batch; each model gets its own open_clip preprocessing
of that decoded image, and models whose preprocessing is equal share the tensor. ``flipped`` adds
``<column>_flipped``, the score of the horizontally flipped image (a second image-tower forward on the
same preprocessed batch, flipped; the text embedding is reused). ``heads:`` apply a small MLP to a
model's image embedding (format in ``stages/clip_score/heads.py``) and write one column each.

Compute: the device is chosen automatically (``cuda`` if available). On GPU the forward runs under
bf16 autocast (``precision``), and images are decoded and preprocessed on a CPU thread pool one
forward batch (``forward_batch_size``) ahead of the models, so the GPU is not starved; ``decode: tensor``
instead decodes JPEGs with ``torchvision.io.decode_jpeg`` on the model's device and resizes there. On CPU
it runs in fp32 with open_clip's own PIL transform, which makes scores equal to a plain open_clip forward.

Filtering: ``min_score`` rejects rows below an absolute threshold (status ``filtered_clip``).
DataComp's pool-level ``top_fraction`` needs every score first: use the ``clip_filter`` stage after
this one.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from schemas import Status
from schemas.row import STAGE_FIELDS
from stages.base import Resources, Stage, replace_column, set_status
from stages.clip_score import models as _models
from stages.clip_score.config import DEFAULT_COLUMN, ClipScoreConfig, head_model, model_plans

log = logging.getLogger(__name__)

SCORE_TYPE = pa.float32()
EMBEDDING_TYPE = pa.list_(pa.float16())


class ClipScore(Stage):
    name = "clip_score"
    Config = ClipScoreConfig
    requires = ("image", "caption")
    produces = ("clip_score",)

    def required_columns(self) -> tuple[str, ...]:
        return ("image", self.config.text_column)

    def resources(self) -> Resources:
        c = self.config
        return Resources(
            num_cpus=c.num_cpus,
            num_gpus=c.num_gpus,
            concurrency=c.concurrency,
            batch_size=c.batch_size,
            actor=True,
        )

    def output_columns(self) -> dict[str, pa.DataType]:
        """Every column this configuration writes: each model's score (and flipped score, embeddings),
        then each head's."""
        cols: dict[str, pa.DataType] = {}
        for p in model_plans(self.config):
            cols[p.column] = SCORE_TYPE
            if p.flipped:
                cols[p.flipped_col] = SCORE_TYPE
            if p.embeddings:
                cols[p.image_embedding_col] = STAGE_FIELDS.get(p.image_embedding_col, EMBEDDING_TYPE)
                cols[p.text_embedding_col] = STAGE_FIELDS.get(p.text_embedding_col, EMBEDDING_TYPE)
        for h in self.config.heads:
            cols[h.column] = SCORE_TYPE
        return cols

    def model_info(self) -> dict:
        c = self.config
        info: dict = {}
        if c.models is None:
            info = {"model": c.model, "pretrained": c.pretrained, "model_config_path": c.model_config_path}
        else:
            info["models"] = [
                {"column": p.column, "model": p.model, "pretrained": p.pretrained} for p in model_plans(c)
            ]
        if c.text_column != "caption":
            info["text_column"] = c.text_column
        if c.heads:
            info["heads"] = [{"column": h.column, "model": head_model(c, h), "path": h.path} for h in c.heads]
        return info

    # ---- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        import torch

        from stages.clip_score.heads import Head

        c = self.config
        dev = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        self.loaded = [_models.load_model(p, self.device) for p in model_plans(c)]
        # One transform per distinct preprocessing (models sharing it share the tensor).
        self.transforms = {}
        for m in self.loaded:
            self.transforms.setdefault(m.group, m.preprocess)
        if c.decode == "tensor":
            self.tensor_transforms = {
                g: _models.TensorTransform.from_transform(t, self.device) for g, t in self.transforms.items()
            }
        by_col = {m.plan.column: m for m in self.loaded}
        self.heads = []  # (spec, Head, model column)
        for h in c.heads:
            target = head_model(c, h)
            head = Head.load(h.path, activation=h.activation, sigmoid=h.sigmoid, normalize=h.normalize)
            width = int(by_col[target].model.visual.output_dim)
            if head.in_dim != width:
                raise ValueError(f"head {h.column!r} ({h.path}) takes {head.in_dim} inputs; model {target!r} "
                                 f"gives {width}")  # fmt: skip
            self.heads.append((h, head.to(self.device), target))
        prec = c.precision
        if prec == "auto":
            prec = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        self._pool = ThreadPoolExecutor(max(1, c.decode_threads))
        log.info(
            "clip_score: %s on %s, precision %s, %d preprocessing(s), %d head(s)",
            ", ".join(f"{m.plan.column}={m.plan.model} ({m.plan.pretrained})" for m in self.loaded),
            self.device, prec, len(self.transforms), len(self.heads),
        )  # fmt: skip

    # ---- per batch ----------------------------------------------------------------------------
    def _decode_one(self, data: bytes) -> dict:
        """One decode, then every distinct preprocessing of it: {group: tensor}."""
        im = _models.decode_image(data)
        return {g: t(im) for g, t in self.transforms.items()}

    def _prepare(self, images: list[bytes]):
        """Decode + preprocess one forward batch. Returns ({group: tensor of the good images} or None,
        per-image error or None)."""
        import torch

        if self.config.decode == "tensor":
            decoded, errors = _models.decode_tensors(images, self.device)
            if all(d is None for d in decoded):
                return None, errors
            return {g: t(decoded) for g, t in self.tensor_transforms.items()}, errors
        futs = [self._pool.submit(self._decode_one, b) for b in images]
        per_image, errors = [], []
        for f in futs:
            try:
                per_image.append(f.result())
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - a bad image is a row status, not a crash
                errors.append(f"{type(e).__name__}: {e}"[:200])
        if not per_image:
            return None, errors
        return {g: torch.stack([d[g] for d in per_image]) for g in self.transforms}, errors

    def _autocast(self):
        import contextlib

        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward(self, xs: dict, captions: list[str]) -> dict[str, np.ndarray]:
        """Every model (and head) on one forward batch: {column: values [n] or [n, d]}."""
        import torch
        import torch.nn.functional as F

        out: dict[str, np.ndarray] = {}
        with torch.inference_mode(), self._autocast():
            for m in self.loaded:
                p = m.plan
                x = xs[m.group].to(self.device, non_blocking=True)
                tokens = m.tokenizer(captions).to(self.device, non_blocking=True)
                raw = m.model.encode_image(x).float()
                img = F.normalize(raw, dim=-1)
                txt = F.normalize(m.model.encode_text(tokens).float(), dim=-1)
                out[p.column] = (img * txt).sum(-1).cpu().numpy().astype(np.float32)
                if p.flipped:
                    img_f = F.normalize(m.model.encode_image(x.flip(-1)).float(), dim=-1)
                    out[p.flipped_col] = (img_f * txt).sum(-1).cpu().numpy().astype(np.float32)
                if p.embeddings:
                    out[p.image_embedding_col] = img.half().cpu().numpy()
                    out[p.text_embedding_col] = txt.half().cpu().numpy()
                for spec, head, target in self.heads:
                    if target == p.column:
                        out[spec.column] = head(raw).cpu().numpy().astype(np.float32)
        return out

    def process(self, batch: pa.Table) -> pa.Table:
        c = self.config
        n = batch.num_rows
        images = batch.column("image").to_pylist()
        captions = [s or "" for s in batch.column(self.config.text_column).to_pylist()]
        cols = self.output_columns()
        values: dict[str, list] = {k: [None] * n for k in cols}
        errors: list[str | None] = [None] * n
        fb = c.forward_batch_size
        starts = list(range(0, n, fb))
        # Prepare batch i+1 on the thread pool while the models run batch i.
        pending = self._pool.submit(self._prepare, images[0:fb]) if starts else None
        for j, s in enumerate(starts):
            xs, errs = pending.result()
            if j + 1 < len(starts):
                nxt = starts[j + 1]
                pending = self._pool.submit(self._prepare, images[nxt : nxt + fb])
            idx = [s + i for i, e in enumerate(errs) if e is None]
            for i, e in enumerate(errs):
                if e is not None:
                    errors[s + i] = e
            if xs is None or not idx:
                continue
            for col, v in self._forward(xs, [captions[i] for i in idx]).items():
                for k, i in enumerate(idx):
                    values[col][i] = v[k]
        out = batch
        for col, typ in cols.items():
            if typ == SCORE_TYPE:
                arr = pa.array([None if v is None or np.isnan(v) else float(v) for v in values[col]], typ)
            else:
                arr = pa.array([None if v is None else v.tolist() for v in values[col]], typ)
            out = replace_column(out, col, arr, typ)
        bad = [e is not None for e in errors]
        if any(bad):
            out = set_status(out, bad, Status.DECODE_FAILED, [e or "" for e in errors], rule="clip_score:decode")
        for p in model_plans(c):
            scores = values[p.column]
            ok = [st == "ok" for st in out.column("status").to_pylist()]
            # a row the model scored NaN (stored as null) is never ok-and-unscored
            nan = [o and (not b) and (s is None or bool(np.isnan(s))) for o, b, s in zip(ok, bad, scores)]
            if any(nan):
                why = f"clip:nan {p.column} is NaN (the model gave no score)"
                out = set_status(out, nan, Status.FILTERED_CLIP, why, rule=f"{p.column}:nan")
            if p.min_score is None:
                continue
            low = [(not b) and s is not None and float(s) < p.min_score for b, s in zip(bad, scores)]
            if any(low):
                ok = [st == "ok" for st in out.column("status").to_pylist()]
                low = [
                    lo and o for lo, o in zip(low, ok)
                ]  # a row rejected by an earlier model keeps its reason
                reasons = [
                    ""
                    if s is None
                    else f"clip:min_score {p.column} {float(s):.4f} < min_score {p.min_score:.4f}"
                    for s in scores
                ]
                out = set_status(out, low, Status.FILTERED_CLIP, reasons, rule=f"{p.column}:min_score")
        return out


__all__ = ["ClipScore", "ClipScoreConfig", "DEFAULT_COLUMN"]
