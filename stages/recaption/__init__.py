"""Recaptioning with a vision-language model: ``caption_recap`` and ``recap_reason`` (``recaption``), and
the fusion of the alt-text with it by an LLM: ``caption_fused`` and ``fuse_reason`` (``fuse``).

Method (Recap-DataComp-1B, Altogether, VeCLIP, BLIP3-KALE):

* **recaption** captions each ``ok`` row from its stored image bytes (no second download). Prompt modes:
  ``scratch`` (the image alone) and ``altogether`` (the alt-text is given and the model corrects and
  completes it, keeping names, places and numbers). Greedy by default; sampling is seeded per row.
  Engines, as for ``rewrite``: ``transformers`` (a local ``AutoModelForImageTextToText`` folder),
  ``openai`` (chat completions with ``image_url`` data URIs), ``vllm`` (``ray.data.llm`` with its
  multimodal stage). A row that gets no caption keeps its alt-text, ``caption_recap`` is null and the
  reason is in ``recap_reason``; rows are never dropped here.
* **fuse** (``stages/recaption/fuse.py``) is the ``rewrite`` stage with one output per row whose input
  is built from the alt-text and the recaption; it writes ``caption_fused`` (the alt-text where fusion
  fails, with ``fuse_reason``).
* The ``clip_score`` stage scores any caption column (``text_column``) into its own score column, so
  ``clip_filter`` can keep the pairs whose best caption passes (a rule over several ``columns``), and
  the writer picks the training caption per sample (``write.caption_choice``: ``original``, ``recap``,
  ``fused`` or a seeded per-sample ``mix``; ``stages/caption_choice.py``).

Modules: ``config``, ``prompt`` (messages, data URIs), ``engines/`` (one per engine), ``raypath`` (the
``ray.data.llm`` row functions), ``stage`` (``Recaption``), ``fuse`` (``Fuse``), ``eval`` (colour/shape
accuracy on the demo world).
"""

from stages.recaption.config import (
    RecaptionConfig,
    RecapTransformersEngineConfig,
    RecapVLLMEngineConfig,
)
from stages.recaption.fuse import Fuse, FuseConfig
from stages.recaption.prompt import RecapPrompts, data_uri, decode_data_uri
from stages.recaption.stage import Recaption

__all__ = [
    "Fuse",
    "FuseConfig",
    "RecapPrompts",
    "RecapTransformersEngineConfig",
    "RecapVLLMEngineConfig",
    "Recaption",
    "RecaptionConfig",
    "data_uri",
    "decode_data_uri",
]
