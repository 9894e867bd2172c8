"""The recaption stage's config: the prompt modes, the sampling, and one sub-config per engine.

``engine`` is a tagged union on ``type``, as in ``rewrite`` (the same keys, plus the image keys of vLLM)::

    engine: {type: transformers, model: demo/assets/toy_vlm}
    engine: {type: openai, model: NAME, base_url: http://HOST:8000/v1, api_key_env: KEY_VAR}
    engine: {type: vllm, model: Qwen/Qwen2.5-VL-7B-Instruct, limit_mm_per_prompt: {image: 1}}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from stages.base import ComputeConfig
from stages.rewrite.config import OpenAIEngineConfig, TransformersEngineConfig, VLLMEngineConfig

ALT_MARKER = "Alt-text:"
DEFAULT_SCRATCH_PROMPT = "Describe this image in one sentence for an image-text training set."
DEFAULT_ALTOGETHER_PROMPT = (
    "Here is the alt-text that came with this image. Correct it and complete it so that it describes the "
    "image: fix what the image contradicts, keep its names, places and numbers, and answer with the "
    "caption only, on one line.\n" + ALT_MARKER + " {caption}"
)
DEFAULT_SYSTEM_PROMPT = "You write accurate, concise captions of images."


def _retries_field():
    return Field(
        2,
        ge=0,
        description="New attempts (a new seed) for a rejected caption; only when `temperature` > 0 "
        "(greedy decoding would answer the same).",
    )


class RecapTransformersEngineConfig(TransformersEngineConfig):
    """A local Hugging Face vision-language model (``AutoModelForImageTextToText``) inside the stage."""

    type: Literal["transformers"] = Field(
        description="`transformers`: a local vision-language model inside the stage (an encoder-decoder such as "
        "`VisionEncoderDecoderModel`, or a chat VLM with an `AutoProcessor`)."
    )

    generate_batch_size: int = Field(
        64, ge=1, description="Images per `generate()` call (encoder-decoder models: per prefix length)."
    )
    max_retries: int = _retries_field()


class RecapOpenAIEngineConfig(OpenAIEngineConfig):
    """Any OpenAI-compatible ``/v1/chat/completions`` endpoint that accepts ``image_url`` data URIs."""

    max_retries: int = _retries_field()
    spares: int = Field(0, ge=0, le=0, description="Not used by recaption (one generation per row).")
    processor_batch_size: int = Field(
        64, ge=1, description="`ray.data.llm` path: rows per processor batch (its `batch_size`)."
    )


class RecapVLLMEngineConfig(VLLMEngineConfig):
    """A vision-language model on vLLM through ``ray.data.llm`` (its multimodal stage); needs Ray and GPUs."""

    spares: int = Field(0, ge=0, le=0, description="Not used by recaption (one generation per row).")
    processor_batch_size: int = Field(
        64, ge=1, description="`ray.data.llm` path: rows per processor batch (its `batch_size`)."
    )
    limit_mm_per_prompt: dict[str, int] = Field(
        default_factory=lambda: {"image": 1},
        description="vLLM's `limit_mm_per_prompt` (engine kwarg): most items of each modality per prompt.",
    )
    image_format: Literal["data_uri", "pil"] = Field(
        "data_uri",
        description="How the row's image bytes reach `ray.data.llm`'s multimodal stage: a base64 `data:` URI in "
        "an `image_url` part, or a decoded PIL image in an `image` part.",
    )


EngineConfig = RecapTransformersEngineConfig | RecapOpenAIEngineConfig | RecapVLLMEngineConfig


class RecaptionConfig(ComputeConfig):
    engine: EngineConfig = Field(
        discriminator="type",
        description="Which vision-language model captions, and its own keys: a mapping with `type` "
        "(`transformers`, `openai` or `vllm`) and `model` (the keys of the rewrite engines; vllm adds "
        "`limit_mm_per_prompt` and `image_format`).",
    )
    prompt_mode: Literal["scratch", "altogether"] = Field(
        "altogether",
        description="`scratch`: caption the image alone; `altogether`: give the alt-text and ask for it "
        "corrected and completed from the image (Altogether), keeping names, places and numbers.",
    )
    scratch_prompt: str = Field(
        DEFAULT_SCRATCH_PROMPT, description="`scratch` mode: the user message's text."
    )
    altogether_prompt: str = Field(
        DEFAULT_ALTOGETHER_PROMPT,
        description="`altogether` mode: the user message's text; `{caption}` = the alt-text.",
    )
    system_prompt: str | None = Field(
        DEFAULT_SYSTEM_PROMPT,
        description="The system message (null: none; some VLM chat templates have no system role).",
    )
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(77, ge=1, description="Most tokens generated per caption.")
    seed: int = Field(0, description="Seeds the sampling (per row, from the seed and the row's key).")
    max_input_chars: int = Field(500, ge=1, description="Alt-texts are cut to this length before prompting.")
    max_chars: int = Field(400, ge=1, description="Captions longer than this are rejected.")
    batch_size: int = Field(
        64,
        ge=1,
        description="Rows per `process` call (the stage's micro-batch); the engines' own batches are "
        "`generate_batch_size` and `processor_batch_size`.",
    )

    @property
    def mode(self) -> str:
        """Requests are always chat requests (the rewrite engines' helpers read ``mode``)."""
        return "chat"

    @model_validator(mode="after")
    def _check(self):
        try:
            self.altogether_prompt.format(caption="")
        except (KeyError, IndexError, ValueError):
            raise ValueError("altogether_prompt may only use {caption}") from None
        if self.prompt_mode == "altogether" and "{caption}" not in self.altogether_prompt:
            raise ValueError("altogether_prompt must contain {caption} (the alt-text)")
        return self

    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed}  # fmt: skip
