"""Train the demo's toy quality head: P(degraded image) from the toy CLIP's image embedding.

    python -m demo.train_head            # ~1 minute on 2 CPU cores; writes demo/assets/quality_head/

1. Generate a training world (seed 4321) and a validation world (seed 4322), each with a large share of
   degraded images (blurred or noisy, ``demo.world.degrade``), and feed every image the way the demo
   pipeline will (img2dataset's resizer to 64 px ``border``, JPEG, open_clip's preprocess).
2. Embed them with the committed toy CLIP (``demo/assets/toy_clip``, raw ``encode_image``).
   The toy CLIP was trained on clean shapes, so only strong degradations show in its 64-d embedding.
3. Train a 64 -> 128 -> 1 MLP (ReLU, sigmoid output) on the L2-normalised embeddings with binary
   cross-entropy, full batch, seeded and deterministic, on CPU.
4. Save it in the ``clip_score`` heads format (``quality.safetensors``: ``layers.0.weight`` ...), pick the
   threshold on the validation world (the lowest that keeps 98% of its clean images), and report it with the demo world's numbers in ``quality.json``.

In a workflow: ``heads: [{column: quality, path: demo/assets/quality_head/quality.safetensors,
activation: relu, sigmoid: true}]`` on the toy CLIP; a row whose ``quality`` is at or above the
threshold is a degraded image.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from demo.train_clip import ASSET_DIR as CLIP_DIR
from demo.train_clip import DEMO_WORLD, encode_images, load, pipeline_resizer, set_determinism
from demo.world import DEGRADE_RATE, generate
from stages.clip_score.heads import Head, save_head

HEAD_DIR = Path(__file__).resolve().parent / "assets" / "quality_head"
HEAD_NAME = "quality.safetensors"
INFO_NAME = "quality.json"
TRAIN_WORLD = {
    "n": 4000,
    "seed": 4321,
    "mismatch_rate": 0.15,
    "n_broken": 0,
    "zipf_s": 1.1,
    "degrade_rate": 0.4,
}
VALID_WORLD = {**TRAIN_WORLD, "n": 800, "seed": 4322}
HIDDEN = 128
SEED = 4321
CLEAN_KEPT = 0.98  # share of clean validation images the threshold keeps


@torch.no_grad()
def embed(world: dict):
    """(raw toy-CLIP image embeddings [n, 64], is_degraded [n] bool) of a world's good pairs."""
    model, preprocess, _ = load(CLIP_DIR)
    pairs = [p for p in generate(**world) if p.broken is None]
    x = encode_images(pairs, preprocess, pipeline_resizer())
    emb = torch.cat([model.encode_image(x[i : i + 256]) for i in range(0, len(x), 256)])
    return emb.float(), torch.tensor([p.is_degraded for p in pairs])


def train(emb: torch.Tensor, y: torch.Tensor, steps: int = 3000, lr: float = 3e-3):
    """The MLP's layers [(weight, bias), ...], trained on normalised embeddings."""
    torch.manual_seed(SEED)
    l1, l2 = torch.nn.Linear(emb.shape[1], HIDDEN), torch.nn.Linear(HIDDEN, 1)
    params = [*l1.parameters(), *l2.parameters()]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=1e-4)
    x = F.normalize(emb, dim=-1)
    target = y.float()
    pos_weight = torch.tensor((len(y) - y.sum().item()) / max(1, y.sum().item()))
    for step in range(steps):
        logit = l2(torch.relu(l1(x)))[:, 0]
        loss = F.binary_cross_entropy_with_logits(logit, target, pos_weight=pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    return [(l1.weight, l1.bias), (l2.weight, l2.bias)]


def choose_threshold(p: np.ndarray, y: np.ndarray, clean_kept: float = CLEAN_KEPT) -> float:
    """The lowest threshold (degraded when p >= t) that keeps at least ``clean_kept`` of the clean images:
    the quality rule must not cost the good pairs more than the filter's budget; the CLIP threshold
    catches mismatched pairs on its own."""
    clean = np.sort(p[~y])
    k = int(np.ceil(clean_kept * len(clean))) - 1  # this many clean images stay below t
    above = clean[k + 1] if k + 1 < len(clean) else clean[k] + 1e-3
    return round(float((clean[k] + above) / 2), 4)


def rates(head: Head, emb: torch.Tensor, y: torch.Tensor, t: float) -> dict:
    p = head(emb).numpy()
    yy = y.numpy()
    return {
        "degraded_caught": round(float(np.mean(p[yy] >= t)), 4),
        "clean_kept": round(float(np.mean(p[~yy] < t)), 4),
        "n_degraded": int(yy.sum()),
        "n_clean": int((~yy).sum()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m demo.train_head", description="Train the demo's toy quality head."
    )
    ap.add_argument("--out", type=Path, default=HEAD_DIR)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    set_determinism(SEED, a.threads)
    t0 = time.perf_counter()
    emb, y = embed(TRAIN_WORLD)
    v_emb, v_y = embed(VALID_WORLD)
    print(f"embedded {len(y)} training + {len(v_y)} validation images in {time.perf_counter() - t0:.0f}s")
    layers = train(emb, y)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / HEAD_NAME
    save_head(path, layers)
    path.chmod(0o644)
    head = Head.load(str(path), activation="relu", sigmoid=True, normalize=True)
    t = choose_threshold(head(v_emb).numpy(), v_y.numpy())
    demo = {**DEMO_WORLD, "degrade_rate": DEGRADE_RATE}
    d_emb, d_y = embed(demo)
    info = {
        "threshold": t,
        "rule": "degraded when quality >= threshold (clip_score head: activation relu, sigmoid true, normalize true)",
        "train": {"world": TRAIN_WORLD, **rates(head, emb, y, t)},
        "validation": {"world": VALID_WORLD, **rates(head, v_emb, v_y, t)},
        "demo": {"world": demo, **rates(head, d_emb, d_y, t)},
        "layers": [list(w.shape) for w, _ in layers],
    }
    (a.out / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: info[k] for k in ("threshold", "validation", "demo")}, indent=1))
    print(f"saved {path} ({path.stat().st_size} bytes) in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
