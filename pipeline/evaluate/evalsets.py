"""Evaluation sets of ``clipcurate eval``: a labelled set for zero-shot classification and an
image-caption set for retrieval, each from a folder or a Parquet file of image bytes.

* labelled folder: ``ROOT/CLASS/*.jpg|png|webp`` (the sub-folder's name is the class name);
* labelled Parquet: an image column (bytes, or a ``{bytes, path}`` struct as Hugging Face datasets
  write them) and a label column (text or integers);
* caption folder: ``ROOT/KEY.jpg`` + ``ROOT/KEY.txt`` pairs (as a WebDataset shard unpacks);
* caption Parquet: an image column and a caption column.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import ConfigError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class LabelledSet:
    images: list[bytes]
    labels: list[str]  # one per image
    classes: list[str]  # sorted distinct labels


@dataclass
class CaptionSet:
    images: list[bytes]
    captions: list[str]  # one per image


def _bytes(value) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature
        value = value.get("bytes")
    return value


def _parquet(path: str, key: str, columns: list[str]) -> dict[str, list]:
    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"eval: key '{key}': cannot open {path} as Parquet: {e}") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ConfigError(f"eval: key '{key}': {path} has no column {missing[0]!r} (columns: {schema.names})")
    return pq.read_table(path, columns=columns).to_pydict()


def labelled_set(path: str, image_column: str = "image", label_column: str = "label") -> LabelledSet:
    p = Path(path)
    if p.is_dir():
        images, labels = [], []
        for d in sorted(x for x in p.iterdir() if x.is_dir()):
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_EXTS:
                    images.append(f.read_bytes())
                    labels.append(d.name)
    elif p.is_file():
        cols = _parquet(path, "classification", [image_column, label_column])
        pairs = [(_bytes(i), lab) for i, lab in zip(cols[image_column], cols[label_column])]
        pairs = [(i, str(lab)) for i, lab in pairs if i and lab is not None]
        images, labels = [i for i, _ in pairs], [lab for _, lab in pairs]
    else:
        raise ConfigError(f"eval: key 'classification': {path} not found")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ConfigError(f"eval: key 'classification': {path} needs images of at least 2 classes")
    return LabelledSet(images, labels, classes)


def caption_set(path: str, image_column: str = "image", caption_column: str = "caption") -> CaptionSet:
    p = Path(path)
    if p.is_dir():
        images, captions = [], []
        for f in sorted(p.iterdir()):
            txt = f.with_suffix(".txt")
            if f.suffix.lower() in IMAGE_EXTS and txt.is_file():
                images.append(f.read_bytes())
                captions.append(txt.read_text(encoding="utf-8").strip())
    elif p.is_file():
        cols = _parquet(path, "retrieval", [image_column, caption_column])
        pairs = [(_bytes(i), c) for i, c in zip(cols[image_column], cols[caption_column])]
        pairs = [(i, c) for i, c in pairs if i and c]
        images, captions = [i for i, _ in pairs], [c for _, c in pairs]
    else:
        raise ConfigError(f"eval: key 'retrieval': {path} not found")
    if len(images) < 2:
        raise ConfigError(f"eval: key 'retrieval': {path} needs at least 2 image-caption pairs")
    return CaptionSet(images, captions)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_image_hashes(tar_paths: list[str]) -> set[str]:
    """sha256 of every image member of the given WebDataset tars."""
    out: set[str] = set()
    for path in tar_paths:
        with open(path, "rb") as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tar:
            for m in tar:
                if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTS:
                    out.add(sha256(tar.extractfile(m).read()))
    return out
