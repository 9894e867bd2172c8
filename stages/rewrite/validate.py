"""Validation of generations: LaCLIP's cut, the rejection rules, and the rewrites collected per row."""

from __future__ import annotations

from collections import Counter

from stages.rewrite.prompt import one_line


def clean_output(raw: str | None) -> str:
    """Cut a generation the LaCLIP way (first line, text before a further ``=>``), normalise spaces,
    and drop quotes around the whole answer (chat models add them)."""
    text = (raw or "").lstrip().split("\n", 1)[0].split("=>", 1)[0]
    text = one_line(text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def _norm(text: str) -> str:
    return one_line(text).lower().rstrip(" .!")


class RowRewrites:
    """Collects the accepted rewrites of one caption and counts why others were rejected.

    ``config`` is the stage's ``RewriteConfig`` (``n_rewrites``, ``max_chars``, ``instruction``)."""

    def __init__(self, caption: str, config, bank: list[tuple[str, str]]):
        self.caption = caption
        self.config = config
        self.bank = bank
        self.accepted: dict[int, str] = {}  # slot -> rewrite
        self.rejected: Counter[str] = Counter()
        self._seen = {_norm(caption)}

    def rejection(self, text: str, examples: list[int]) -> str | None:
        """Why ``text`` (already cleaned) is not a valid rewrite, or None."""
        if not text:
            return "empty"
        if len(text) > self.config.max_chars:
            return "too_long"
        low = _norm(text)
        instruction = _norm(self.config.instruction)
        if low == _norm(self.caption) or (instruction and instruction in low):
            return "echo"
        ex = self.bank
        if any(low in (_norm(ex[i][0]), _norm(ex[i][1])) for i in examples):
            return "copied_example"
        if low in self._seen:
            return "duplicate"
        return None

    def offer(self, slot: int, raw: str | None, examples: list[int], error: str | None = None) -> str | None:
        """Take one generation for ``slot``; returns the rejection reason (None when accepted)."""
        text = clean_output(raw)
        reason = error or self.rejection(text, examples)
        if reason:
            self.rejected[reason] += 1
            return reason
        self.accepted[slot] = text
        self._seen.add(_norm(text))
        return None

    def result(self) -> tuple[list[str], str | None]:
        """``(rewrites, rewrite_reason)``: the reason is None when all ``n_rewrites`` succeeded."""
        rewrites = [self.accepted[s] for s in sorted(self.accepted)][: self.config.n_rewrites]
        why = ", ".join(f"{k} x{v}" for k, v in sorted(self.rejected.items()))
        if len(rewrites) == self.config.n_rewrites:
            return rewrites, None
        if not rewrites:
            return [], f"no valid rewrite: {why or 'no output'}"[:300]
        return rewrites, f"{len(rewrites)}/{self.config.n_rewrites} rewrites; rejected: {why}"[:300]
