"""The "shapes world": a seeded generator of image-text pairs for the demo, the tests and the toy CLIP.

Each pair is one coloured shape on a plain background, with a caption from one of several templates
("a red circle on a white background", "photo of a small blue star", ...). The colour and shape words
appear verbatim in the caption. A known share of captions is deliberately wrong: a mismatched caption
names a different shape *and* a different colour (neither the true colour nor the background's), and
its background and size words are drawn afresh, like a caption swapped in from another image. Concepts (colour, shape) follow a Zipf law over a fixed ranking: a few combinations
are very common, most are rare. A handful of entries are broken on purpose (404, truncated JPEG, HTML
served as .jpg, empty file) so that the download stage has something to reject. A known share of the
matched pairs has a degraded image (``degrade_rate``, half blurred, half noisy, chosen by a seeded draw
of their own so the other pairs keep their bytes): the truth is in ``is_degraded`` / ``degraded``.

    make_world(out_dir, n=400, seed=0)  -> out_dir (files/... and world.parquet)
    url_list(out_dir, "http://127.0.0.1:8000") -> the pipeline's input list

CLI: ``python -m demo.world OUT_DIR --n 400 --seed 0``. Same seed, same bytes.
"""

from __future__ import annotations

import argparse
import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 180),
    "pink": (250, 130, 190),
    "brown": (130, 80, 35),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
# Background names and RGB; "white"/"black" are also shape colours, the shape never matches its background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
    "beige": (225, 205, 165),
    "light blue": (190, 220, 245),
}
BACKGROUND_WEIGHTS = (0.45, 0.2, 0.12, 0.13, 0.1)
TEMPLATES: tuple[str, ...] = (
    "{a} {colour} {shape} on {bg_a} {bg} background",
    "photo of {a_size} {size} {colour} {shape}",
    "{a} {colour} {shape}",
    "an image of {a} {colour} {shape} on {bg}",
    "{size} {colour} {shape}, {bg} background",
    "a drawing of {a} {colour} {shape}",
    "there is {a} {colour} {shape} in the picture",
    "{a} {size} {colour} {shape} on {bg_a} plain {bg} background",
)
BROKEN_KINDS: tuple[str, ...] = ("missing", "truncated", "html", "empty")
DEGRADED_KINDS: tuple[str, ...] = ("blur", "noise")
DEGRADE_RATE = 0.08  # make_world's default share of degraded images among the good (not broken) pairs
# Fixed concept ranking for the Zipf law (independent of the seed, so the head concepts are stable).
CONCEPTS: tuple[tuple[str, str], ...] = tuple(
    random.Random(20240601).sample([(c, s) for c in COLOURS for s in SHAPES], len(COLOURS) * len(SHAPES))
)
SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("caption", pa.string()),
        ("is_mismatched", pa.bool_()),
        ("colour", pa.string()),
        ("shape", pa.string()),
        ("true_colour", pa.string()),
        ("true_shape", pa.string()),
        ("broken", pa.string()),
        ("is_degraded", pa.bool_()),
        ("degraded", pa.string()),
    ]
)


@dataclass(frozen=True)
class Pair:
    """One generated pair. ``data`` holds the encoded file (possibly broken; None for a 404)."""

    name: str  # file name under files/, e.g. "000123.jpg"
    data: bytes | None
    caption: str
    is_mismatched: bool
    colour: str  # as named in the caption
    shape: str
    true_colour: str
    true_shape: str
    broken: str | None
    degraded: str | None = None  # "blur" / "noise": the image is degraded (the caption still matches)
    background: str | None = None  # the background's name
    copy_of: int | None = None  # a near-copy (demo/copies.py) of the pair with this index
    copy_kind: str | None = None

    @property
    def is_degraded(self) -> bool:
        return self.degraded is not None


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def concept_weights(zipf_s: float) -> list[float]:
    """Weight of each entry of ``CONCEPTS`` (rank k gets 1/k**s; s=0 is uniform)."""
    return [1.0 / (k**zipf_s) for k in range(1, len(CONCEPTS) + 1)]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, deg: float) -> list[tuple[float, float]]:
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _polygon(cx: float, cy: float, r: float, n: int, start_deg: float) -> list[tuple[float, float]]:
    return [
        (
            cx + r * math.cos(math.radians(start_deg + 360 * i / n)),
            cy + r * math.sin(math.radians(start_deg + 360 * i / n)),
        )
        for i in range(n)
    ]


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, rot: float
) -> None:
    """Draw ``shape`` of radius ``r`` centred on (cx, cy), rotated by ``rot`` degrees."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    if shape == "square":
        pts = [(cx - r * 0.85, cy - r * 0.85), (cx + r * 0.85, cy - r * 0.85), (cx + r * 0.85, cy + r * 0.85)]
        pts.append((cx - r * 0.85, cy + r * 0.85))
    elif shape == "triangle":
        pts = _polygon(cx, cy + r * 0.15, r * 1.05, 3, -90)
    elif shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.42
            a = math.radians(-90 + 36 * i)
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    elif shape == "hexagon":
        pts = _polygon(cx, cy, r, 6, 0)
    elif shape == "diamond":
        pts = [(cx, cy - r), (cx + r * 0.65, cy), (cx, cy + r), (cx - r * 0.65, cy)]
    elif shape == "cross":
        a, b = r * 0.33, r
        arm = [(-a, -b), (a, -b), (a, -a)]  # one arm (top); the others are its 90-degree rotations
        pts = [(cx + x, cy + y) for k in range(4) for x, y in _rotate(arm, 0, 0, 90 * k)]
    elif shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 15.5))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    draw.polygon(_rotate(pts, cx, cy, rot), fill=fill)


def render(colour: str, shape: str, bg: str, rng: random.Random) -> tuple[Image.Image, str]:
    """An RGB image of one shape; returns the image and its size word ("small"/"large")."""
    square = rng.random() < 0.5
    w = rng.randrange(96, 321, 8)
    h = w if square else min(320, max(96, 8 * round(w * rng.uniform(0.65, 1.5) / 8)))
    img = Image.new("RGB", (w, h), _jitter(BACKGROUNDS[bg], rng, 8))
    side = min(w, h)
    large = rng.random() < 0.5
    r = side * (rng.uniform(0.28, 0.42) if large else rng.uniform(0.17, 0.25))
    cx = rng.uniform(r * 1.05, w - r * 1.05)
    cy = rng.uniform(r * 1.05, h - r * 1.05)
    rot = 0.0 if shape in ("square", "diamond", "circle") else rng.uniform(-12, 12)
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, _jitter(COLOURS[colour], rng), rot)
    return img, ("large" if large else "small")


def caption_for(colour: str, shape: str, bg: str, size: str, rng: random.Random) -> str:
    t = rng.choice(TEMPLATES)
    return t.format(a=_article(colour), colour=colour, shape=shape, bg=bg, bg_a=_article(bg), size=size,
                    a_size=_article(size))  # fmt: skip


def degrade(img: Image.Image, kind: str, seed: str) -> Image.Image:
    """A blurred or noisy copy of ``img``, strong enough to survive the pipeline's resize to 64 px:
    a Gaussian blur of radius 16% of the longer side, or Gaussian noise (sigma 110) in blocks of
    1/24 of the longer side. Seeded by ``seed``."""
    import numpy as np
    from PIL import ImageFilter

    side = max(img.size)
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=0.16 * side))
    if kind == "noise":
        k = max(1, round(side / 24))
        w, h = img.size
        rng = np.random.default_rng(int.from_bytes(seed.encode(), "little") % (2**63))
        noise = rng.normal(0.0, 110.0, ((h + k - 1) // k, (w + k - 1) // k, 3))
        noise = np.repeat(np.repeat(noise, k, axis=0), k, axis=1)[:h, :w]
        arr = np.asarray(img, dtype=np.float64) + noise
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    raise ValueError(f"unknown degradation {kind!r}")


def _encode(img: Image.Image, fmt: str, rng: random.Random) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", optimize=False)
    else:
        img.save(buf, format="JPEG", quality=rng.randint(80, 95))
    return buf.getvalue()


def _broken_bytes(kind: str, good: bytes) -> bytes | None:
    if kind == "missing":
        return None
    if kind == "truncated":
        return good[: len(good) // 3]
    if kind == "html":
        return b"<!doctype html><html><head><title>Not an image</title></head><body>404 soft</body></html>\n"
    return b""  # empty


def generate(
    n: int,
    seed: int = 0,
    mismatch_rate: float = 0.15,
    n_broken: int = 0,
    zipf_s: float = 1.1,
    degrade_rate: float = 0.0,
    n_copies: int = 0,
) -> Iterator[Pair]:
    """Yield ``n`` pairs. Exactly ``round(mismatch_rate * (n - n_broken))`` of the good ones are mismatched,
    and ``round(degrade_rate * (n - n_broken))`` of the matched good ones have a degraded image. Then
    ``n_copies`` near-copies (``demo/copies.py``) of distinct good, undegraded pairs, indices ``n`` on (own stream:
    the first ``n`` pairs do not depend on it)."""
    if not 0 <= n_broken <= n:
        raise ValueError("n_broken must be between 0 and n")
    rng = random.Random(seed)
    broken_idx = rng.sample(range(n), n_broken)
    broken_kind = {i: BROKEN_KINDS[j % len(BROKEN_KINDS)] for j, i in enumerate(sorted(broken_idx))}
    good = [i for i in range(n) if i not in broken_kind]
    mismatched = set(rng.sample(good, round(mismatch_rate * len(good))))
    # Own stream: adding degraded images changes no other pair's bytes, caption or truth.
    matched = [i for i in good if i not in mismatched]
    n_degraded = min(len(matched), round(degrade_rate * len(good)))
    chosen = sorted(random.Random(f"{seed}:degraded").sample(matched, n_degraded))
    degraded_kind = {i: DEGRADED_KINDS[j % len(DEGRADED_KINDS)] for j, i in enumerate(chosen)}
    weights = concept_weights(zipf_s)
    # copies of undegraded pairs only: a blurred image is nearly flat and its perceptual hash unstable
    plain = [i for i in good if i not in degraded_kind]
    sources = sorted(random.Random(f"{seed}:copies").sample(plain, min(n_copies, len(plain))))
    kept: dict[int, tuple[Pair, str]] = {}  # sources of copies: (pair, size word)
    for i in range(n):
        r = random.Random(f"{seed}:{i}")  # per-item stream: an item does not depend on the others
        true_colour, true_shape = r.choices(CONCEPTS, weights=weights)[0]
        bg = r.choices(list(BACKGROUNDS), weights=BACKGROUND_WEIGHTS)[0]
        while bg == true_colour:
            bg = r.choices(list(BACKGROUNDS), weights=BACKGROUND_WEIGHTS)[0]
        img, size = render(true_colour, true_shape, bg, r)
        if i in degraded_kind:
            img = degrade(img, degraded_kind[i], f"{seed}:{i}:degrade")
        colour, shape, cap_bg, cap_size = true_colour, true_shape, bg, size
        if i in mismatched:  # reads like another image's caption, with another colour and shape
            colour = r.choice([c for c in COLOURS if c not in (true_colour, bg)])
            shape = r.choice([s for s in SHAPES if s != true_shape])
            cap_bg = r.choice([b for b in BACKGROUNDS if b != colour])
            cap_size = r.choice(("small", "large"))
        caption = caption_for(colour, shape, cap_bg, cap_size, r)
        fmt = "png" if r.random() < 0.15 else "jpg"
        kind = broken_kind.get(i)
        if kind is not None:
            fmt = "jpg"
        data = _encode(img, fmt, r)
        if kind is not None:
            data = _broken_bytes(kind, data)
        pair = Pair(
            f"{i:06d}.{fmt}", data, caption, i in mismatched, colour, shape, true_colour, true_shape, kind,
            degraded_kind.get(i), bg,
        )  # fmt: skip
        if n_copies and i in sources:
            kept[i] = (pair, size)
        yield pair
    if n_copies:
        yield from _copies(kept, sources, n, seed)


def _copies(kept: dict, sources: list[int], n: int, seed: int) -> Iterator[Pair]:
    """The near-copies of ``sources`` (``demo/copies.py``), indices ``n`` on; each has a fresh matched caption."""
    from demo.copies import COPY_KINDS, make_copy

    order = list(sources)
    random.Random(f"{seed}:copies:order").shuffle(order)
    for j, src in enumerate(order):
        p, size = kept[src]
        r = random.Random(f"{seed}:copy:{j}")
        kind = COPY_KINDS[j % len(COPY_KINDS)]
        caption = caption_for(p.true_colour, p.true_shape, p.background, size, r)
        yield Pair(
            f"{n + j:06d}.jpg", make_copy(p.data, kind, r), caption, False, p.true_colour, p.true_shape,
            p.true_colour, p.true_shape, None, p.degraded, p.background, src, kind,
        )  # fmt: skip


def make_world(
    out_dir,
    n: int = 400,
    seed: int = 0,
    mismatch_rate: float = 0.15,
    n_broken: int = 8,
    zipf_s: float = 1.1,
    degrade_rate: float = DEGRADE_RATE,
    n_copies: int = 0,
) -> Path:
    """Write ``out_dir/files/*`` (the served files) and ``out_dir/world.parquet``; return ``out_dir``.
    ``n_copies > 0`` appends near-copies and their ground truth columns (``demo/copies.py``)."""
    from demo.copies import COPY_FIELDS, concept_rows

    out = Path(out_dir)
    files = out / "files"
    files.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([*SCHEMA, *COPY_FIELDS]) if n_copies else SCHEMA
    rows = {name: [] for name in schema.names}
    concepts = []
    for p in generate(n, seed, mismatch_rate, n_broken, zipf_s, degrade_rate, n_copies):
        target = files / p.name
        if p.data is None:
            target.unlink(missing_ok=True)
        else:
            target.write_bytes(p.data)
        rows["path"].append(f"files/{p.name}")
        concepts.append((p.true_colour, p.true_shape, p.background))
        for col in schema.names[1:]:
            if col != "concept_rows":
                rows[col].append(getattr(p, col))
    if n_copies:
        rows["concept_rows"] = concept_rows(concepts)
    pq.write_table(pa.table(rows, schema=schema), out / "world.parquet", compression="zstd")
    return out


def url_list(world_dir, base_url: str) -> pa.Table:
    """The pipeline's input list: ``url`` (= base_url/path), ``caption``, ``is_mismatched`` and the truth."""
    t = pq.read_table(Path(world_dir) / "world.parquet")
    urls = [f"{base_url.rstrip('/')}/{p}" for p in t.column("path").to_pylist()]
    return t.drop_columns(["path"]).add_column(0, "url", pa.array(urls, pa.string()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m demo.world", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mismatch-rate", type=float, default=0.15)
    ap.add_argument("--n-broken", type=int, default=8)
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--degrade-rate", type=float, default=DEGRADE_RATE)
    ap.add_argument("--n-copies", type=int, default=0, help="near-copies to append (demo/copies.py)")
    a = ap.parse_args(argv)
    out = make_world(
        a.out_dir, a.n, a.seed, a.mismatch_rate, a.n_broken, a.zipf_s, a.degrade_rate, a.n_copies
    )
    t = pq.read_table(out / "world.parquet")
    n_mis = sum(t.column("is_mismatched").to_pylist())
    n_broken = sum(b is not None for b in t.column("broken").to_pylist())
    n_deg = sum(t.column("is_degraded").to_pylist())
    print(f"wrote {t.num_rows} pairs to {out} ({n_mis} mismatched, {n_deg} degraded, {n_broken} broken)")


if __name__ == "__main__":
    main()
