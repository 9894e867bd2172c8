"""URL policy: what a fetchable URL is, and the host key that per-host limits are counted on."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit


class InvalidURL(ValueError):
    """The URL cannot be fetched at all (status ``invalid_url``)."""


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


def host_key(url: str) -> str:
    """``host:port`` of a normalised URL (the default port filled in): the unit of the per-host
    cap, the breaker, the robots.txt cache and the failures-by-host report."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
