"""CLIP scoring with open_clip: adds ``clip_score`` (raw cosine of the image and caption embeddings).

Models, all through open_clip's own factory (its transform and tokenizer, truncation to the context length):

* ``model: ViT-L-14`` + ``pretrained: datacomp_xl_s13b_b90k`` — a named architecture and a pretrained
  tag (or ``pretrained: /path/to/checkpoint.pt``);
* ``model: hf-hub:ORG/NAME`` — a Hugging Face Hub model;
* ``model: local-dir:PATH`` — a folder with ``open_clip_config.json`` and weights (the demo's toy CLIP);
* ``model_config_path: PATH.json`` + ``pretrained: CHECKPOINT`` — a custom architecture file.

Compute: the device is chosen automatically (``cuda`` if available). On GPU the forward runs under
bf16 autocast (``precision``), and images are decoded and preprocessed on a CPU thread pool one
forward batch (``forward_batch_size``) ahead of the model, so the GPU is not starved; ``decode: tensor`` instead decodes
JPEGs with ``torchvision.io.decode_jpeg`` on the model's device and resizes there. On CPU it runs
in fp32 with open_clip's own PIL transform, which makes scores equal to a plain open_clip forward.

Filtering: ``min_score`` rejects rows below an absolute threshold (status ``filtered_clip``).
DataComp's pool-level ``top_fraction`` needs every score first: use the ``clip_filter`` stage after
this one.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from schemas import Status
from stages.base import ComputeConfig, Resources, Stage, path_field, replace_column, set_status

log = logging.getLogger(__name__)


class ClipScoreConfig(ComputeConfig):
    model: str = path_field(
        description="open_clip model: an architecture name (`ViT-B-32`), `hf-hub:ORG/NAME`, or "
        "`local-dir:PATH` (a folder with `open_clip_config.json` and weights).",
        prefixed=True,
    )
    pretrained: str | None = path_field(None, description="Pretrained tag (`datacomp_xl_s13b_b90k`) or checkpoint path.")
    model_config_path: str | None = path_field(
        None, always=True, description="A custom open_clip model config (JSON); `pretrained` is then the checkpoint path."
    )
    batch_size: int = Field(
        2048, ge=1, description="Rows per `process` call; the rows are scored in forward batches of `forward_batch_size`, "
        "the next one decoded while the model runs the current one."
    )
    forward_batch_size: int = Field(256, ge=1, description="Images per model forward pass.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the worker has a GPU.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU."
    )
    decode: Literal["pil", "tensor"] = Field(
        "pil", description="pil: the model's own transform on CPU threads; tensor: torchvision JPEG decode on the model's device."
    )
    decode_threads: int = Field(4, description="CPU threads decoding/preprocessing ahead of the model.")
    min_score: float | None = Field(None, description="Reject rows whose score is below this (`filtered_clip`).")
    embeddings: bool = Field(False, description="Also output `image_embedding` / `text_embedding` (float16).")

    @model_validator(mode="after")
    def _check(self):
        if self.model_config_path and not self.pretrained:
            raise ValueError("model_config_path needs 'pretrained' (the checkpoint path)")
        return self


class ClipScore(Stage):
    name = "clip_score"
    Config = ClipScoreConfig
    requires = ("image", "caption")
    produces = ("clip_score",)

    def resources(self) -> Resources:
        c = self.config
        return Resources(
            num_cpus=c.num_cpus,
            num_gpus=c.num_gpus,
            concurrency=c.concurrency,
            batch_size=c.batch_size,
            actor=True,
        )

    def extra_produces(self):
        if self.config.embeddings:
            from schemas.row import STAGE_FIELDS

            return {
                "image_embedding": STAGE_FIELDS["image_embedding"],
                "text_embedding": STAGE_FIELDS["text_embedding"],
            }
        return {}

    def model_info(self) -> dict:
        c = self.config
        return {"model": c.model, "pretrained": c.pretrained, "model_config_path": c.model_config_path}

    # ---- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        import open_clip
        import torch

        c = self.config
        dev = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        model_name = c.model
        if c.model_config_path:
            from pathlib import Path

            open_clip.add_model_config(c.model_config_path)
            model_name = Path(c.model_config_path).stem
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=c.pretrained, device=self.device
        )
        model.eval()
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        prec = c.precision
        if prec == "auto":
            prec = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        self._pool = ThreadPoolExecutor(max(1, c.decode_threads))
        if c.decode == "tensor":
            self._tensor_prep = _TensorPreprocess.from_transform(preprocess, self.device)
        log.info("clip_score: %s (%s) on %s, precision %s", c.model, c.pretrained, self.device, prec)

    # ---- per batch ----------------------------------------------------------------------------
    def _decode_pil(self, data: bytes):
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return self.preprocess(im)

    def _prepare(self, images: list[bytes]):
        """Decode + preprocess one forward batch. Returns (tensor or None, per-image error or None)."""
        import torch

        if self.config.decode == "tensor":
            return self._tensor_prep(images)
        futs = [self._pool.submit(self._decode_pil, b) for b in images]
        tensors, errors = [], []
        for f in futs:
            try:
                tensors.append(f.result())
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - a bad image is a row status, not a crash
                tensors.append(None)
                errors.append(f"{type(e).__name__}: {e}"[:200])
        good = [t for t in tensors if t is not None]
        x = torch.stack(good) if good else None
        return x, errors

    def _forward(self, x, captions: list[str]):
        import torch
        import torch.nn.functional as F

        tokens = self.tokenizer(captions).to(self.device, non_blocking=True)
        x = x.to(self.device, non_blocking=True)
        ctx = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else _nullcontext()
        )
        with torch.inference_mode(), ctx:
            img = F.normalize(self.model.encode_image(x).float(), dim=-1)
            txt = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            score = (img * txt).sum(-1)
        return score.cpu().numpy().astype(np.float32), img, txt

    def process(self, batch: pa.Table) -> pa.Table:
        c = self.config
        n = batch.num_rows
        images = batch.column("image").to_pylist()
        captions = [s or "" for s in batch.column("caption").to_pylist()]
        scores = np.full(n, np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * n
        img_emb: list = [None] * n
        txt_emb: list = [None] * n
        fb = c.forward_batch_size
        starts = list(range(0, n, fb))
        # Prepare batch i+1 on the thread pool while the model runs batch i.
        pending = self._pool.submit(self._prepare, images[0:fb]) if starts else None
        for j, s in enumerate(starts):
            x, errs = pending.result()
            if j + 1 < len(starts):
                nxt = starts[j + 1]
                pending = self._pool.submit(self._prepare, images[nxt : nxt + fb])
            idx = [s + i for i, e in enumerate(errs) if e is None]
            for i, e in enumerate(errs):
                if e is not None:
                    errors[s + i] = e
            if x is None or not idx:
                continue
            sc, ie, te = self._forward(x, [captions[i] for i in idx])
            scores[idx] = sc
            if c.embeddings:
                ie16 = ie.half().cpu().numpy()
                te16 = te.half().cpu().numpy()
                for k, i in enumerate(idx):
                    img_emb[i] = ie16[k]
                    txt_emb[i] = te16[k]
        out = replace_column(
            batch, "clip_score", pa.array(np.where(np.isnan(scores), None, scores), pa.float32())
        )
        if c.embeddings:
            out = replace_column(out, "image_embedding", [None if e is None else e.tolist() for e in img_emb])
            out = replace_column(out, "text_embedding", [None if e is None else e.tolist() for e in txt_emb])
        bad = [e is not None for e in errors]
        if any(bad):
            why = [e or "" for e in errors]
            out = set_status(out, bad, Status.DECODE_FAILED, why, rule="clip_score:decode")
        if c.min_score is not None:
            low = [(not b) and float(v) < c.min_score for b, v in zip(bad, scores)]
            if any(low):
                reasons = [f"clip:min_score clip_score {v:.4f} < min_score {c.min_score:.4f}" for v in scores]
                out = set_status(out, low, Status.FILTERED_CLIP, reasons, rule="clip_score:min_score")
        return out


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


class _TensorPreprocess:
    """open_clip's eval transform (resize shorter side, center crop, normalise) with torch ops on
    the model's device, fed by ``torchvision.io.decode_jpeg`` (batched, on GPU when the model is).
    Non-JPEG images fall back to PIL decoding."""

    def __init__(self, size: int, mean, std, interpolation: str, device):
        import torch

        self.size = size
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.interpolation = interpolation

    @classmethod
    def from_transform(cls, transform, device):
        from torchvision import transforms as T

        size, mean, std, interp = None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"
        for t in getattr(transform, "transforms", []):
            if isinstance(t, T.Resize):
                size = t.size if isinstance(t.size, int) else t.size[0]
                interp = t.interpolation.value
            elif isinstance(t, T.CenterCrop):
                size = t.size[0] if isinstance(t.size, list | tuple) else t.size
            elif isinstance(t, T.Normalize):
                mean, std = t.mean, t.std
        if size is None:
            raise ValueError("decode: tensor needs a transform with Resize/CenterCrop")
        return cls(size, mean, std, interp, device)

    def _one(self, img):
        import torch.nn.functional as F

        # img: uint8 [3, H, W] on device
        x = img.unsqueeze(0).float()
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode=self.interpolation, align_corners=False, antialias=True)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size]
        return (x.clamp(0, 255) / 255.0 - self.mean) / self.std

    def __call__(self, images: list[bytes]):
        import torch
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        errors: list[str | None] = [None] * len(images)
        decoded: list = [None] * len(images)
        jpeg_idx = [i for i, b in enumerate(images) if b[:3] == b"\xff\xd8\xff"]
        if jpeg_idx:
            datas = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in jpeg_idx]
            try:
                outs = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
                for i, o in zip(jpeg_idx, outs):
                    decoded[i] = o
            except RuntimeError:
                jpeg_idx = []  # decode one by one below, to find the bad ones
        for i, b in enumerate(images):
            if decoded[i] is not None:
                continue
            try:
                t = decode_image(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
                decoded[i] = t.to(self.device)
            except Exception as e:  # noqa: BLE001
                errors[i] = f"{type(e).__name__}: {e}"[:200]
        good = [self._one(d) for d in decoded if d is not None]
        return (torch.cat(good) if good else None), errors
