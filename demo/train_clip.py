"""Train the toy CLIP of the demo, save it for open_clip's ``local-dir:`` loader, and pick its threshold.

    python -m demo.train_clip                  # ~2-3 minutes on 2 CPU cores; overwrites demo/assets/toy_clip/
    python -m demo.train_clip --preset dedup   # ~15 minutes; overwrites demo/assets/toy_clip_dedup/ (dedup.yaml's)

1. Generate a mismatch-free training world (seed 1234, uniform concepts) and feed every image the way
   the demo pipeline will: img2dataset's ``Resizer`` to 64 px in ``border`` mode (the whole image is
   kept, padded with white to a square), JPEG re-encode, then open_clip's own preprocess transform.
2. Train a tiny open_clip ``CLIP`` (3-layer ViT, 64 px, narrow text tower on open_clip's default BPE
   vocab) with open_clip's ``ClipLoss`` (in-batch contrastive), deterministic, on CPU, on the same
   prepared images every epoch (``demo/assets/toy_clip``). Options for the semantic dedup tier (issue 13;
   ``--preset dedup`` sets those of ``demo/assets/toy_clip_dedup``; ``bench/toy_clip_dedup.py`` measures a
   candidate, bench/RESULTS.md has the attempts): every
   image freshly augmented each epoch *before* the pipeline's resizer (``--augment``: a crop of 0-6% per
   side, a rescale, a colour shift of up to 10 levels per channel, a JPEG re-encode at quality 30-95);
   batches of one colour on one background with different shapes (``--hard-batches``); an image-image
   concept term (``--concept-weight``); another image tower (``--vision-cfg``, e.g. a small ResNet);
   blurred and noisy images in the training world (``--degrade-rate``).
3. Save ``open_clip_config.json`` + fp16 ``open_clip_model.safetensors``, so that
   ``open_clip.create_model_and_transforms("local-dir:demo/assets/toy_clip")``,
   ``open_clip.get_tokenizer("local-dir:demo/assets/toy_clip")`` and
   ``python -m open_clip_train.main --model local-dir:demo/assets/toy_clip`` load it.
4. Reload it through ``local-dir:``, score the demo world (seed 0, n=400, 15% mismatched) with raw
   cosine similarity, and write the ``min_score`` that separates matched from mismatched pairs to
   ``demo_threshold.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402
from img2dataset.resizer import Resizer  # noqa: E402
from open_clip.loss import ClipLoss  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from demo.world import generate  # noqa: E402

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "toy_clip"
IMAGE_SIZE = 64
RESIZE_MODE = "border"  # the demo pipeline's download stage must resize the same way
WEIGHTS_NAME = "open_clip_model.safetensors"
THRESHOLD_NAME = "demo_threshold.json"
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 3, "width": 96, "head_width": 32, "mlp_ratio": 2.0,
                   "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2,
                 "mlp_ratio": 2.0},
}  # fmt: skip
PREPROCESS_CFG = {
    "size": IMAGE_SIZE,
    "mode": "RGB",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}
DEDUP_DIR = ASSET_DIR.parent / "toy_clip_dedup"
TRAIN_SEED = 1234
# ``--preset dedup``: the toy CLIP of workflows/dedup.yaml (the semantic tier and decontamination embed with
# it). A small ModifiedResNet image tower (convolutions: a crop of a few pixels moves little), every image
# augmented as the web copies it, batches of one colour and background, the image-image concept term, and
# blurred and noisy images in the training world (so that two noisy images of different concepts do not
# embed together). bench/RESULTS.md: the attempts that led here.
PRESETS = {
    "dedup": {
        "out": DEDUP_DIR, "vision_cfg": {"image_size": IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 16},
        "augment": True, "hard_batches": True, "concept_weight": 0.5, "crop_p": 1.0, "epochs": 12, "threads": 1,
        "degrade_rate": 0.1,
    },
}  # fmt: skip
CONCEPT_SCALE = 10.0  # inverse temperature of the image-image (concept) term
DEMO_WORLD = {"n": 400, "seed": 0, "mismatch_rate": 0.15, "n_broken": 8}


def pipeline_resizer() -> Resizer:
    """The resizer the demo pipeline downloads with (img2dataset's, ``border`` mode, JPEG q95)."""
    return Resizer(image_size=IMAGE_SIZE, resize_mode=RESIZE_MODE, resize_only_if_bigger=False)


def as_pipeline_image(data: bytes, resizer: Resizer) -> Image.Image:
    """Resize + re-encode ``data`` like the download stage, then decode it like the CLIP stage."""
    out, *_, err = resizer(io.BytesIO(data))
    if err is not None:
        raise ValueError(err)
    return Image.open(io.BytesIO(out))


def augment(data: bytes, rng: random.Random, p: float = 0.8, crop_p: float = 0.5) -> bytes:
    """A near-copy of the encoded image ``data`` as the web makes them (``demo/copies.py`` injects such copies):
    with probability ``p``: each side cropped by 0-6% (with probability ``crop_p``), rescaled by 0.5-1.6 (half the time),
    every channel shifted by up to 10 levels (half the time), then re-encoded as JPEG at quality 30-95.
    Otherwise ``data`` unchanged. The result still goes through the pipeline's resizer."""
    if rng.random() >= p:
        return data
    with Image.open(io.BytesIO(data)) as im:
        img = im.convert("RGB")
    w, h = img.size
    if rng.random() < crop_p:
        left, top, right, bottom = (rng.uniform(0, 0.06) for _ in range(4))
        img = img.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))
    if rng.random() < 0.5:
        f = rng.uniform(0.5, 1.6)
        img = img.resize(
            (max(16, round(img.width * f)), max(16, round(img.height * f))), Image.Resampling.BICUBIC
        )
    if rng.random() < 0.5:
        shift = np.array([rng.randint(-10, 10) for _ in range(3)], np.int16)
        img = Image.fromarray(np.clip(np.asarray(img, np.int16) + shift, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(30, 95))
    return buf.getvalue()


def hard_batches(pairs, batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches (lists of indices into ``pairs``) made of groups: each group is up to 8 images of one
    colour on one background, each with a different shape; a batch holds ``batch_size // 8`` groups drawn at
    random, so its in-batch negatives include the other shapes of the same colour and background."""
    by_group: dict[tuple[str, str], dict[str, list[int]]] = {}
    for i, p in enumerate(pairs):
        by_group.setdefault((p.true_colour, p.background), {}).setdefault(p.true_shape, []).append(i)
    chunks = []
    for group in sorted(by_group):
        lists = [by_group[group][s] for s in sorted(by_group[group])]
        for lst in lists:
            rng.shuffle(lst)
        while any(lists):
            chunks.append([lst.pop() for lst in lists if lst])
    rng.shuffle(chunks)
    per = max(1, batch_size // 8)
    return [sum(chunks[i : i + per], []) for i in range(0, len(chunks), per)]


def set_determinism(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def load(model_dir: Path = ASSET_DIR):
    """(model, preprocess, tokenizer) through open_clip's own ``local-dir:`` path, in eval mode."""
    name = f"local-dir:{model_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


def encode_images(pairs, preprocess, resizer: Resizer) -> torch.Tensor:
    return torch.stack([preprocess(as_pipeline_image(p.data, resizer)) for p in pairs])


@torch.no_grad()
def cosine_scores(
    model, tokenizer, images: torch.Tensor, captions: list[str], batch: int = 256
) -> np.ndarray:
    """Raw cosine similarity of each (image, caption) pair, as the clip_score stage computes it."""
    out = []
    for i in range(0, len(captions), batch):
        im = model.encode_image(images[i : i + batch], normalize=True)
        tx = model.encode_text(tokenizer(captions[i : i + batch]), normalize=True)
        out.append((im * tx).sum(-1))
    return torch.cat(out).float().numpy()


def choose_threshold(matched: np.ndarray, mismatched: np.ndarray) -> tuple[float, float, float]:
    """The ``min_score`` maximising min(matched kept, mismatched removed), then the margin to the nearest
    score; returns (threshold, matched_kept, mismatched_removed). Kept means score >= threshold."""
    allv = np.unique(np.concatenate([matched, mismatched]))
    cands = np.concatenate([[allv[0] - 1e-3], (allv[1:] + allv[:-1]) / 2, [allv[-1] + 1e-3]])
    best = None
    for t in cands:
        t = round(float(t), 4)
        kept, removed = float(np.mean(matched >= t)), float(np.mean(mismatched < t))
        margin = float(np.min(np.abs(allv - t)))
        key = (min(kept, removed), kept + removed, margin)
        if best is None or key > best[0]:
            best = (key, t, kept, removed)
    return best[1], best[2], best[3]


def train(
    out_dir: Path,
    n_train: int,
    epochs: int,
    batch_size: int,
    lr: float,
    threads: int,
    augmented: bool = False,
    hard: bool = False,
    concept_weight: float = 0.0,
    crop_p: float = 0.5,
    degrade_rate: float = 0.0,
    vision_cfg: dict | None = None,
) -> float:
    """Train and save into ``out_dir`` (config + fp16 safetensors). Returns the final epoch's mean loss.

    The defaults train ``demo/assets/toy_clip``. For the semantic dedup tier (issue 13; ``--preset dedup`` sets
    them and trains ``demo/assets/toy_clip_dedup``): ``augmented`` augments every image afresh each epoch
    (``augment``), ``hard`` batches by ``hard_batches``, ``concept_weight`` adds a supervised-contrastive term
    on two augmented views per image whose positives are the images of the same concept (colour, shape,
    background), ``degrade_rate`` puts blurred and noisy images in the training world, ``vision_cfg`` replaces
    the ViT image tower (open_clip ``vision_cfg``)."""
    set_determinism(TRAIN_SEED, threads)
    out_dir.mkdir(parents=True)
    model_cfg = MODEL_CFG if vision_cfg is None else {**MODEL_CFG, "vision_cfg": vision_cfg}
    config = {"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS_CFG}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # No weights in the folder yet: open_clip builds the model from the config, randomly initialised.
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out_dir}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters")

    t0 = time.perf_counter()
    pairs = list(
        generate(n_train, seed=TRAIN_SEED, mismatch_rate=0.0, n_broken=0, zipf_s=0.0, degrade_rate=degrade_rate)
    )
    texts = tokenizer([p.caption for p in pairs])
    names = sorted({(p.true_colour, p.true_shape, p.background) for p in pairs})
    concept = torch.tensor([names.index((p.true_colour, p.true_shape, p.background)) for p in pairs])
    resizer = pipeline_resizer()
    gen = torch.Generator().manual_seed(TRAIN_SEED)
    steps = n_train // batch_size
    plan = [
        hard_batches(pairs, batch_size, random.Random(f"{TRAIN_SEED}:batches:{e}"))
        if hard
        else torch.randperm(n_train, generator=gen)[: steps * batch_size].view(steps, batch_size).tolist()
        for e in range(epochs)
    ]
    n_views = 2 if concept_weight else 1
    if not augmented:
        fixed = [encode_images(pairs, preprocess, resizer)] * n_views
    print(f"training world: {n_train} pairs prepared in {time.perf_counter() - t0:.1f}s")

    loss_fn = ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)  # fmt: skip
    total = sum(len(b) for b in plan)
    warmup = max(1, len(plan[0]) // 2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        ),
    )
    t0 = time.perf_counter()
    for epoch in range(epochs):
        # augmented: every image afresh (its own seeded stream), then through the pipeline's resizer
        views = fixed if not augmented else [
            torch.stack([
                preprocess(as_pipeline_image(augment(p.data, random.Random(f"{TRAIN_SEED}:{epoch}:{i}:{v}"), crop_p=crop_p), resizer))
                for i, p in enumerate(pairs)
            ])
            for v in range(n_views)
        ]  # fmt: skip
        model.train()
        losses = []
        for batch in plan[epoch]:
            idx = torch.tensor(batch)
            img_f, txt_f, scale = model(views[0][idx], texts[idx])
            loss = loss_fn(img_f, txt_f, scale)
            if concept_weight:  # two augmented views per image; positives: the images of the same concept
                z = torch.cat([img_f, model.encode_image(views[1][idx], normalize=True)])
                lab = torch.cat([concept[idx], concept[idx]])
                logits = CONCEPT_SCALE * z @ z.T
                self_mask = torch.eye(len(z), dtype=torch.bool)
                logits = logits.masked_fill(self_mask, -1e9)
                pos = (lab[:, None] == lab[None, :]) & ~self_mask
                logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
                loss = loss + concept_weight * -((logp * pos).sum(1) / pos.sum(1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
        print(
            f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f} ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    print(f"training: {time.perf_counter() - t0:.1f}s, final loss {np.mean(losses):.4f}")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / WEIGHTS_NAME).chmod(0o644)  # safetensors creates it owner-only; it is a committed asset
    return float(np.mean(losses))


def evaluate(model_dir: Path) -> dict:
    """Score the demo world with the saved model and write ``demo_threshold.json``."""
    model, preprocess, tokenizer = load(model_dir)
    pairs = [p for p in generate(**DEMO_WORLD) if p.broken is None]
    images = encode_images(pairs, preprocess, pipeline_resizer())
    scores = cosine_scores(model, tokenizer, images, [p.caption for p in pairs])
    mis = np.array([p.is_mismatched for p in pairs])
    matched, mismatched = scores[~mis], scores[mis]
    for label, s in (("matched", matched), ("mismatched", mismatched)):
        q = np.quantile(s, [0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1])
        print(
            f"{label:>10} (n={len(s)}): "
            + " ".join(f"{v:+.3f}" for v in q)
            + "  [min 1% 5% 25% 50% 75% 95% 99% max]"
        )
    t, kept, removed = choose_threshold(matched, mismatched)
    result = {
        "min_score": t,
        "matched_kept": round(kept, 4),
        "mismatched_removed": round(removed, 4),
        "n_matched": int(len(matched)),
        "n_mismatched": int(len(mismatched)),
        "max_mismatched_score": round(float(mismatched.max()), 4),
        "min_matched_score": round(float(matched.min()), 4),
        "world": DEMO_WORLD,
        "resize_mode": RESIZE_MODE,
        "image_size": IMAGE_SIZE,
    }
    (model_dir / THRESHOLD_NAME).write_text(json.dumps(result, indent=2) + "\n")
    print(f"min_score {t}: matched kept {kept:.2%}, mismatched removed {removed:.2%}")
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m demo.train_clip", description="Train the demo's toy CLIP.")
    ap.add_argument("--out", type=Path, default=ASSET_DIR)
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--augment", action="store_true", help="experimental: augment every image each epoch")
    ap.add_argument(
        "--hard-batches", action="store_true", help="experimental: batches of one colour+background"
    )
    ap.add_argument(
        "--concept-weight", type=float, default=0.0, help="experimental: image-image concept term"
    )
    ap.add_argument(
        "--crop-p", type=float, default=0.5, help="experimental: share of augmented images cropped"
    )
    ap.add_argument(
        "--degrade-rate", type=float, default=0.0,
        help="experimental: share of blurred or noisy images in the training world (with their true captions)",
    )  # fmt: skip
    ap.add_argument(
        "--vision-cfg",
        type=json.loads,
        default=None,
        help='experimental: the image tower\'s open_clip vision_cfg as JSON, replacing the ViT, e.g. '
        '\'{"image_size": 64, "layers": [1, 1, 1, 1], "width": 16}\' (a ModifiedResNet)',
    )
    ap.add_argument("--eval-only", action="store_true", help="only recompute demo_threshold.json")
    ap.add_argument(
        "--preset", choices=sorted(PRESETS), default=None,
        help="dedup: the toy CLIP of workflows/dedup.yaml (demo/assets/toy_clip_dedup; ~15 minutes on 2 cores)",
    )  # fmt: skip
    preset = ap.parse_known_args(argv)[0].preset
    if preset:
        ap.set_defaults(**PRESETS[preset])  # options given on the command line still win
    a = ap.parse_args(argv)
    out = a.out.resolve()
    if not a.eval_only:
        staging = out.with_name(out.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        t0 = time.perf_counter()
        train(
            staging,
            a.n_train,
            a.epochs,
            a.batch_size,
            a.lr,
            a.threads,
            a.augment,
            a.hard_batches,
            a.concept_weight,
            a.crop_p,
            a.degrade_rate,
            a.vision_cfg,
        )
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        print(f"saved to {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.2f} MB) "
              f"in {time.perf_counter() - t0:.0f}s")  # fmt: skip
    evaluate(out)


if __name__ == "__main__":
    main()
