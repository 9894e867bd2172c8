"""CLIP stage throughput vs the model-only forward, same model(s), same batch size (issues #4 and #14).

Runs the ``clip_score`` stage class directly, without Ray (JPEG bytes in, scores out: decode,
preprocess, tokenise, forward, cosine), and compares it with the model-only forward (image and
text towers) on pre-made tensors already on the device. Models are at random initialisation
(throughput does not depend on the weights), so nothing is downloaded.

    python bench/clip_gpu.py                                 # GPU if present, else CPU, both models
    python bench/clip_gpu.py --models ViT-B-32 --n 4096 --batch-size 512 --decode tensor
    python bench/clip_gpu.py --multi                          # + one stage: B/32 + L/14 + a head on L/14

``--multi`` runs one ``clip_score`` stage with every ``--models`` entry and a LAION-aesthetic-shaped head
(random weights) on the last, and compares it with the sum of the model-only forwards (each model's
image and text towers and cosine, the head included, on ready tensors): the stage decodes once and
preprocesses once per distinct preprocessing, so the ratio shows what decoding costs on top of the models.

Prints one line per (model, path) and a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
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


def model_only(stage: ClipScore, lm, x: torch.Tensor, tokens: torch.Tensor, reps: int) -> float:
    """images/s of one model's encode_image + encode_text + cosine (+ the stage's heads on that model)
    on tensors already on the device."""
    dev = stage.device
    x, tokens = x.to(dev), tokens.to(dev)
    heads = [h for _, h, target in stage.heads if target == lm.plan.column]

    def once():
        i = lm.model.encode_image(x).float()
        t = lm.model.encode_text(tokens).float()
        (i / i.norm(dim=-1, keepdim=True) * t / t.norm(dim=-1, keepdim=True)).sum(-1)
        for h in heads:
            h(i)

    with torch.inference_mode(), stage._autocast():
        for _ in range(2):  # warm-up
            once()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            once()
        _sync(dev)
    return reps * x.shape[0] / (time.perf_counter() - t0)


def stage_throughput(stage: ClipScore, table: pa.Table) -> float:
    stage(table.slice(0, stage.config.batch_size))  # warm-up (thread pool, kernels)
    _sync(stage.device)
    t0 = time.perf_counter()
    out = stage(table)
    _sync(stage.device)
    dt = time.perf_counter() - t0
    for col in stage.output_columns():
        assert out.column(col).null_count == 0, col
    return table.num_rows / dt


def measure(cfg: dict, jpegs: list[bytes], caps: list[str], table: pa.Table, bs: int, n: int):
    """(precision, [model-only img/s per model], stage img/s) of one stage configuration."""
    stage = ClipScore(cfg)
    stage.setup()
    xs, _ = stage._prepare(jpegs[:bs])
    mos = [
        model_only(stage, lm, xs[lm.group], lm.tokenizer(caps[:bs]), reps=max(2, n // bs))
        for lm in stage.loaded
    ]
    st = stage_throughput(stage, table)
    prec = "fp32" if stage.autocast_dtype is None else str(stage.autocast_dtype).split(".")[-1]
    stage.teardown()
    return prec, mos, st


def random_head(path: str, width: int) -> None:
    """A LAION-aesthetic-shaped MLP (width -> 1024 -> 128 -> 64 -> 16 -> 1) at random weights."""
    from stages.clip_score import save_head

    dims = [width, 1024, 128, 64, 16, 1]
    save_head(path, [(torch.randn(o, i) / i**0.5, torch.zeros(o)) for i, o in zip(dims, dims[1:])])


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
    ap.add_argument("--multi", action="store_true",
                    help="also one stage with all --models and a head on the last one, vs the sum of model-only forwards")  # fmt: skip
    ap.add_argument("--only-multi", action="store_true", help="skip the one-model runs")
    ap.add_argument(
        "--n", type=int, default=None, help="images per stage run (default: 8 batches on GPU, 2 on CPU)"
    )
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 on GPU, 16 on CPU")
    ap.add_argument("--decode", choices=["pil", "tensor"], default="pil")
    ap.add_argument("--decode-threads", type=int, default=max(2, (os.cpu_count() or 2)))
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    bs = args.batch_size or (256 if gpu else 16)
    n = args.n or bs * (8 if gpu else 2)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    jpegs = make_jpegs(n, rng)
    caps = [f"a photo of object number {i} on a table" for i in range(n)]
    table = pa.table(
        {"key": [f"{i:08d}" for i in range(n)], "caption": caps, "image": jpegs, "status": ["ok"] * n}
    )
    dev_name = (
        torch.cuda.get_device_name(0)
        if gpu
        else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    print(f"device: {dev_name}; torch {torch.__version__}; n={n}, batch_size={bs}, decode={args.decode}")
    common = {
        "batch_size": bs,
        "decode": args.decode,
        "decode_threads": args.decode_threads,
        "precision": args.precision,
    }
    rows = []
    for name in [] if args.only_multi else args.models:
        prec, (mo,), st = measure({"model": name, **common}, jpegs, caps, table, bs, n)
        rows.append((name, prec, mo, st))
        print(
            f"{name:10s} {prec:8s} model-only {mo:9.1f} img/s | stage {st:9.1f} img/s | ratio {st / mo:.2f}",
            flush=True,
        )
        if gpu:
            torch.cuda.empty_cache()
    if args.multi or args.only_multi:
        import open_clip

        head = os.path.join(tempfile.mkdtemp(), "head.safetensors")
        random_head(head, open_clip.get_model_config(args.models[-1])["embed_dim"])
        cols = [m.lower().replace("-", "_") for m in args.models]
        cfg = {
            "models": [{"column": c, "model": m} for c, m in zip(cols, args.models)],
            "heads": [{"column": "aesthetic", "model": cols[-1], "path": head, "activation": "none"}],
            **common,
        }
        prec, mos, st = measure(cfg, jpegs, caps, table, bs, n)
        summed = 1.0 / sum(1.0 / m for m in mos)  # all models one after the other, on ready tensors
        name = " + ".join(args.models) + " + head"
        rows.append((name, prec, summed, st))
        per = ", ".join(f"{m} {v:.1f}" for m, v in zip(args.models, mos))
        print(f"{name} {prec}: model-only {per} -> sum {summed:.1f} img/s | stage {st:.1f} img/s | ratio {st / summed:.2f}",
              flush=True)  # fmt: skip
    print("\n| models | precision | model-only img/s (sum of forwards) | stage img/s | stage / model-only |")
    print("|---|---|---:|---:|---:|")
    for name, prec, mo, st in rows:
        print(f"| {name} | {prec} | {mo:.1f} | {st:.1f} | {st / mo:.2f} |")


if __name__ == "__main__":
    main()
