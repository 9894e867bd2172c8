"""LaCLIP caption rewriting: ``caption_rewrites`` (list<string>) and ``rewrite_reason`` (string).

The method follows LaCLIP (Fan et al., NeurIPS 2023; ``LijieFan/LaCLIP`` ``rewrite/llama_rewrite.py``):

* **Prompt (completion mode).** The instruction ``write image captions differently,``, then ``k = 3``
  example pairs ``source => target`` drawn at random from a bank of meta input-output pairs, then
  ``{caption} =>``; parts are separated by a blank line, as in LaCLIP. The model continues after
  ``=>`` and its output is cut at the first newline (and at a further ``=>``, as LaCLIP's
  ``split('=>')[1]`` does). The draw is seeded per row and per rewrite from ``(seed, key, rewrite,
  attempt)``, so reruns give the same prompts.
* **Chat mode** for instruct models: a system prompt plus a user message (both config strings); by
  default the user message is the same few-shot prompt.
* **Sampling:** temperature 0.9, top_p 0.95, at most 77 new tokens; ``n_rewrites = 4`` per caption.
* **Validation:** whitespace is normalised; empty outputs, echoes (the caption itself, the instruction,
  a leftover ``=>``), outputs longer than ``max_chars``, copies of the prompt's examples and duplicates
  of an earlier rewrite of the same caption are rejected. A rejected rewrite is asked again (a new
  example draw and seed) up to ``max_retries`` times. A row that gets no valid rewrite keeps its
  original caption, ``caption_rewrites = []`` and the reason in ``rewrite_reason``; its status stays
  ``ok`` (rows are never dropped here). ``rewrite_reason`` is null when all ``n_rewrites`` succeeded.

Engines (``engine: {type: ..., model: ..., ...}``, one config class each, a union tagged by ``type``):

* ``transformers`` — a local Hugging Face causal LM inside the stage (``engines/transformers_engine.py``).
* ``openai`` — any OpenAI-compatible endpoint (``engines/openai_engine.py``): the stage's own HTTP
  client without Ray, ``ray.data.llm``'s ``HttpRequestProcessorConfig`` under Ray.
* ``vllm`` — vLLM through ``ray.data.llm``'s ``vLLMEngineProcessorConfig`` (``engines/vllm_engine.py``).

``Rewrite.dataset_hook()`` describes the ``ray.data.llm`` processor of the last two (a Ray-free
``ProcessorHook``; the row functions are in ``raypath.py``), which ``pipeline/ray`` applies instead of
the row map. That path cannot ask again after seeing an output; its retries are the engine's ``spares``.

Modules: ``prompt`` (bank, seeded draws, prompts), ``validate`` (cleaning, rejection rules, per-row
collection), ``config`` (the configs), ``engines/`` (one module per engine), ``raypath`` (explode,
pre/postprocess, collect), ``stage`` (the ``Rewrite`` stage).

Tar members are the writer's: ``write.caption_member`` (``original`` | ``rewrite``: the first rewrite
in ``KEY.txt``) and ``write.rewrite_members`` (each rewrite as ``KEY.rewrite{i}.txt``); the rewrites are
always in the sample's ``.json`` and in the shard Parquet.
"""

from stages.rewrite.config import (
    OpenAIEngineConfig,
    RewriteConfig,
    TransformersEngineConfig,
    VLLMEngineConfig,
)
from stages.rewrite.engines.openai_engine import http_session, parse_openai_response
from stages.rewrite.prompt import (
    DEFAULT_BANK,
    DEFAULT_SYSTEM_PROMPT,
    INSTRUCTION,
    Prompts,
    completion_prompt,
    draw_examples,
    load_bank,
)
from stages.rewrite.raypath import CARRY, RAY_ERROR, SLOT, RayPath
from stages.rewrite.stage import Rewrite
from stages.rewrite.validate import RowRewrites, clean_output

__all__ = [
    "CARRY",
    "DEFAULT_BANK",
    "DEFAULT_SYSTEM_PROMPT",
    "INSTRUCTION",
    "RAY_ERROR",
    "SLOT",
    "OpenAIEngineConfig",
    "Prompts",
    "RayPath",
    "Rewrite",
    "RewriteConfig",
    "RowRewrites",
    "TransformersEngineConfig",
    "VLLMEngineConfig",
    "clean_output",
    "completion_prompt",
    "draw_examples",
    "http_session",
    "load_bank",
    "parse_openai_response",
]
