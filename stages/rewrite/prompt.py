"""The LaCLIP prompt: the bank of example pairs, seeded example draws, completion and chat prompts."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

DEFAULT_BANK = Path(__file__).resolve().parent.parent / "data" / "laclip_bank.jsonl"
INSTRUCTION = "write image captions differently,"
DEFAULT_SYSTEM_PROMPT = (
    "You rewrite image captions for training an image-text model. Keep every fact of the caption "
    "(objects, colours, counts, text, names); change the wording and sentence structure. "
    "Answer with the rewritten caption only, on one line."
)
DEFAULT_USER_TEMPLATE = "{prompt}"
STOP = ["\n"]  # every engine stops at the first newline (LaCLIP keeps the first line)


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) replaced by one space."""
    return " ".join(text.split())


def load_bank(path: str | Path | None = None) -> list[tuple[str, str]]:
    """Read a JSONL bank of ``{"source": ..., "target": ...}`` pairs (one per line)."""
    path = Path(path) if path else DEFAULT_BANK
    pairs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            src, tgt = one_line(d["source"]), one_line(d["target"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(
                f"{path}:{i}: expected a JSON object with 'source' and 'target' strings"
            ) from None
        if not src or not tgt:
            raise ValueError(f"{path}:{i}: empty source or target")
        pairs.append((src, tgt))
    return pairs


def seed_of(*parts: Any) -> int:
    """A 31-bit seed derived from ``parts`` (stable across processes and Python versions)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def draw_examples(n_bank: int, k: int, seed: int, key: str, slot: int, attempt: int) -> list[int]:
    """The bank indices of one prompt's examples: ``k`` distinct ones, seeded by the row and attempt."""
    return random.Random(f"laclip/{seed}/{key}/{slot}/{attempt}").sample(range(n_bank), k)


def completion_prompt(
    examples: list[tuple[str, str]], caption: str, instruction: str = INSTRUCTION, separator: str = "\n\n"
) -> str:
    """The LaCLIP in-context prompt: instruction, ``source => target`` pairs, then ``caption =>``."""
    parts = [instruction] + [f"{s} => {t}" for s, t in examples] + [f"{caption} =>"]
    return separator.join(parts)


class Prompts:
    """The prompts of one configured stage (``config``: a ``RewriteConfig``; ``bank``: its pairs).

    Picklable and Ray-free: the in-stage engines and the ``ray.data.llm`` row functions share it."""

    def __init__(self, config, bank: list[tuple[str, str]]):
        self.config = config
        self.bank = bank

    def caption(self, caption: str | None) -> str:
        """The caption as prompted: one line, cut to ``max_input_chars``."""
        return one_line(caption or "")[: self.config.max_input_chars]

    def examples(self, key: str, slot: int, attempt: int) -> list[int]:
        c = self.config
        return draw_examples(len(self.bank), c.k, c.seed, key, slot, attempt)

    def seed(self, key: str, slot: int, attempt: int) -> int:
        """The sampling seed of one generation (request engines send it with the request)."""
        return seed_of(self.config.seed, key, slot, attempt)

    def prompt(self, caption: str, examples: list[int]) -> str:
        c = self.config
        return completion_prompt([self.bank[i] for i in examples], caption, c.instruction, c.example_separator)

    def messages(self, caption: str, examples: list[int]) -> list[dict[str, str]]:
        user = self.config.user_template.format(prompt=self.prompt(caption, examples), caption=caption)
        return [{"role": "system", "content": self.config.system_prompt}, {"role": "user", "content": user}]

    def sampling(self) -> dict[str, Any]:
        """The sampling parameters, as recorded in the manifest."""
        c = self.config
        return {"temperature": c.temperature, "top_p": c.top_p, "max_new_tokens": c.max_new_tokens,
                "seed": c.seed, "stop": list(STOP)}  # fmt: skip

    def info(self) -> dict[str, Any]:
        """The prompt's description for the manifest."""
        c = self.config
        bank_path = Path(c.bank) if c.bank else DEFAULT_BANK
        info: dict[str, Any] = {
            "format": "LaCLIP in-context: instruction, k 'source => target' pairs, '{caption} =>'; "
            "output cut at the first newline",
            "instruction": c.instruction,
            "example_separator": c.example_separator,
            "k": c.k,
            "bank": str(c.bank) if c.bank else "stages/data/laclip_bank.jsonl",
            "bank_pairs": len(self.bank),
            "bank_sha256": hashlib.sha256(bank_path.read_bytes()).hexdigest()[:16],
            "example": self.prompt("{caption}", self.examples("KEY", 0, 0)),
        }
        if c.mode == "chat":
            info.update(system_prompt=c.system_prompt, user_template=c.user_template)
        return info
