"""What every engine of the recaption stage provides (Ray-free): the rewrite engines' lifecycle
(``stages.rewrite.engines.base.Engine``: packages, GPUs, setup/teardown, hook, info), with image requests."""

from __future__ import annotations

from stages.rewrite.engines.base import Engine, Generation

RecapRequest = tuple[str, bytes, int]  # (alt-text as prompted, encoded image bytes, seed)


class RecapEngine(Engine):
    """One engine: generation inside the stage (``generate``) and/or the ``ray.data.llm`` processor it
    describes (``hook``). ``config`` is the stage's ``RecaptionConfig``; ``self.engine`` its sub-config;
    ``prompts`` a ``RecapPrompts``."""

    @property
    def max_retries(self) -> int:
        """New attempts (a new seed) for a rejected caption; none when decoding is greedy."""
        return getattr(self.engine, "max_retries", 0) if self.config.temperature > 0 else 0

    def generate(self, reqs: list[RecapRequest]) -> list[Generation]:  # type: ignore[override]
        """One generation per request, in order (each request carries its seed)."""
        raise RuntimeError(self.without_ray)


__all__ = ["Generation", "RecapEngine", "RecapRequest"]
