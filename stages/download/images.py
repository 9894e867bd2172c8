"""Image codec: header checks before any decode, img2dataset's own ``Resizer`` (and
``BoundingBoxBlurrer``), and the DCT-scaled JPEG fast path for downscales.

The bytes decide what the file is (not Content-Type); more than ``max_pixels`` pixels is refused
(decompression bombs); JPEGs without an end-of-image marker after their last scan are refused as
truncated (libjpeg would otherwise pad them with grey and call them fine)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import io
import json
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from schemas import Status

# Resizer error messages that are size filters rather than decode failures.
SIZE_FILTER_REASONS = ("image too small", "image area too large", "aspect ratio too large")


def _short(e: BaseException) -> str:
    msg = str(e).replace("\n", " ").strip()
    return f"{type(e).__name__}: {msg}"[:200] if msg else type(e).__name__


class ImageReject(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Processed:
    image: bytes
    width: int | None
    height: int | None
    original_width: int | None
    original_height: int | None


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "HTML"
    if head.startswith((b"<?xml", b"<svg")):
        return "XML/SVG"
    if head.startswith((b"{", b"[")):
        return "JSON"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in data[:64]):
        return "text"
    return "bytes " + data[:8].hex()


def jpeg_complete(data: bytes) -> bool:
    """True if an end-of-image marker follows the last start-of-scan (entropy-coded data
    cannot contain either marker, so a cut file has none after its last scan)."""
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") > 0


@functools.cache
def img2dataset_module(name: str) -> ModuleType:
    """img2dataset's ``resizer`` or ``blurrer`` module.

    ``import img2dataset.resizer`` runs the package's ``__init__``, which imports torch, wandb,
    webdataset and pyspark helpers (~9 s per worker on a busy 2-core machine) for two small
    modules that only need cv2, numpy and albumentations. Unless img2dataset is already imported,
    the module file is loaded on its own under a private name: the same code, without the rest."""
    full = f"img2dataset.{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.find_spec("img2dataset")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return importlib.import_module(full)
    path = Path(next(iter(spec.submodule_search_locations))) / f"{name}.py"
    mspec = importlib.util.spec_from_file_location(f"_clipcurate_img2dataset_{name}", path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    return module


class ImageProcessor:
    """Header checks, then img2dataset's Resizer (or the equivalent DCT-scaled JPEG path)."""

    def __init__(self, cfg):
        import cv2

        Resizer = img2dataset_module("resizer").Resizer
        BoundingBoxBlurrer = img2dataset_module("blurrer").BoundingBoxBlurrer
        self.cfg = cfg
        self.cv2 = cv2
        self.resizer = Resizer(
            image_size=cfg.image_size,
            resize_mode=cfg.resize_mode,
            resize_only_if_bigger=cfg.resize_only_if_bigger,
            upscale_interpolation=cfg.upscale_interpolation,
            downscale_interpolation=cfg.downscale_interpolation,
            encode_quality=cfg.encode_quality,
            encode_format=cfg.encode_format,
            skip_reencode=cfg.skip_reencode,
            disable_all_reencoding=cfg.disable_all_reencoding,
            min_image_size=cfg.min_image_size,
            max_image_area=cfg.max_image_area,
            max_aspect_ratio=cfg.max_aspect_ratio,
            blurrer=BoundingBoxBlurrer() if cfg.bbox_col else None,
        )
        self.encode_ext = "." + cfg.encode_format
        self.encode_params = list(self.resizer.encode_params)
        self.fast = cfg.fast_decode and cfg.resize_mode != "no" and cfg.downscale_interpolation == "area"
        self._lock = threading.Lock()  # the Resizer redirects fds 1/2 while it runs: one at a time

    def header(self, data: bytes) -> tuple[str, str, int, int]:
        from PIL import Image, UnidentifiedImageError

        if not data:
            raise ImageReject(Status.DECODE_FAILED.value, "empty body")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as im:
                    fmt, mode, (w, h) = im.format or "?", im.mode, im.size
        except Image.DecompressionBombError as e:  # over 2x PIL's own limit: PIL refuses to open it
            m = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{m.group(1)} pixels" if m else "too many pixels"
            raise ImageReject(
                Status.DECODE_FAILED.value, f"image over max_pixels {self.cfg.max_pixels}: {size}"
            ) from None
        except UnidentifiedImageError:
            raise ImageReject(Status.DECODE_FAILED.value, f"not an image ({_sniff(data)})") from None
        except Exception as e:  # noqa: BLE001 - a broken header is a decode failure
            raise ImageReject(Status.DECODE_FAILED.value, f"bad image header: {_short(e)}") from None
        if w * h > self.cfg.max_pixels:
            raise ImageReject(
                Status.DECODE_FAILED.value, f"image over max_pixels {self.cfg.max_pixels}: {w}x{h}"
            )
        if fmt == "JPEG" and not jpeg_complete(data):
            raise ImageReject(Status.DECODE_FAILED.value, "truncated JPEG (no end-of-image marker)")
        return fmt, mode, w, h

    def __call__(self, data: bytes, bbox: Any = None) -> Processed:
        fmt, mode, w, h = self.header(data)
        if self.cfg.disable_all_reencoding:
            return Processed(data, w, h, w, h)
        self.size_filters(w, h)
        if bbox is None and fmt == "JPEG" and mode == "RGB" and self.fast:
            out = self._fast_jpeg(data, w, h)
            if out is not None:
                return out
        with self._lock:
            img, width, height, ow, oh, err = self.resizer(io.BytesIO(data), bbox)
        if err is not None:
            status = Status.FILTERED_SIZE if err in SIZE_FILTER_REASONS else Status.DECODE_FAILED
            raise ImageReject(status.value, err[:200])
        return Processed(img, width, height, ow, oh)

    def size_filters(self, w: int, h: int) -> None:
        """The Resizer's three filters, same order and messages, from the header's size (what the
        Resizer's full decode would find), so rejected images are never decoded."""
        cfg = self.cfg
        if min(w, h) < cfg.min_image_size:
            raise ImageReject(Status.FILTERED_SIZE.value, "image too small")
        if w * h > cfg.max_image_area:
            raise ImageReject(Status.FILTERED_SIZE.value, "image area too large")
        if max(w, h) / max(1, min(w, h)) > cfg.max_aspect_ratio:
            raise ImageReject(Status.FILTERED_SIZE.value, "aspect ratio too large")

    def reduction(self, w: int, h: int) -> int:
        """The largest JPEG DCT scale (1, 2, 4 or 8) that still leaves at least ``image_size``
        pixels on the side the resize mode fits, so the final resize is still a downscale."""
        cfg = self.cfg
        side = min(w, h) if cfg.resize_mode in ("keep_ratio", "center_crop") else max(w, h)
        k = 8
        while k > 1 and -(-side // k) < cfg.image_size:
            k //= 2
        return k

    def _fast_jpeg(self, data: bytes, w: int, h: int) -> Processed | None:
        """Downscale-only JPEG path; returns ``None`` to fall back to the Resizer."""
        cv2, cfg, size = self.cv2, self.cfg, self.cfg.image_size
        short, long_ = min(w, h), max(w, h)
        fit_short = cfg.resize_mode in ("keep_ratio", "center_crop")
        side = short if fit_short else long_
        if side <= size:
            return None  # not a downscale
        k = self.reduction(w, h)
        flags = (
            cv2.IMREAD_IGNORE_ORIENTATION
            | {
                1: cv2.IMREAD_COLOR,
                2: cv2.IMREAD_REDUCED_COLOR_2,
                4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8,
            }[k]
        )
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if img is None or img.ndim != 3 or img.shape[2] != 3:
            return None
        scale = size / side  # albumentations' Smallest/LongestMaxSize geometry, from the true size
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        if cfg.resize_mode == "center_crop":
            y, x = (nh - size) // 2, (nw - size) // 2
            img = img[y : y + size, x : x + size]
        elif cfg.resize_mode == "border" and (nh < size or nw < size):
            top, left = max(0, int((size - nh) / 2.0)), max(0, int((size - nw) / 2.0))
            bottom, right = max(0, size - nh - top), max(0, size - nw - left)
            img = cv2.copyMakeBorder(
                img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(255, 255, 255)
            )
        ok, enc = cv2.imencode(self.encode_ext, img, self.encode_params)
        if not ok:
            return None
        return Processed(enc.tobytes(), img.shape[1], img.shape[0], w, h)


def exif_json(data: bytes) -> str | None:
    """img2dataset's ``exif`` column: JSON of exifread's tags, or None."""
    import logging

    import exifread

    # exifread warns "File format not recognized." for every PNG; a missing EXIF is simply None here
    logging.getLogger("exifread").setLevel(logging.ERROR)
    try:
        tags = exifread.process_file(io.BytesIO(data), details=False)
        return json.dumps({k: str(v).strip() for k, v in tags.items() if v is not None})
    except Exception:  # noqa: BLE001 - img2dataset stores None when EXIF cannot be read
        return None
