"""The stable rule tag (``rule`` column) of a download outcome, from its status and reason.

Every reason this package writes starts with a fixed class word (``stages/download/http.py``, ``urls.py``,
``guard.py``, ``optout.py``, ``images.py``, ``window.py``); the tag names that class without the per-row
parts (codes other than the HTTP status, hosts, sizes). A reason no rule here knows gets its status as
tag. README "Statuses and reasons" lists the tags.
"""

from __future__ import annotations

import re

from schemas import Status

# (status, reason prefix, tag); the first match wins, so longer prefixes come first.
PREFIXES: tuple[tuple[str, str, str], ...] = (
    (Status.INVALID_URL, "null URL", "null_url"),
    (Status.INVALID_URL, "empty URL", "empty_url"),
    (Status.INVALID_URL, "URL is not a string", "not_a_string"),
    (Status.INVALID_URL, "unparsable URL", "unparsable_url"),
    (Status.INVALID_URL, "no scheme", "no_scheme"),
    (Status.INVALID_URL, "unsupported scheme", "unsupported_scheme"),
    (Status.INVALID_URL, "bad host or port", "bad_host"),
    (Status.INVALID_URL, "no host", "no_host"),
    (Status.INVALID_URL, "host is not a valid internationalised", "bad_idna"),
    (Status.INVALID_URL, "redirect to bad URL", "redirect_bad_url"),
    (Status.DOWNLOAD_FAILED, "dns:", "dns"),
    (Status.DOWNLOAD_FAILED, "connect:", "connect"),
    (Status.DOWNLOAD_FAILED, "reset:", "reset"),
    (Status.DOWNLOAD_FAILED, "tls:", "tls"),
    (Status.DOWNLOAD_FAILED, "ConnectTimeout", "connect_timeout"),
    (Status.DOWNLOAD_FAILED, "ReadTimeout", "read_timeout"),
    (Status.DOWNLOAD_FAILED, "Timeout: body slower than min_body_rate", "min_body_rate"),
    (Status.DOWNLOAD_FAILED, "Timeout:", "total_timeout"),
    (Status.DOWNLOAD_FAILED, "rate_limited:", "rate_limited"),
    (Status.DOWNLOAD_FAILED, "breaker:", "breaker"),
    (Status.DOWNLOAD_FAILED, "redirect loop", "redirect_loop"),
    (Status.DOWNLOAD_FAILED, "too many redirects", "too_many_redirects"),
    (Status.DOWNLOAD_FAILED, "body over max_response_bytes", "max_response_bytes"),
    (Status.DOWNLOAD_FAILED, "Content-Length", "max_response_bytes"),
    (Status.DOWNLOAD_FAILED, "empty response", "empty_response"),
    (Status.DOWNLOAD_FAILED, "cancelled", "cancelled"),
    (Status.OPTED_OUT, "X-Robots-Tag:", "x_robots_tag"),
    (Status.OPTED_OUT, "robots.txt:", "robots_txt"),
    (Status.OPTED_OUT, "tdm-reservation:", "tdm_reservation"),
    (Status.DECODE_FAILED, "empty body", "empty_body"),
    (Status.DECODE_FAILED, "not an image", "not_an_image"),
    (Status.DECODE_FAILED, "bad image header", "bad_header"),
    (Status.DECODE_FAILED, "image over max_pixels", "max_pixels"),
    (Status.DECODE_FAILED, "truncated JPEG", "truncated_jpeg"),
    (Status.FILTERED_SIZE, "image too small", "min_image_size"),
    (Status.FILTERED_SIZE, "image area too large", "max_image_area"),
    (Status.FILTERED_SIZE, "aspect ratio too large", "max_aspect_ratio"),
    (Status.HASH_MISMATCH, "", "verify_hash"),
    (Status.STAGE_ERROR, "", "stage_error"),
)
_HTTP = re.compile(r"HTTP (\d{3})\b")
_BLOCKED = re.compile(r"([a-z-]+) address ")


def rule_of(status: str, reason: str | None) -> str:
    """The tag of a non-ok download outcome: ``http_404``, ``dns``, ``blocked:private``, ``max_pixels``..."""
    reason = reason or ""
    for st, prefix, tag in PREFIXES:
        if status == st and reason.startswith(prefix):
            return tag
    if status == Status.DOWNLOAD_FAILED and (m := _HTTP.match(reason)):
        return f"http_{m.group(1)}"  # HTTP 404, and HTTP 301 without Location
    if status == Status.BLOCKED_ADDRESS and (m := _BLOCKED.match(reason)):
        return f"blocked:{m.group(1).replace('-', '_')}"
    if status == Status.DECODE_FAILED:
        return "decode_error"  # the Resizer's own errors (cv2 could not decode the bytes)
    return str(status)
