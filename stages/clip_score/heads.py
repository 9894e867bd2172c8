"""Heads on CLIP image embeddings: a stack of linear layers read from a file of a documented format.

Format (safetensors preferred; a PyTorch state dict saved with ``torch.save`` also works):

* tensors ``layers.N.weight`` (shape ``[out, in]``, as ``torch.nn.Linear`` stores it) and ``layers.N.bias``
  (shape ``[out]``) for each layer, applied in increasing ``N``. Gaps in ``N`` are allowed, so the state
  dict of an ``nn.Sequential`` with dropouts between its linears (keys ``layers.0``, ``layers.2``, ...)
  loads as it is;
* the first layer's ``in`` is the model's embedding width, each layer's ``in`` the previous one's ``out``,
  the last ``out`` is 1 (the head writes one number per row);
* between layers: ReLU (``activation: relu``) or nothing (``activation: none``); after the last layer an
  optional sigmoid (``sigmoid: true``); the input is the L2-normalised image embedding (``normalize: true``)
  or the raw one. Dropout is the identity at inference, so it needs no tensor.

A PyTorch file may wrap the tensors in ``{"state_dict": {...}}``. It is read with ``weights_only=True``.
"""

from __future__ import annotations

import re
from pathlib import Path

_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


def load_tensors(path: str) -> dict:
    """The tensors of a head file (safetensors, or a PyTorch state dict)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"head weights {path} not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    obj = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"head weights {path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


class Head:
    """A loaded head: ``head(embeddings [n, d]) -> [n]`` (float32)."""

    def __init__(self, layers: list[tuple], activation: str, sigmoid: bool, normalize: bool):
        self.layers = layers  # [(weight [out, in], bias [out])]
        self.activation = activation
        self.sigmoid = sigmoid
        self.normalize = normalize

    @property
    def in_dim(self) -> int:
        return int(self.layers[0][0].shape[1])

    @classmethod
    def from_tensors(cls, tensors: dict, *, activation: str = "relu", sigmoid: bool = False, normalize: bool = True,
                     source: str = "head") -> Head:  # fmt: skip
        found: dict[int, dict] = {}
        other = []
        for k, v in tensors.items():
            m = _KEY.match(k)
            if m is None:
                other.append(k)
                continue
            found.setdefault(int(m.group(1)), {})[m.group(2)] = v.float()
        if other:
            raise ValueError(
                f"{source}: unexpected tensors {', '.join(sorted(other)[:5])} (expected layers.N.weight/bias)"
            )
        if not found:
            raise ValueError(f"{source}: no layers.N.weight tensors")
        layers, prev = [], None
        for n in sorted(found):
            t = found[n]
            if set(t) != {"weight", "bias"}:
                raise ValueError(f"{source}: layer {n} needs both weight and bias")
            w, b = t["weight"], t["bias"]
            if w.ndim != 2 or b.ndim != 1 or b.shape[0] != w.shape[0]:
                raise ValueError(
                    f"{source}: layer {n}: weight {tuple(w.shape)} / bias {tuple(b.shape)} are not [out, in] / [out]"
                )
            if prev is not None and w.shape[1] != prev:
                raise ValueError(
                    f"{source}: layer {n} takes {w.shape[1]} inputs, the previous layer gives {prev}"
                )
            prev = w.shape[0]
            layers.append((w, b))
        if prev != 1:
            raise ValueError(f"{source}: the last layer gives {prev} outputs, a head must give 1")
        return cls(layers, activation, sigmoid, normalize)

    @classmethod
    def load(cls, path: str, **kwargs) -> Head:
        return cls.from_tensors(load_tensors(path), source=f"head {path}", **kwargs)

    def to(self, device) -> Head:
        self.layers = [(w.to(device), b.to(device)) for w, b in self.layers]
        return self

    def __call__(self, emb):
        """``emb``: the model's raw image embeddings [n, d]; returns [n] float32 (on emb's device)."""
        import torch
        import torch.nn.functional as F

        x = emb.float()
        if self.normalize:
            x = F.normalize(x, dim=-1)
        last = len(self.layers) - 1
        for i, (w, b) in enumerate(self.layers):
            x = F.linear(x, w, b)
            if i < last and self.activation == "relu":
                x = torch.relu(x)
        if self.sigmoid:
            x = torch.sigmoid(x)
        return x[:, 0].float()  # float32 also under bf16/fp16 autocast


def save_head(path: str | Path, layers: list[tuple]) -> None:
    """Write ``[(weight, bias), ...]`` in the head format (safetensors)."""
    from safetensors.torch import save_file

    tensors = {}
    for i, (w, b) in enumerate(layers):
        tensors[f"layers.{i}.weight"] = w.detach().float().contiguous().cpu()
        tensors[f"layers.{i}.bias"] = b.detach().float().contiguous().cpu()
    save_file(tensors, str(path))
