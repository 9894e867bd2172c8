"""CLIP stage throughput vs the model-only forward, same model, same batch size (issue #4, goal 4).

Runs the ``clip_score`` stage class directly, without Ray (JPEG bytes in, scores out: decode,
preprocess, tokenise, forward, cosine), and compares it with the model-only forward (image and
text towers) on pre-made tensors already on the device. Models are at random initialisation
(throughput does not depend on the weights), so nothing is downloaded.

    python bench/clip_gpu.py                                 # GPU if present, else CPU, both models
    python bench/clip_gpu.py --models ViT-B-32 --n 4096 --batch-size 512 --decode tensor

Prints one line per (model, path) and a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from stages.clip_score import ClipScore  # noqa: E402


def make_jpegs(n: int, rng: np.random.Generator) -> list[bytes]:
    """Realistic-size JPEGs (256 px, smooth noise + blocks, as the download stage stores them)."""
    out = []
    base = rng.integers(0, 255, (n % 16 + 16, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        small = Image.fromarray(base[i % len(base)])
        im = small.resize((256, 256), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def model_only(stage: ClipScore, x: torch.Tensor, tokens: torch.Tensor, reps: int) -> float:
    """images/s of encode_image + encode_text + cosine on tensors already on the device."""
    dev = stage.device
    ctx = (
        torch.autocast(dev.type, dtype=stage.autocast_dtype) if stage.autocast_dtype is not None else _Null()
    )
    x, tokens = x.to(dev), tokens.to(dev)
    with torch.inference_mode(), ctx:
        for _ in range(2):  # warm-up
            stage.model.encode_image(x)
            stage.model.encode_text(tokens)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            i = stage.model.encode_image(x).float()
            t = stage.model.encode_text(tokens).float()
            (i / i.norm(dim=-1, keepdim=True) * t / t.norm(dim=-1, keepdim=True)).sum(-1)
        _sync(dev)
    return reps * x.shape[0] / (time.perf_counter() - t0)


def stage_throughput(stage: ClipScore, table: pa.Table) -> float:
    stage(table.slice(0, stage.config.batch_size))  # warm-up (thread pool, kernels)
    _sync(stage.device)
    t0 = time.perf_counter()
    out = stage(table)
    _sync(stage.device)
    dt = time.perf_counter() - t0
    assert out.column("clip_score").null_count == 0
    return table.num_rows / dt


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    ap.add_argument("--n", type=int, default=None, help="images per stage run (default: 8 batches on GPU, 2 on CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 on GPU, 16 on CPU")
    ap.add_argument("--decode", choices=["pil", "tensor"], default="pil")
    ap.add_argument("--decode-threads", type=int, default=max(2, (os.cpu_count() or 2)))
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    bs = args.batch_size or (256 if gpu else 16)
    n = args.n or bs * (8 if gpu else 2)
    rng = np.random.default_rng(0)
    jpegs = make_jpegs(n, rng)
    caps = [f"a photo of object number {i} on a table" for i in range(n)]
    table = pa.table({"key": [f"{i:08d}" for i in range(n)], "caption": caps, "image": jpegs, "status": ["ok"] * n})
    dev_name = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"device: {dev_name}; torch {torch.__version__}; n={n}, batch_size={bs}, decode={args.decode}")
    rows = []
    for name in args.models:
        stage = ClipScore(
            ClipScore.Config(
                model=name,
                pretrained=None,
                batch_size=bs,
                decode=args.decode,
                decode_threads=args.decode_threads,
                precision=args.precision,
            )
        )
        stage.setup()
        x, _ = stage._prepare(jpegs[:bs])
        tokens = stage.tokenizer(caps[:bs])
        mo = model_only(stage, x, tokens, reps=max(2, n // bs))
        st = stage_throughput(stage, table)
        prec = "fp32" if stage.autocast_dtype is None else str(stage.autocast_dtype).split(".")[-1]
        rows.append((name, prec, mo, st))
        print(f"{name:10s} {prec:8s} model-only {mo:9.1f} img/s | stage {st:9.1f} img/s | ratio {st / mo:.2f}", flush=True)
        del stage
        if gpu:
            torch.cuda.empty_cache()
    print("\n| model | precision | model-only img/s | stage img/s | stage / model-only |")
    print("|---|---|---:|---:|---:|")
    for name, prec, mo, st in rows:
        print(f"| {name} | {prec} | {mo:.1f} | {st:.1f} | {st / mo:.2f} |")


if __name__ == "__main__":
    main()
