"""Download images: img2dataset's options and results, with safer defaults and more throughput.

    stage = Download(Download.Config(image_size=256, allow_private_networks=True))
    stage.setup()
    out = stage(table)          # needs ``url``; fills image, width, height, original_*, sha256, http_status

Options keep img2dataset 1.47's names, meanings and defaults (``image_size``, ``resize_mode``,
``encode_format``, ``timeout``, ``disallowed_header_directives``, ``compute_hash``, ...); resizing is
img2dataset's own ``Resizer`` (and ``BoundingBoxBlurrer`` for ``bbox_col``). Differences, all on
purpose:

* **Concurrency.** Each micro-batch (``batch_size`` rows) is fetched by a pool of ``thread_count``
  threads sharing one urllib3 connection pool (keep-alive, so one CPU keeps many downloads in
  flight); decode + resize run in the calling thread as downloads complete, as img2dataset does.
* **Safety.** Only http/https. Every connection, the first and each redirect's, resolves the host
  and refuses private, loopback, link-local, multicast, reserved and unspecified addresses (the
  check runs inside the connection, on the address actually dialled, so DNS rebinding cannot slip
  past it) unless ``allow_private_networks`` or the address is in ``allowed_networks``. Redirects
  are followed by hand up to ``max_redirects``, with loop detection. The body is streamed under
  ``max_response_bytes`` whatever Content-Length says, and the whole request must finish within
  ``total_timeout``. The image header is read (PIL) before any decode: the bytes decide what the
  file is (not Content-Type), and more than ``max_pixels`` pixels is refused (decompression bombs).
  JPEGs without an end-of-image marker after their last scan are refused as truncated (libjpeg
  would otherwise pad them with grey and call them fine).
* **Non-ASCII URLs** are IDNA/percent-encoded as browsers do (img2dataset fails on them).
* **retries** retries only what may succeed later: timeouts, connection errors, HTTP 408/429/5xx.
* **Speed.** Large JPEGs that are only downscaled (resize modes other than ``no``, the default
  ``area`` downscale interpolation, 3-channel, no bbox) are decoded at 1/2, 1/4 or 1/8 scale by
  libjpeg (DCT scaling) and finished with the same geometry as the Resizer: identical output
  dimensions, pixels within a few levels (``tests/test_download.py`` checks this against the
  Resizer for every mode). ``fast_decode: false`` sends every image through the Resizer.
* **save_additional_columns** is a ``read`` option here (as in img2dataset, where the reader
  applies it): ``read`` carries those columns and this stage passes every column through
  unchanged. ``bbox_col`` and the ``verify_hash`` column must be among them.

Every row ends ``ok`` or with a status from ``schemas.status`` and a short reason (see README,
"Statuses and reasons"). ``sha256`` (or the ``compute_hash`` column) is the hash of the bytes as
downloaded, like img2dataset; ``width``/``height`` describe the stored (resized) image.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import io
import ipaddress
import json
import math
import queue
import re
import socket
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from schemas import Status
from stages.base import Resources, Stage, StageConfig, replace_column, set_status

DEFAULT_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
INTERPOLATIONS = ("nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4")
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
REDIRECT_CODES = (301, 302, 303, 307, 308)
RETRYABLE_HTTP = (408, 425, 429, 500, 502, 503, 504)
# Resizer error messages that are size filters rather than decode failures.
SIZE_FILTER_REASONS = ("image too small", "image area too large", "aspect ratio too large")
_CHUNK = 256 * 1024


class DownloadConfig(StageConfig):
    # --- resizing and encoding (img2dataset's meaning and defaults) ---
    image_size: int = Field(256, ge=1)  # target size in pixels (see resize_mode)
    resize_mode: Literal[RESIZE_MODES] = "border"  # no|border|keep_ratio|keep_ratio_largest|center_crop
    resize_only_if_bigger: bool = False  # only downscale; never upscale small images
    upscale_interpolation: Literal[INTERPOLATIONS] = "lanczos"  # cv2 interpolation when enlarging
    downscale_interpolation: Literal[INTERPOLATIONS] = "area"  # cv2 interpolation when shrinking
    encode_format: Literal["jpg", "png", "webp"] = "jpg"  # format of the stored image
    encode_quality: int = 95  # jpg/webp quality 0-100; for png the compression level 0-9
    skip_reencode: bool = False  # keep the original bytes when no resize is needed and the format matches
    disable_all_reencoding: bool = False  # store the bytes as downloaded (header checks only, no decode)
    min_image_size: int = 0  # reject images whose smaller side is below this (filtered_size)
    max_image_area: float = math.inf  # reject images with more pixels than this (filtered_size)
    max_aspect_ratio: float = math.inf  # reject images with long/short side ratio above this (filtered_size)
    bbox_col: str | None = None  # column of [[x0,y0,x1,y1], ...] (relative) boxes to blur, e.g. faces
    extract_exif: bool = True  # add an ``exif`` column (JSON of the EXIF tags of the original bytes)
    compute_hash: Literal["md5", "sha256", "sha512"] | None = "sha256"  # hash of the downloaded bytes
    verify_hash: tuple[str, Literal["md5", "sha256", "sha512"]] | None = None  # [column, hash type] to check
    # --- HTTP (img2dataset's meaning and defaults) ---
    timeout: float = Field(10, gt=0)  # seconds for the connection and for each read
    retries: int = Field(0, ge=0)  # extra attempts for transient failures (timeouts, connection, 408/429/5xx)
    user_agent_token: str | None = None  # added to the User-Agent; X-Robots-Tag "token: ..." targets it
    # X-Robots-Tag directives that opt an image out; [] disables the check
    disallowed_header_directives: list[str] = Field(default_factory=lambda: list(DEFAULT_DIRECTIVES))
    # --- concurrency ---
    thread_count: int = Field(64, ge=1)  # concurrent requests per worker, keep-alive pool (img2dataset: 256)
    batch_size: int = Field(256, ge=1)  # rows per micro-batch handed to the thread pool
    concurrency: int | None = None  # download workers (1 CPU each); None lets the executor size the pool
    # --- safety ---
    allow_private_networks: bool = False  # allow private/loopback/link-local/... addresses (demo, tests)
    allowed_networks: list[str] = []  # CIDRs exempt from the address guard, e.g. ["10.1.2.0/24"]
    max_redirects: int = Field(10, ge=0)  # redirects followed per URL (urllib's limit)
    max_response_bytes: int = Field(32 * 1024 * 1024, ge=1)  # streamed body cap, whatever Content-Length says
    max_pixels: int = Field(89_478_485, ge=1)  # decoded-pixel cap (PIL's default bomb limit)
    total_timeout: float | None = None  # whole-request deadline incl. redirects and body; None: 3 x timeout
    fast_decode: bool = True  # JPEG DCT-scaled decode for big downscales (same dims, pixels within tolerance)

    @field_validator("allowed_networks")
    @classmethod
    def _check_networks(cls, v: list[str]) -> list[str]:
        for net in v:
            ipaddress.ip_network(net, strict=False)
        return v

    @model_validator(mode="after")
    def _check_quality(self) -> DownloadConfig:
        top = 9 if self.encode_format == "png" else 100
        if not 0 <= self.encode_quality <= top:
            raise ValueError(
                f"encode_quality must be 0..{top} for {self.encode_format} (got {self.encode_quality})"
            )
        return self

    @field_validator("disallowed_header_directives", mode="before")
    @classmethod
    def _lower_directives(cls, v: list[str] | None) -> list[str]:
        # img2dataset: None means the default list, [] turns the check off
        return list(DEFAULT_DIRECTIVES) if v is None else [str(d).strip().lower() for d in v]


# ---- URL checks -------------------------------------------------------------------------------


class InvalidURL(ValueError):
    """The URL cannot be fetched at all (status ``invalid_url``)."""


class BlockedAddress(Exception):
    """The host resolves to an address the guard refuses (status ``blocked_address``).

    Not an ``OSError`` on purpose: urllib3 lets it through unwrapped and never retries it."""


class DownloadError(Exception):
    """A failed download with a ready-made reason (status ``download_failed``)."""

    def __init__(self, reason: str, retryable: bool = False, http_status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.http_status = http_status


def normalize_url(url: Any) -> str:
    """Return a fetchable ASCII http(s) URL, or raise ``InvalidURL`` with a short reason."""
    if url is None:
        raise InvalidURL("null URL")
    if not isinstance(url, str):
        raise InvalidURL(f"URL is not a string ({type(url).__name__})")
    url = url.strip()
    if not url:
        raise InvalidURL("empty URL")
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise InvalidURL(f"unparsable URL: {e}") from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise InvalidURL("no scheme (expected http:// or https://)")
    if scheme not in ("http", "https"):
        raise InvalidURL(f"unsupported scheme {scheme}: (only http and https)")
    try:
        host = parts.hostname
        port = parts.port
    except ValueError as e:
        raise InvalidURL(f"bad host or port: {e}") from None
    if not host:
        raise InvalidURL("no host")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise InvalidURL("host is not a valid internationalised domain name") from None
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    if parts.username is not None:
        userinfo = quote(parts.username, safe="%!$&'()*+,;=")
        if parts.password is not None:
            userinfo += ":" + quote(parts.password, safe="%!$&'()*+,;=")
        netloc = f"{userinfo}@{netloc}"
    safe = "/%:@!$&'()*+,;=-._~"
    path = quote(parts.path or "/", safe=safe)
    query = quote(parts.query, safe=safe + "?")
    return urlunsplit((scheme, netloc, path, query, ""))


class AddressPolicy:
    """Which IP addresses a connection may dial."""

    def __init__(self, allow_private: bool, allowed_networks: list[str]):
        self.allow_private = allow_private
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    def refusal(self, ip: str) -> str | None:
        """``None`` if ``ip`` may be dialled, else the reason it may not."""
        if self.allow_private:
            return None
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
        if any(addr in net for net in self.allowed):
            return None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        kind = address_kind(addr)
        return None if kind is None else f"{kind} address {addr} refused"


def address_kind(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``addr`` is not a public unicast address, or ``None`` if it is one."""
    for kind, flag in (
        ("loopback", addr.is_loopback),
        ("link-local", addr.is_link_local),
        ("multicast", addr.is_multicast),
        ("unspecified", addr.is_unspecified),
        ("private", addr.is_private),
        ("reserved", addr.is_reserved),
    ):
        if flag:
            return kind
    return None if addr.is_global else "non-public"


# ---- HTTP -------------------------------------------------------------------------------------


def _guarded_pool_manager(policy: AddressPolicy, maxsize: int):
    """A urllib3 PoolManager whose connections check every address before dialling it."""
    import urllib3
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

    def new_conn(self) -> socket.socket:
        host = self._dns_host
        try:
            infos = socket.getaddrinfo(host, self.port, 0, socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise NameResolutionError(self.host, self, e) from e
        for info in infos:  # refuse if any address is refused: no mixed public/private answers
            why = policy.refusal(info[4][0])
            if why:
                raise BlockedAddress(why)
        err: Exception | None = None
        for family, socktype, proto, _, sockaddr in infos:
            sock = socket.socket(family, socktype, proto)
            try:
                for opt in self.socket_options or ():
                    sock.setsockopt(*opt)
                sock.settimeout(self.timeout)
                sock.connect(sockaddr)
                return sock
            except TimeoutError as e:
                sock.close()
                err = ConnectTimeoutError(self, f"Connection to {self.host} timed out")
                err.__cause__ = e
            except OSError as e:
                sock.close()
                err = NewConnectionError(self, f"Failed to establish a new connection: {e}")
        raise err or NewConnectionError(self, "no address to connect to")

    http_conn = type("GuardedHTTPConnection", (HTTPConnection,), {"_new_conn": new_conn})
    https_conn = type("GuardedHTTPSConnection", (HTTPSConnection,), {"_new_conn": new_conn})
    pools = {
        "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }
    pm = urllib3.PoolManager(num_pools=max(64, maxsize), maxsize=maxsize, block=False, retries=False)
    pm.pool_classes_by_scheme = pools
    return pm


def is_disallowed(values: list[str], user_agent_token: str | None, directives: set[str]) -> bool:
    """img2dataset's X-Robots-Tag rule: a value ``"d1, d2"`` applies to every agent, ``"agent: d1"``
    only to ``user_agent_token``; any listed directive opts the image out."""
    for value in values:
        parts = value.split(":", 1)
        found = {x.strip().lower() for x in parts[-1].split(",")}
        agent = parts[0].strip().lower() if len(parts) == 2 else None
        if (agent is None or agent == user_agent_token) and found & directives:
            return True
    return False


def _short(e: BaseException) -> str:
    """``ExceptionClass: message`` without urllib3's pool/connection prefixes, on one line."""
    msg = str(e)
    msg = re.sub(r"^\w*\(host=[^)]*\):\s*", "", msg)
    msg = msg.replace("Failed to establish a new connection: ", "")
    msg = re.sub(r"<[\w.]+ object at 0x[0-9a-f]+>:?\s*", "", msg)
    msg = msg.replace("\n", " ").strip()
    name = (
        type(e).__name__.replace("Error", "")
        if type(e).__name__.endswith("TimeoutError")
        else type(e).__name__
    )
    return f"{name}: {msg}"[:200] if msg else name


@dataclass
class Fetched:
    data: bytes | None = None
    http_status: int | None = None
    status: str = Status.OK.value
    reason: str | None = None


class Fetcher:
    """GET with the address guard, manual redirects, a size cap and a total deadline."""

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg
        self.policy = AddressPolicy(cfg.allow_private_networks, cfg.allowed_networks)
        self.pm = _guarded_pool_manager(self.policy, cfg.thread_count)
        ua = USER_AGENT
        token = cfg.user_agent_token.strip().lower() if cfg.user_agent_token else None
        if cfg.user_agent_token:
            ua += f" (compatible; {cfg.user_agent_token}; +https://github.com/rom1504/img2dataset)"
        self.token = token
        self.headers = {"User-Agent": ua, "Accept-Encoding": "identity"}
        self.directives = set(cfg.disallowed_header_directives)
        self.total_timeout = cfg.total_timeout if cfg.total_timeout is not None else 3 * cfg.timeout

    def close(self) -> None:
        self.pm.clear()

    def fetch(self, url: Any) -> Fetched:
        try:
            url = normalize_url(url)
        except InvalidURL as e:
            return Fetched(status=Status.INVALID_URL.value, reason=str(e))
        attempt = 0
        while True:
            try:
                return self._fetch_once(url)
            except DownloadError as e:
                if e.retryable and attempt < self.cfg.retries:
                    attempt += 1
                    continue
                return Fetched(
                    http_status=e.http_status, status=Status.DOWNLOAD_FAILED.value, reason=e.reason
                )
            except BlockedAddress as e:
                return Fetched(status=Status.BLOCKED_ADDRESS.value, reason=str(e))
            except InvalidURL as e:
                return Fetched(status=Status.INVALID_URL.value, reason=str(e))

    def _fetch_once(self, url: str) -> Fetched:
        from urllib3.exceptions import HTTPError as U3Error
        from urllib3.util import Timeout

        cfg = self.cfg
        deadline = time.monotonic() + self.total_timeout
        seen = {url}
        for hop in range(cfg.max_redirects + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise DownloadError(f"Timeout: not done within total_timeout {self.total_timeout:g}s", True)
            to = Timeout(connect=min(cfg.timeout, left), read=min(cfg.timeout, left))
            try:
                resp = self._urlopen(url, to)
            except (U3Error, OSError) as e:
                raise DownloadError(_short(e), retryable=True) from None
            code = resp.status
            if code in REDIRECT_CODES:
                location = resp.headers.get("Location")
                _discard(resp)
                if not location:
                    raise DownloadError(f"HTTP {code} without Location", http_status=code)
                if hop == cfg.max_redirects:
                    raise DownloadError(f"too many redirects (>{cfg.max_redirects})", http_status=code)
                try:
                    nxt = normalize_url(urljoin(url, location.encode("latin-1").decode("utf-8", "replace")))
                except InvalidURL as e:
                    raise InvalidURL(f"redirect to bad URL: {e}") from None
                if nxt in seen:
                    raise DownloadError("redirect loop", http_status=code)
                seen.add(nxt)
                url = nxt
                continue
            try:
                if not 200 <= code < 300:  # urllib's rule, as img2dataset sees it
                    raise DownloadError(f"HTTP {code}", retryable=code in RETRYABLE_HTTP, http_status=code)
                if self.directives and is_disallowed(
                    resp.headers.getlist("X-Robots-Tag"), self.token, self.directives
                ):
                    return Fetched(
                        http_status=code, status=Status.OPTED_OUT.value, reason=_robots_reason(resp)
                    )
                data = self._read_body(resp, deadline)
            except BaseException:
                _discard(resp)
                raise
            resp.release_conn()
            return Fetched(data=data, http_status=code)
        raise AssertionError("unreachable")  # pragma: no cover

    def _urlopen(self, url: str, timeout):
        from urllib3.exceptions import ProtocolError

        kw = dict(
            headers=self.headers, redirect=False, retries=False, preload_content=False, decode_content=False
        )
        try:
            return self.pm.urlopen("GET", url, timeout=timeout, **kw)
        except ProtocolError:
            # A kept-alive connection the server closed (or left garbage on) fails before any
            # response; browsers retry that once on a fresh connection, and so do we.
            return self.pm.urlopen("GET", url, timeout=timeout, **kw)

    def _read_body(self, resp, deadline: float) -> bytes:
        from urllib3.exceptions import HTTPError as U3Error

        cap = self.cfg.max_response_bytes
        length = resp.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > cap:
            raise DownloadError(
                f"Content-Length {int(length)} over max_response_bytes {cap}", http_status=resp.status
            )
        buf = bytearray()
        try:
            while True:
                chunk = resp.read1(_CHUNK)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > cap:
                    raise DownloadError(f"body over max_response_bytes {cap}", http_status=resp.status)
                if time.monotonic() > deadline:
                    raise DownloadError(
                        f"Timeout: body not complete within total_timeout {self.total_timeout:g}s",
                        retryable=True,
                        http_status=resp.status,
                    )
        except (U3Error, OSError) as e:
            raise DownloadError(_short(e), retryable=True, http_status=resp.status) from None
        return bytes(buf)


def _robots_reason(resp) -> str:
    return "X-Robots-Tag: " + "; ".join(resp.headers.getlist("X-Robots-Tag"))[:120]


def _discard(resp) -> None:
    """Free a response we do not read: drain a small body to keep the connection, else drop it."""
    try:
        length = resp.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) <= 65536:
            resp.drain_conn()
            resp.release_conn()
        else:
            resp.close()
            resp.release_conn()
    except Exception:  # noqa: BLE001 - best effort; the connection is dropped anyway
        pass


# ---- images -----------------------------------------------------------------------------------


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

    def __init__(self, cfg: DownloadConfig):
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


def _bbox_value(v: Any) -> Any:
    if isinstance(v, str):
        v = json.loads(v)
    return v


# ---- the stage --------------------------------------------------------------------------------


class Download(Stage):
    name = "download"
    Config = DownloadConfig
    requires = ("url",)
    produces = ("http_status",)
    fills = ("image", "width", "height", "original_width", "original_height", "sha256")

    def required_columns(self) -> tuple[str, ...]:
        cfg = self.config
        extra = [c for c in (cfg.bbox_col, cfg.verify_hash[0] if cfg.verify_hash else None) if c]
        return (*self.requires, *extra)
    _extra_hash_columns: ClassVar[tuple[str, ...]] = ("md5", "sha512")

    def resources(self) -> Resources:
        return Resources(
            num_cpus=1, concurrency=self.config.concurrency, batch_size=self.config.batch_size, actor=True
        )

    def extra_produces(self) -> dict[str, pa.DataType]:
        cols: dict[str, pa.DataType] = {}
        if self.config.extract_exif:
            cols["exif"] = pa.string()
        if self.config.compute_hash in self._extra_hash_columns:
            cols[self.config.compute_hash] = pa.string()
        return cols

    def setup(self) -> None:
        self.fetcher = Fetcher(self.config)
        self.images = ImageProcessor(self.config)
        self.pool = ThreadPoolExecutor(self.config.thread_count, thread_name_prefix="download")

    def close(self) -> None:
        """Stop the threads and drop pooled connections (a worker's teardown)."""
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.fetcher.close()
            self.pool = None
            self._setup_done = False

    def __getstate__(self):
        # Threads, sockets and the Resizer stay behind; the copy sets itself up again on first use.
        state = {k: v for k, v in self.__dict__.items() if k not in ("fetcher", "images", "pool")}
        state["_setup_done"] = False
        return state

    def process(self, batch: pa.Table) -> pa.Table:
        cfg = self.config
        n = batch.num_rows
        status: list[str] = [Status.OK.value] * n
        reason: list[str | None] = [None] * n
        image: list[bytes | None] = [None] * n
        dims = {c: [None] * n for c in ("width", "height", "original_width", "original_height")}
        http: list[int | None] = [None] * n
        hashes: list[str | None] = [None] * n
        exif: list[str | None] = [None] * n

        needed = [c for c in (cfg.bbox_col, cfg.verify_hash[0] if cfg.verify_hash else None) if c]
        missing = [c for c in needed if c not in batch.column_names]
        if missing:
            msg = f"column {missing[0]!r} not in input (carry it with read's save_additional_columns)"
            return set_status(batch, [True] * n, Status.STAGE_ERROR, msg)
        bboxes = batch.column(cfg.bbox_col).to_pylist() if cfg.bbox_col else None
        expected = batch.column(cfg.verify_hash[0]).to_pylist() if cfg.verify_hash else None

        # At most 2 x thread_count downloads are in flight or waiting to be decoded (img2dataset's
        # bound), so memory stays under 2 x thread_count x max_response_bytes.
        urls = batch.column("url").to_pylist()
        done: queue.SimpleQueue = queue.SimpleQueue()
        ahead = 2 * cfg.thread_count

        def submit(i: int) -> None:
            self.pool.submit(self._fetch_row, i, urls[i], done)

        for i in range(min(n, ahead)):
            submit(i)
        for finished in range(n):
            i, got = done.get()
            if finished + ahead < n:
                submit(finished + ahead)
            http[i] = got.http_status
            if got.data is None:
                status[i], reason[i] = got.status, got.reason
                continue
            try:
                self._finish_row(i, got.data, bboxes, expected, image, dims, hashes, exif)
            except ImageReject as e:
                status[i], reason[i] = e.status, e.reason

        out = batch
        for col, vals in (("image", image), *dims.items(), ("http_status", http)):
            out = replace_column(out, col, vals)
        hash_col = cfg.compute_hash
        if hash_col:
            out = replace_column(out, hash_col, hashes, pa.string())
        if cfg.extract_exif:
            out = replace_column(out, "exif", exif, pa.string())
        if any(s != Status.OK.value for s in status):
            old = out.column("reason").to_pylist()
            reason = [r if s != Status.OK.value else o for s, r, o in zip(status, reason, old)]
            out = replace_column(out, "status", pa.array(status, pa.string()))
            out = replace_column(out, "reason", pa.array(reason, pa.string()))
        return out

    def _fetch_row(self, i: int, url: Any, done: queue.SimpleQueue) -> None:
        try:
            got = self.fetcher.fetch(url)
        except Exception as e:  # noqa: BLE001 - an unexpected error is this row's failure, not the batch's
            got = Fetched(status=Status.DOWNLOAD_FAILED.value, reason=_short(e))
        done.put((i, got))

    def _finish_row(self, i, data, bboxes, expected, image, dims, hashes, exif) -> None:
        cfg = self.config
        if cfg.verify_hash:
            col, kind = cfg.verify_hash
            got = hashlib.new(kind, data).hexdigest()
            if expected[i] is None or got != str(expected[i]).strip().lower():
                raise ImageReject(Status.HASH_MISMATCH.value, f"{kind} mismatch")
        bbox = None
        if bboxes is not None and bboxes[i] is not None:
            try:
                bbox = _bbox_value(bboxes[i])
            except ValueError:
                raise ImageReject(Status.STAGE_ERROR.value, f"unreadable {cfg.bbox_col} value") from None
        done = self.images(data, bbox)
        image[i] = done.image
        dims["width"][i], dims["height"][i] = done.width, done.height
        dims["original_width"][i], dims["original_height"][i] = done.original_width, done.original_height
        if cfg.compute_hash:
            hashes[i] = hashlib.new(cfg.compute_hash, data).hexdigest()
        if cfg.extract_exif:
            exif[i] = exif_json(data)
