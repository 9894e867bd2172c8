"""The rewrite stage's config: the keys shared by every engine, and one sub-config per engine.

``engine`` is a tagged union on ``type`` (as ``ray.data.llm`` has one config class per engine)::

    engine: {type: transformers, model: demo/assets/toy_lm}
    engine: {type: openai, model: NAME, base_url: http://HOST:8000/v1, api_key_env: KEY_VAR}
    engine: {type: vllm, model: HF_ID, engine_kwargs: {max_model_len: 4096}, accelerator_type: H100}

A key of one engine under another (``base_url`` under ``type: vllm``) is an unknown-key error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from stages.base import ComputeConfig, RoleConfig, path_field
from stages.rewrite.prompt import DEFAULT_SYSTEM_PROMPT, DEFAULT_USER_TEMPLATE, INSTRUCTION, load_bank

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]+$")


def _model_field(what: str, path: bool = False):
    return path_field(description=what) if path else Field(description=what)


def _max_retries_field():
    return Field(
        2, ge=0, description="New attempts (a new example draw and seed) for a rejected rewrite, asked inside "
        "the stage after seeing the output."
    )


def _spares_field():
    return Field(
        2, ge=0, description="`ray.data.llm` path: extra generations per caption that replace rejected ones "
        "(that path cannot ask again after seeing an output)."
    )


def _processor_batch_size_field():
    return Field(
        64, ge=1, description="`ray.data.llm` path: request rows per processor batch (its `batch_size`); "
        "each caption makes `n_rewrites + spares` request rows."
    )


class TransformersEngineConfig(RoleConfig):
    """A local Hugging Face causal LM, generating inside the stage (CPU or GPU)."""

    type: Literal["transformers"] = Field(description="`transformers`: a local causal LM inside the stage.")
    model: str = _model_field("A Hugging Face model folder or Hub id.", path=True)
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto`: cuda when available and `num_gpus` > 0, else cpu."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="`auto`: bfloat16 on GPU, float32 on CPU."
    )
    generate_batch_size: int = Field(
        64, ge=1, description="Prompts per `generate()` call (a row makes up to `n_rewrites` prompts)."
    )
    max_retries: int = _max_retries_field()


class OpenAIEngineConfig(RoleConfig):
    """Any OpenAI-compatible ``/v1/completions`` or ``/v1/chat/completions`` endpoint."""

    type: Literal["openai"] = Field(
        description="`openai`: an OpenAI-compatible endpoint (`vllm serve`, a hosted API); under Ray through "
        "`ray.data.llm`'s `HttpRequestProcessorConfig`, without Ray through the stage's own client."
    )
    model: str = _model_field("The model name the server serves.")
    base_url: str = Field(
        "http://127.0.0.1:8000/v1", description="The API root, ending before `/completions` (http:// or https://)."
    )
    api_key_env: str | None = Field(
        None, description="NAME of the environment variable holding the key (sent as `Bearer`); never the key."
    )
    header_envs: dict[str, str] = Field(
        default_factory=dict,
        description="Extra headers: header name -> NAME of the environment variable holding its value.",
    )
    qps: float | None = Field(
        None, description="Most requests per second per worker (`ray.data.llm` rounds it to an integer); "
        "null: no limit."
    )
    request_concurrency: int = Field(8, ge=1, description="Parallel requests per worker of the stage's own client.")
    http_retries: int = Field(5, ge=0, description="Retries of a request on 429, 5xx and connection errors.")
    http_backoff_s: float = Field(1.0, ge=0.0, description="Base of the exponential backoff between retries (s).")
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one request (s).")
    max_retries: int = _max_retries_field()
    spares: int = _spares_field()
    processor_batch_size: int = _processor_batch_size_field()

    @field_validator("base_url")
    @classmethod
    def _url(cls, v):
        if not re.match(r"^https?://", v):
            raise ValueError("base_url must start with http:// or https://")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v):
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError(
                "must be the NAME of an environment variable (the key itself never goes in the YAML)"
            )
        return v

    @field_validator("header_envs")
    @classmethod
    def _header_envs(cls, v):
        for name, env in v.items():
            if not _HEADER_NAME.match(name) or not _ENV_NAME.match(env):
                raise ValueError(
                    "maps a header name to the NAME of an environment variable holding its value"
                )
        return v


class VLLMEngineConfig(RoleConfig):
    """vLLM replicas through ``ray.data.llm`` (``vLLMEngineProcessorConfig``); needs Ray and GPUs."""

    type: Literal["vllm"] = Field(
        description="`vllm`: vLLM replicas through `ray.data.llm` (`vLLMEngineProcessorConfig`); `concurrency` "
        "replicas of `num_gpus` GPUs each (> 1 sets `tensor_parallel_size`)."
    )
    model: str = _model_field("A Hugging Face model id or folder that vLLM can load.", path=True)
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine kwargs (`max_model_len`, `enable_prefix_caching`, `gpu_memory_utilization`, ...).",
    )
    accelerator_type: str | None = Field(
        None, description="GPU type the replicas need (`H100`, `A100`, `L4`, ...); null: any."
    )
    spares: int = _spares_field()
    processor_batch_size: int = _processor_batch_size_field()


EngineConfig = TransformersEngineConfig | OpenAIEngineConfig | VLLMEngineConfig


class RewriteConfig(ComputeConfig):
    engine: EngineConfig = Field(
        discriminator="type",
        description="Which LLM generates, and its own keys: a mapping with `type` (`transformers`, `openai` "
        "or `vllm`) and `model` (see the engine tables below).",
    )
    mode: Literal["completion", "chat"] = Field(
        "completion", description="`chat`: a system prompt and a user message (instruct models)."
    )
    instruction: str = Field(INSTRUCTION, description="The prompt's first line (LaCLIP's).")
    example_separator: str = Field("\n\n", description="Between the prompt's parts (LaCLIP: a blank line).")
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="Chat mode: the system message.")
    user_template: str = Field(
        DEFAULT_USER_TEMPLATE,
        description="Chat mode: the user message; `{prompt}` = the LaCLIP few-shot prompt, `{caption}` = the caption.",
    )
    bank: str | None = path_field(
        None, always=True, description='JSONL of {"source", "target"} example pairs; null: stages/data/laclip_bank.jsonl.'
    )
    k: int = Field(3, ge=0, description="Examples per prompt.")
    n_rewrites: int = Field(4, ge=1, description="Rewrites kept per caption.")
    temperature: float = Field(0.9, ge=0.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(77, ge=1, description="Most tokens generated per rewrite.")
    seed: int = Field(0, description="Seeds the example draws and the sampling.")
    max_input_chars: int = Field(500, ge=1, description="Captions are cut to this length before prompting.")
    max_chars: int = Field(300, ge=1, description="Rewrites longer than this are rejected.")
    batch_size: int = Field(
        64, ge=1, description="Rows per `process` call (the stage's micro-batch); the engines' own batches are "
        "`generate_batch_size` and `processor_batch_size`."
    )

    @model_validator(mode="after")
    def _check(self):
        if self.bank is not None and not Path(self.bank).is_file():
            raise ValueError(f"bank file not found: {self.bank}")
        n_bank = len(load_bank(self.bank))
        if self.k > n_bank:
            raise ValueError(f"k={self.k} but the bank has only {n_bank} pairs")
        try:
            self.user_template.format(prompt="", caption="")
        except (KeyError, IndexError, ValueError):
            raise ValueError("user_template may only use {prompt} and {caption}") from None
        return self
