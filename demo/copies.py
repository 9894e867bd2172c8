"""Near-copies for the demo world (``make_world(..., n_copies=K)``): the same image again under another
URL and caption, the way the web repeats images, so the dedup tiers have something to find.

Sources are distinct good pairs whose image is not degraded (a blurred image is nearly flat, and its
perceptual hash is unstable: that would measure the blur, not the copy). A copy starts from the *encoded
bytes* of its source (as someone who downloaded the image and posted it
again) and is one of:

* ``reencode``: decoded and saved again as JPEG at quality 35-70;
* ``resize``:   scaled by 0.55-0.85 or 1.2-1.6, then JPEG q85;
* ``crop``:     2-5% cut off each side (each side its own draw), then JPEG q85;
* ``recolour``: every channel shifted by a few levels (3-8, each its own sign), then JPEG q85.

Ground truth (columns of ``world.parquet`` when ``n_copies > 0``): ``copy_of`` (the source's index in
the world, null for an original), ``copy_kind``, ``background`` (the background's name) and
``concept_rows``: how many rows of the world (copies included) show the same concept, colour x shape x
background. ``concept_rows == 1``: the row's image differs in concept from every other row's.
"""

from __future__ import annotations

import io
import random

import pyarrow as pa
from PIL import Image

COPY_KINDS: tuple[str, ...] = ("reencode", "resize", "crop", "recolour")
COPY_FIELDS: tuple[pa.Field, ...] = (
    pa.field("background", pa.string()),
    pa.field("copy_of", pa.int32()),
    pa.field("copy_kind", pa.string()),
    pa.field("concept_rows", pa.int32()),
)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_copy(data: bytes, kind: str, rng: random.Random) -> bytes:
    """A near-copy of the encoded image ``data`` (see the module docstring)."""
    import numpy as np

    with Image.open(io.BytesIO(data)) as im:
        img = im.convert("RGB")
    w, h = img.size
    if kind == "reencode":
        return _jpeg(img, rng.randint(35, 70))
    if kind == "resize":
        f = rng.uniform(0.55, 0.85) if rng.random() < 0.5 else rng.uniform(1.2, 1.6)
        return _jpeg(img.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.BICUBIC), 85)
    if kind == "crop":
        left, right = (round(w * rng.uniform(0.02, 0.05)) for _ in range(2))
        top, bottom = (round(h * rng.uniform(0.02, 0.05)) for _ in range(2))
        return _jpeg(img.crop((left, top, w - right, h - bottom)), 85)
    if kind == "recolour":
        shift = np.array([rng.choice((-1, 1)) * rng.randint(3, 8) for _ in range(3)], np.int16)
        arr = np.clip(np.asarray(img, np.int16) + shift, 0, 255).astype(np.uint8)
        return _jpeg(Image.fromarray(arr, "RGB"), 85)
    raise ValueError(f"unknown copy kind {kind!r}")


def concept_rows(concepts: list[tuple[str, str, str]]) -> list[int]:
    """For each row's (colour, shape, background): how many rows share it (itself included)."""
    from collections import Counter

    counts = Counter(concepts)
    return [counts[c] for c in concepts]
