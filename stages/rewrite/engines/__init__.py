"""The rewrite stage's engines, one module each, by the ``type`` of the ``engine`` config."""

from __future__ import annotations

from stages.rewrite.engines.base import Engine
from stages.rewrite.engines.openai_engine import OpenAIEngine
from stages.rewrite.engines.transformers_engine import TransformersEngine
from stages.rewrite.engines.vllm_engine import VLLMEngine
from stages.rewrite.prompt import Prompts

ENGINES: dict[str, type[Engine]] = {e.type: e for e in (TransformersEngine, OpenAIEngine, VLLMEngine)}


def build(config, prompts: Prompts) -> Engine:
    """The engine of a ``RewriteConfig``."""
    return ENGINES[config.engine.type](config, prompts)
