"""What every engine of the rewrite stage provides (Ray-free)."""

from __future__ import annotations

from typing import Any, ClassVar

from stages.base import ProcessorHook
from stages.rewrite.prompt import Prompts

Generation = tuple[str | None, str | None]  # (text, error): one of them is None
Request = tuple[str, list[int], int]  # (caption, example indices, seed)


class Engine:
    """One engine: generation inside the stage (``generate``) and/or the ``ray.data.llm`` processor it
    describes (``hook``). ``config`` is the stage's ``RewriteConfig``; ``self.engine`` its sub-config."""

    type: ClassVar[str] = ""
    in_stage: ClassVar[bool] = True  # generates inside the stage (without Ray)
    without_ray: ClassVar[str] = ""  # why not, when it does not

    def __init__(self, config, prompts: Prompts):
        self.config = config
        self.engine = config.engine
        self.prompts = prompts

    @property
    def max_retries(self) -> int:
        """New attempts for a rejected rewrite inside the stage."""
        return getattr(self.engine, "max_retries", 0)

    def packages(self) -> list[tuple[str, str, str]]:
        """(import name, config key, install hint) of the optional packages this engine needs."""
        return []

    def num_gpus(self) -> float:
        """GPUs each worker of this engine holds."""
        return self.config.num_gpus

    def setup(self) -> None:
        """Load the model or open sessions (once per worker)."""

    def teardown(self) -> None:
        """Release what ``setup`` opened."""

    def generate(self, reqs: list[Request], round_seed: int) -> list[Generation]:
        """One generation per request, in order. ``round_seed`` seeds engines that sample locally."""
        raise RuntimeError(self.without_ray)

    def hook(self) -> ProcessorHook | None:
        """The ``ray.data.llm`` processor that replaces the row map under Ray (None: the row map)."""
        return None

    def info(self) -> dict[str, Any]:
        """Engine keys for the manifest (never secrets)."""
        return {}
