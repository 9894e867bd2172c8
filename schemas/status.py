"""Status vocabulary. Every row carries exactly one of these in ``status``.

A stage that rejects a row sets ``status`` to one of the non-``ok`` codes below and puts a
short human-readable explanation in ``reason``. Rows are never dropped: the writer puts
every row in the shard Parquet and only ``ok`` rows in the tar.
"""

from enum import StrEnum


class Status(StrEnum):
    OK = "ok"
    # read / download
    INVALID_URL = "invalid_url"  # empty, null, unsupported scheme, unparsable
    BLOCKED_ADDRESS = "blocked_address"  # resolves to private/loopback/link-local/multicast
    DOWNLOAD_FAILED = "download_failed"  # HTTP error, timeout, connection error, size cap
    OPTED_OUT = "opted_out"  # X-Robots-Tag directive disallows use
    DECODE_FAILED = "decode_failed"  # bytes are not a decodable image, or over the pixel cap
    FILTERED_SIZE = "filtered_size"  # min_image_size / max_image_area / max_aspect_ratio
    HASH_MISMATCH = "hash_mismatch"  # verify_hash failed
    # filters
    FILTERED_BASIC = "filtered_basic"  # DataComp basic filter (reason names the rule)
    FILTERED_CLIP = "filtered_clip"  # CLIP score under min_score / top_fraction threshold
    FILTERED_BALANCE = "filtered_balance"  # MetaCLIP balancing: no match, or sampled out
    DUPLICATE = "duplicate"  # exact, perceptual or semantic duplicate (reason names the kept key)
    CONTAMINATED = "contaminated"  # image too close to an evaluation set's (reason names the eval item)
    # generic
    STAGE_ERROR = "stage_error"  # a row that made a stage raise; reason holds the exception


OK = Status.OK.value
STATUSES: tuple[str, ...] = tuple(s.value for s in Status)

# Documented reasons for each status are in README.md ("Statuses and reasons").


def is_ok(status: str | None) -> bool:
    return status == OK
