"""Held-out evaluation sets of the shapes world, for ``clipcurate eval`` and ``bench/curation_value.py``.

    make_evalset(out_dir, per_class=5, n_captions=200, seed=0) -> out_dir
        classes.parquet   image (bytes), label ("red circle"), key: ``per_class`` images of every
                          colour x shape class (80 classes), all with their true concept
        captions.parquet  image, caption, key: ``n_captions`` held-out pairs (uniform concepts, no
                          mismatched caption), for image-text retrieval

The sets are never part of a curated pool: every item comes from its own random stream seeded
``"eval:{seed}:{i}"`` / ``"evalcap:{seed}:{i}"`` (the world's items use ``"{seed}:{i}"``), keys start
with ``eval-`` (the pool's are digits), and ``tests/demo/test_evalset.py`` checks that no image hash
is shared with the demo pool. Images are stored as the demo pipeline stores them (img2dataset's
``Resizer``: 64 px, ``border``, JPEG q90, as in ``workflows/demo.yaml``), so the model sees the same
kind of image at training and evaluation time.

CLI: ``python -m demo.evalset OUT_DIR [--per-class 5] [--n-captions 200] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from demo.world import BACKGROUND_WEIGHTS, BACKGROUNDS, COLOURS, SHAPES, caption_for, render

IMAGE_SIZE = 64  # workflows/demo.yaml's download settings
RESIZE_MODE = "border"
ENCODE_QUALITY = 90
CLASSES_NAME = "classes.parquet"
CAPTIONS_NAME = "captions.parquet"
# Zero-shot prompts of the demo eval (workflows/eval_demo.yaml): caption-like, as the world's captions are.
TEMPLATES = ("a {}", "a drawing of a {}", "an image of a {}", "there is a {} in the picture")


def class_names() -> list[str]:
    """The 80 colour x shape class names, e.g. ``"red circle"``."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def _resizer():
    import os

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.resizer import Resizer

    return Resizer(image_size=IMAGE_SIZE, resize_mode=RESIZE_MODE, resize_only_if_bigger=False,
                   encode_quality=ENCODE_QUALITY)  # fmt: skip


def _item(colour: str, shape: str, r: random.Random, resizer) -> tuple[bytes, str]:
    """One held-out image of ``colour shape`` (stored like the pipeline's) and its true caption."""
    bg = r.choices(list(BACKGROUNDS), weights=BACKGROUND_WEIGHTS)[0]
    while bg == colour:
        bg = r.choices(list(BACKGROUNDS), weights=BACKGROUND_WEIGHTS)[0]
    img, size = render(colour, shape, bg, r)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out, *_, err = resizer(io.BytesIO(buf.getvalue()))
    if err is not None:
        raise RuntimeError(f"resizing a held-out image failed: {err}")
    return out, caption_for(colour, shape, bg, size, r)


def make_evalset(out_dir, per_class: int = 5, n_captions: int = 200, seed: int = 0) -> Path:
    """Write ``classes.parquet`` and ``captions.parquet`` into ``out_dir``; return ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resizer = _resizer()
    rows: dict[str, list] = {"key": [], "image": [], "label": []}
    i = 0
    for name in class_names():
        colour, shape = name.split(" ")
        for _ in range(per_class):
            data, _ = _item(colour, shape, random.Random(f"eval:{seed}:{i}"), resizer)
            rows["key"].append(f"eval-{i:06d}")
            rows["image"].append(data)
            rows["label"].append(name)
            i += 1
    pq.write_table(pa.table(rows), out / CLASSES_NAME)
    caps: dict[str, list] = {"key": [], "image": [], "caption": []}
    for j in range(n_captions):
        r = random.Random(f"evalcap:{seed}:{j}")
        data, caption = _item(r.choice(list(COLOURS)), r.choice(SHAPES), r, resizer)
        caps["key"].append(f"evalcap-{j:06d}")
        caps["image"].append(data)
        caps["caption"].append(caption)
    pq.write_table(pa.table(caps), out / CAPTIONS_NAME)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m demo.evalset", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--n-captions", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = make_evalset(a.out_dir, a.per_class, a.n_captions, a.seed)
    print(f"wrote {out / CLASSES_NAME} ({a.per_class} x {len(class_names())} classes) and "
          f"{out / CAPTIONS_NAME} ({a.n_captions} captions)")  # fmt: skip


if __name__ == "__main__":
    main()
