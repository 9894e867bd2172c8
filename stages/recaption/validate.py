"""Which generated captions the recaption stage keeps."""

from __future__ import annotations

from stages.rewrite.validate import clean_output

__all__ = ["clean_output", "rejection"]


def rejection(text: str, max_chars: int) -> str | None:
    """Why a cleaned caption is not kept (``empty``, ``too_long``), or None."""
    if not text:
        return "empty"
    if len(text) > max_chars:
        return "too_long"
    return None
