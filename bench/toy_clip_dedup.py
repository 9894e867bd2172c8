"""How a toy CLIP's image embeddings serve the semantic dedup tier (issue 13, acceptance 3), without HTTP.

    .venv/bin/python bench/toy_clip_dedup.py MODEL_DIR [--eps 0.004,0.01] [--n-clusters 5] [--seed 0]

The near-copies world of ``tests/conftest.py::copies_pool`` (``make_world(n=400, seed=0, n_copies=120)``), each
file through img2dataset's ``Resizer`` as the dedup workflow downloads it (64 px, ``border``, JPEG q90; the
broken files dropped), embedded by ``MODEL_DIR`` (open_clip ``local-dir:``). Prints the cosine of each kind of
copy to its original, the nearest other row of each row whose concept (colour x shape x background) no other row
has, the largest cosine between different concepts by what differs, and SemDeDup's rates (``run_local``, blocks
of 128, 4 partitions, ``hard``) for each eps: copies found (the copy or its original flagged), rows of a
distinct concept flagged, distinct renderings of a shared concept flagged. Used to compare toy CLIP trainings
(``demo/train_clip.py`` options); the tests measure the dedup workflow's model
(``demo/assets/toy_clip_dedup``) through the real download stage.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from img2dataset.resizer import Resizer  # noqa: E402
from PIL import Image  # noqa: E402

from demo.train_clip import load  # noqa: E402
from demo.world import make_world  # noqa: E402
from stages.semdedup import SemDedup  # noqa: E402
from stages.shuffle import run_local  # noqa: E402

KINDS = ("reencode", "resize", "crop", "recolour")


def pool(seed: int = 0) -> pa.Table:
    """The world's decodable rows, resized as the dedup workflow downloads them (``image``), keys ``0000``..."""
    d = make_world(Path(tempfile.mkdtemp()), n=400, seed=seed, n_copies=120)
    t = pq.read_table(d / "world.parquet")
    rz = Resizer(64, "border", False, encode_format="jpg", encode_quality=90)
    imgs, keep = [], []
    for i, p in enumerate(t.column("path").to_pylist()):
        f = d / "files" / p if (d / "files" / p).exists() else d / p
        try:
            out, *_, err = rz(io.BytesIO(f.read_bytes()))
        except Exception as e:  # noqa: BLE001 - a broken file of the world
            out, err = None, str(e)
        if err is None and out is not None:
            imgs.append(out)
            keep.append(i)
    t = t.take(pa.array(keep, pa.int64()))
    return t.append_column("image", pa.array(imgs, pa.binary())).append_column(
        "key", pa.array([f"{i:04d}" for i in keep])
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--eps", default="0.004,0.01,0.02,0.05")
    ap.add_argument("--n-clusters", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="the world's seed (the tests' copies_pool: 0)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t = pool(a.seed)
    model, pre, _ = load(a.model_dir)
    with torch.no_grad():
        x = torch.stack(
            [pre(Image.open(io.BytesIO(b)).convert("RGB")) for b in t.column("image").to_pylist()]
        )
        emb = torch.cat([model.encode_image(x[i : i + 128], normalize=True) for i in range(0, len(x), 128)])
    emb = emb.float().numpy()
    keys = t.column("key").to_pylist()
    at = {k: i for i, k in enumerate(keys)}
    kind, copy_of = t.column("copy_kind").to_pylist(), t.column("copy_of").to_pylist()
    concept = list(zip(*(t.column(c).to_pylist() for c in ("true_colour", "true_shape", "background"))))
    sim = emb @ emb.T
    np.fill_diagonal(sim, -1)
    copies = [i for i, k in enumerate(kind) if k is not None]
    for k in KINDS:
        v = [sim[i, at[f"{copy_of[i]:04d}"]] for i in copies if kind[i] == k]
        print(
            f"copy {k:9s} cosine to original: min {min(v):.4f} 5% {np.quantile(v, 0.05):.4f} median {np.median(v):.4f}"
        )
    unique = [i for i, n in enumerate(t.column("concept_rows").to_pylist()) if n == 1]
    nn = np.array([sim[i].max() for i in unique])
    print(f"distinct concept ({len(unique)} rows), nearest other row: max {nn.max():.4f} 95% "
          f"{np.quantile(nn, 0.95):.4f} median {np.median(nn):.4f}")  # fmt: skip
    col, shp, bg = (np.array([c[j] for c in concept]) for j in range(3))
    same = lambda v: v[:, None] == v[None, :]  # noqa: E731
    for label, m in (
        ("shape (same colour, background)", same(col) & same(bg) & ~same(shp)),
        ("colour (same shape, background)", same(shp) & same(bg) & ~same(col)),
        ("background (same colour, shape)", same(col) & same(shp) & ~same(bg)),
    ):
        print(f"largest cosine, different {label}: {np.where(m, sim, -1).max():.4f}")
    for s, i in sorted(((sim[i].max(), i) for i in unique), reverse=True)[:3]:
        print(f"  {s:.4f} {concept[i]} ~ {concept[int(sim[i].argmax())]}")
    table = pa.table({
        "key": keys, "status": ["ok"] * len(keys), "reason": pa.nulls(len(keys), pa.string()),
        "rule": pa.nulls(len(keys), pa.string()), "image_embedding": pa.array(emb.tolist(), pa.list_(pa.float32())),
    })  # fmt: skip
    originals = [i for i, k in enumerate(kind) if k is None]
    shared = Counter(concept[i] for i in originals)
    renderings = [i for i in originals if shared[concept[i]] > 1]
    for eps in (float(e) for e in a.eps.split(",")):
        st = SemDedup({"n_clusters": a.n_clusters, "eps": eps, "which_to_keep": "hard", "seed": 0})
        out = pa.concat_tables(run_local(st, [table.slice(s, 128) for s in range(0, len(keys), 128)], 4))
        flag = dict(zip(out.column("key").to_pylist(), (s != "ok" for s in out.column("status").to_pylist())))
        fl = [flag[k] for k in keys]
        found = {i: fl[i] or fl[at.get(f"{copy_of[i]:04d}", i)] for i in copies}
        per = " ".join(f"{k} {np.mean([found[i] for i in copies if kind[i] == k]):.1%}" for k in KINDS)
        print(f"eps {eps}: copies {np.mean(list(found.values())):.1%} ({per}); distinct concept "
              f"{sum(fl[i] for i in unique)}/{len(unique)}; renderings {np.mean([fl[i] for i in renderings]):.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
