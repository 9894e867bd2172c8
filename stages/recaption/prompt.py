"""The recaption prompts: chat messages with the row's image, per prompt mode, and the image helpers."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from stages.rewrite.prompt import one_line, seed_of

_MAGIC = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8", "image/jpeg"),
    (b"RIFF", "image/webp"),
    (b"GIF8", "image/gif"),
)


def image_mime(data: bytes) -> str:
    """The MIME type of encoded image bytes, from their magic number (JPEG when unknown)."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    return "image/jpeg"


def data_uri(data: bytes) -> str:
    """``data:image/...;base64,...`` of encoded image bytes (what OpenAI-compatible servers accept)."""
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


def decode_data_uri(uri: str) -> bytes:
    """The bytes of a base64 ``data:`` URI."""
    head, _, payload = uri.partition(",")
    if not head.startswith("data:") or ";base64" not in head:
        raise ValueError("not a base64 data: URI")
    return base64.b64decode(payload)


class RecapPrompts:
    """The prompts of one configured recaption stage (``config``: a ``RecaptionConfig``); Ray-free."""

    def __init__(self, config):
        self.config = config

    def caption(self, caption: str | None) -> str:
        """The alt-text as prompted: one line, cut to ``max_input_chars``."""
        return one_line(caption or "")[: self.config.max_input_chars]

    def text(self, caption: str) -> str:
        """The user message's text for an alt-text (ignored in ``scratch`` mode)."""
        c = self.config
        return c.scratch_prompt if c.prompt_mode == "scratch" else c.altogether_prompt.format(caption=caption)

    def messages(self, caption: str, image: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Chat messages: an optional system message, then the user message with an image part first.

        ``image`` is the image content part (``{"type": "image_url", "image_url": {"url": DATA_URI}}`` for
        HTTP engines, ``{"type": "image"}`` where the processor gets the image separately)."""
        c = self.config
        user = [image or {"type": "image"}, {"type": "text", "text": self.text(caption)}]
        msgs: list[dict[str, Any]] = (
            [{"role": "system", "content": c.system_prompt}] if c.system_prompt else []
        )
        return msgs + [{"role": "user", "content": user}]

    def seed(self, key: str, attempt: int = 0) -> int:
        """The sampling seed of one row's generation (request engines send it with the request)."""
        return seed_of(self.config.seed, "recap", key, attempt)

    def info(self) -> dict[str, Any]:
        """The prompt's description for the manifest."""
        c = self.config
        text = self.text("{caption}")
        return {
            "prompt_mode": c.prompt_mode,
            "system_prompt": c.system_prompt,
            "user_text": text,
            "user_text_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
            "image": "the row's stored image bytes (first content part of the user message)",
        }
