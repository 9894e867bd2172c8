"""The download stage's configuration: img2dataset 1.47's option names, meanings and defaults,
plus the keys of the address guard, the per-host window and the opt-out checks."""

from __future__ import annotations

import ipaddress
import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from stages.base import StageConfig

DEFAULT_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
INTERPOLATIONS = ("nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4")
HASHES = Literal["md5", "sha256", "sha512"]


class DownloadConfig(StageConfig):
    # --- resizing and encoding (img2dataset's meaning and defaults) ---
    image_size: int = Field(256, ge=1, description="target size in pixels (see resize_mode)")
    resize_mode: Literal[RESIZE_MODES] = Field(
        "border", description="no|border|keep_ratio|keep_ratio_largest|center_crop"
    )
    resize_only_if_bigger: bool = Field(False, description="only downscale; never upscale small images")
    upscale_interpolation: Literal[INTERPOLATIONS] = Field(
        "lanczos", description="cv2 interpolation when enlarging"
    )
    downscale_interpolation: Literal[INTERPOLATIONS] = Field(
        "area", description="cv2 interpolation when shrinking"
    )
    encode_format: Literal["jpg", "png", "webp"] = Field("jpg", description="format of the stored image")
    encode_quality: int = Field(95, description="jpg/webp quality 0-100; for png the compression level 0-9")
    skip_reencode: bool = Field(
        False, description="keep the original bytes when no resize is needed and the format matches"
    )
    disable_all_reencoding: bool = Field(
        False, description="store the bytes as downloaded (header checks only, no decode)"
    )
    min_image_size: int = Field(
        0, description="reject images whose smaller side is below this (filtered_size)"
    )
    max_image_area: float = Field(
        math.inf, description="reject images with more pixels than this (filtered_size)"
    )
    max_aspect_ratio: float = Field(
        math.inf, description="reject images with long/short side ratio above this (filtered_size)"
    )
    bbox_col: str | None = Field(
        None, description="column of [[x0,y0,x1,y1], ...] (relative) boxes to blur, e.g. faces"
    )
    extract_exif: bool = Field(
        True, description="add an ``exif`` column (JSON of the EXIF tags of the original bytes)"
    )
    compute_hash: HASHES | None = Field("sha256", description="hash of the downloaded bytes")
    verify_hash: tuple[str, HASHES] | None = Field(None, description="[column, hash type] to check")
    # --- HTTP (img2dataset's meaning and defaults) ---
    timeout: float = Field(10, gt=0, description="seconds for the connection and for each read")
    retries: int = Field(
        0, ge=0, description="extra attempts, at once, for transient failures (timeouts, connection, 408/5xx)"
    )
    user_agent_token: str | None = Field(
        None,
        description='added to the User-Agent; X-Robots-Tag "token: ..." targets it; the robots.txt agent',
    )
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DIRECTIVES),
        description="X-Robots-Tag directives that opt an image out; [] disables the check",
    )
    check_robots_txt: bool = Field(
        False,
        description="opt out (robots.txt: ...) URLs, and redirect targets, that their host's robots.txt disallows "
        "for user_agent_token (or *); fetched once per host and worker through the same guard",
    )
    respect_tdm_reservation: bool = Field(
        False,
        description="opt out (tdm-reservation: ...) what TDMRep reserves: responses with the header "
        "tdm-reservation: 1, and URLs or redirect targets that the origin's /.well-known/tdmrep.json reserves",
    )
    # --- concurrency and politeness ---
    thread_count: int = Field(
        64, ge=1, description="requests in flight per worker, across micro-batches (img2dataset: 256)"
    )
    max_per_host: int = Field(
        6,
        ge=1,
        description="requests in flight per host (host:port) from this machine: the download workers of a "
        "machine share them (see max_per_host_scope); also each worker's keep-alive pool per host",
    )
    max_per_host_scope: Literal["machine", "worker"] = Field(
        "machine",
        description="machine: max_per_host bounds all download workers of one machine together (a table in "
        "/dev/shm); worker: each worker has max_per_host of its own (N workers: up to N x max_per_host)",
    )
    max_retry_after: float = Field(
        10, ge=0, description="longest Retry-After (429/503) honoured, seconds; longer ends rate_limited"
    )
    breaker_threshold: int = Field(
        5,
        ge=0,
        description="consecutive timeouts/refusals/resets/DNS failures that open a host's breaker "
        "(its waiting URLs fail at once); 0 disables it",
    )
    breaker_cooldown: float = Field(
        30, ge=0, description="seconds before an open breaker lets one URL probe the host again"
    )
    min_body_rate: float = Field(
        0,
        ge=0,
        description="abort a body that arrives slower than this many bytes/s on average once `timeout` "
        "seconds have passed (a slow drip); 0: off",
    )
    dns_cache_seconds: float = Field(
        300, ge=0, description="per-worker DNS cache lifetime (the guard still checks every dial)"
    )
    batch_size: int = Field(256, ge=1, description="rows per process() call (decoded rows per output piece)")
    concurrency: int | None = Field(
        None, description="download actors (1 CPU each); null: one. Raise it to download on more CPUs."
    )
    # --- safety ---
    allow_private_networks: bool = Field(
        False,
        description="also allow private and loopback addresses (link-local, multicast, reserved, "
        "unspecified stay refused unless in allowed_networks)",
    )
    allowed_networks: list[str] = Field(
        default_factory=list, description='CIDRs exempt from the address guard, e.g. ["127.0.0.0/8"]'
    )
    max_redirects: int = Field(10, ge=0, description="redirects followed per URL (urllib's limit)")
    max_response_bytes: int = Field(
        32 * 1024 * 1024, ge=1, description="streamed body cap, whatever Content-Length says"
    )
    max_pixels: int = Field(89_478_485, ge=1, description="decoded-pixel cap (PIL's default bomb limit)")
    total_timeout: float | None = Field(
        None,
        description="deadline per URL from its first request, incl. redirects, body, retries and "
        "Retry-After waits; None: 3 x timeout",
    )
    fast_decode: bool = Field(
        True, description="JPEG DCT-scaled decode for big downscales (same dims, pixels within tolerance)"
    )

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
