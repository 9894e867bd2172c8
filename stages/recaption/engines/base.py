"""What every engine of the recaption stage provides (Ray-free)."""

from __future__ import annotations

from typing import Any, ClassVar

from stages.base import ProcessorHook
from stages.recaption.prompt import RecapPrompts

Generation = tuple[str | None, str | None]  # (text, error): one of them is None
RecapRequest = tuple[str, bytes, int]  # (alt-text as prompted, encoded image bytes, seed)


class RecapEngine:
    """One engine: generation inside the stage (``generate``) and/or the ``ray.data.llm`` processor it
    describes (``hook``). ``config`` is the stage's ``RecaptionConfig``; ``self.engine`` its sub-config."""

    type: ClassVar[str] = ""
    in_stage: ClassVar[bool] = True
    without_ray: ClassVar[str] = ""

    def __init__(self, config, prompts: RecapPrompts):
        self.config = config
        self.engine = config.engine
        self.prompts = prompts

    @property
    def max_retries(self) -> int:
        """New attempts (a new seed) for a rejected caption; none when decoding is greedy."""
        return getattr(self.engine, "max_retries", 0) if self.config.temperature > 0 else 0

    def packages(self) -> list[tuple[str, str, str]]:
        return []

    def num_gpus(self) -> float:
        return self.config.num_gpus

    def setup(self) -> None:
        """Load the model or open sessions (once per worker)."""

    def teardown(self) -> None:
        """Release what ``setup`` opened."""

    def generate(self, reqs: list[RecapRequest]) -> list[Generation]:
        raise RuntimeError(self.without_ray)

    def hook(self) -> ProcessorHook | None:
        return None

    def info(self) -> dict[str, Any]:
        return {}
