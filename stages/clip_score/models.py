"""Loading the open_clip models of a ``clip_score`` stage, and decoding images once for all of them.

``decode_image`` is the one place an image's bytes are decoded on the PIL path (the tests count its
calls); each model's own open_clip transform then runs on the decoded image. Models whose transforms
are equal (same size, crop, interpolation, mean and std) share one preprocessed tensor.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from stages.clip_score.config import ModelPlan


def decode_image(data: bytes):
    """Bytes -> an RGB PIL image, decoded (not lazy). Called once per image per batch."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")  # open_clip's transform converts to RGB first; this is the same image


@dataclass
class LoadedModel:
    plan: ModelPlan
    model: Any
    preprocess: Any  # open_clip's eval transform (PIL image -> tensor)
    tokenizer: Any
    group: str  # models with the same group share the preprocessed tensor
    tensor_prep: Any = None  # TensorTransform for decode: tensor


def load_model(plan: ModelPlan, device) -> LoadedModel:
    """One open_clip model through open_clip's own factory (its transform and tokenizer)."""
    import open_clip

    name = plan.model
    if plan.model_config_path:
        from pathlib import Path

        open_clip.add_model_config(plan.model_config_path)
        name = Path(plan.model_config_path).stem
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=plan.pretrained, device=device
    )
    model.eval()
    return LoadedModel(plan, model, preprocess, open_clip.get_tokenizer(name), transform_key(preprocess))


def transform_key(transform) -> str:
    """A key equal for transforms that give equal tensors (their repr lists every parameter)."""
    return repr(transform)


class TensorTransform:
    """open_clip's eval transform (resize shorter side, center crop, normalise) with torch ops on
    the model's device, on images decoded by ``decode_tensors``."""

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

    def __call__(self, decoded: list):
        """Decoded uint8 images (None for failed ones) -> one batch tensor of the good ones, or None."""
        import torch

        good = [self._one(d) for d in decoded if d is not None]
        return torch.cat(good) if good else None


def decode_tensors(images: list[bytes], device) -> tuple[list, list[str | None]]:
    """Decode a batch with torchvision (JPEGs batched by ``decode_jpeg`` on ``device``; other formats
    one by one on CPU). Returns (uint8 [3, H, W] tensors or None, per-image error or None)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.io import decode_image as tv_decode

    errors: list[str | None] = [None] * len(images)
    decoded: list = [None] * len(images)
    jpeg_idx = [i for i, b in enumerate(images) if b[:3] == b"\xff\xd8\xff"]
    if jpeg_idx:
        datas = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in jpeg_idx]
        try:
            outs = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
            for i, o in zip(jpeg_idx, outs):
                decoded[i] = o
        except RuntimeError:
            pass  # decode one by one below, to find the bad ones
    for i, b in enumerate(images):
        if decoded[i] is not None:
            continue
        try:
            t = tv_decode(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
            decoded[i] = t.to(device)
        except Exception as e:  # noqa: BLE001 - a bad image is a row status
            errors[i] = f"{type(e).__name__}: {e}"[:200]
    return decoded, errors
