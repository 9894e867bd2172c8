"""The recaption stage's engines, one module each, by the ``type`` of the ``engine`` config."""

from __future__ import annotations

from stages.recaption.engines.base import RecapEngine
from stages.recaption.engines.openai_engine import RecapOpenAIEngine
from stages.recaption.engines.transformers_engine import RecapTransformersEngine
from stages.recaption.engines.vllm_engine import RecapVLLMEngine
from stages.recaption.prompt import RecapPrompts

ENGINES: dict[str, type[RecapEngine]] = {
    e.type: e for e in (RecapTransformersEngine, RecapOpenAIEngine, RecapVLLMEngine)
}


def build(config, prompts: RecapPrompts) -> RecapEngine:
    """The engine of a ``RecaptionConfig``."""
    return ENGINES[config.engine.type](config, prompts)
