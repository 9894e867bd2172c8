"""The download stage, one concern per module:

=============  =================================================================================
urls.py        URL normalisation (``invalid_url``) and the host key
guard.py       address policy, DNS cache, guarded connections (``blocked_address``), test hooks
http.py        one GET: redirects, size cap, deadline, opt-out headers, failure class tags
optout.py      X-Robots-Tag, robots.txt, TDM reservation
window.py      per-worker fetch threads: per-host cap, Retry-After, breaker, bounded buffer
images.py      header checks, img2dataset's Resizer, the DCT-scaled JPEG path
config.py      ``DownloadConfig``
stage.py       ``Download``
=============  =================================================================================
"""

from stages.download.config import DEFAULT_DIRECTIVES, INTERPOLATIONS, RESIZE_MODES, DownloadConfig
from stages.download.guard import (
    AddressPolicy,
    BlockedAddress,
    DnsCache,
    address_kind,
    set_dial_hook,
    set_resolver,
)
from stages.download.http import DownloadError, Fetched, Fetcher
from stages.download.images import (
    ImageProcessor,
    ImageReject,
    Processed,
    exif_json,
    img2dataset_module,
    jpeg_complete,
)
from stages.download.optout import RobotsCache, is_disallowed
from stages.download.stage import Download
from stages.download.urls import InvalidURL, host_key, normalize_url

__all__ = [
    "DEFAULT_DIRECTIVES",
    "INTERPOLATIONS",
    "RESIZE_MODES",
    "AddressPolicy",
    "BlockedAddress",
    "DnsCache",
    "Download",
    "DownloadConfig",
    "DownloadError",
    "Fetched",
    "Fetcher",
    "ImageProcessor",
    "ImageReject",
    "InvalidURL",
    "Processed",
    "RobotsCache",
    "address_kind",
    "exif_json",
    "host_key",
    "img2dataset_module",
    "is_disallowed",
    "jpeg_complete",
    "normalize_url",
    "set_dial_hook",
    "set_resolver",
]
