"""The ``vllm`` engine: vLLM replicas through ``ray.data.llm`` (``vLLMEngineProcessorConfig``), the
production path on GPU clusters. It has no in-stage generation: without Ray, use the ``transformers``
engine, or the ``openai`` engine against ``vllm serve``."""

from __future__ import annotations

import functools
from typing import Any

from stages.base import ProcessorHook
from stages.rewrite.engines.base import Engine, Generation
from stages.rewrite.prompt import STOP, Prompts
from stages.rewrite.raypath import RayPath

# No vLLM release pins torch 2.14.1 (ours): vllm 0.33.0 pins torch 2.14.0 (README, "vLLM").
VLLM_INSTALL = "on the GPU nodes: pip install vllm==0.33.0; see README, 'vLLM'"


def vllm_request(config, prompts: Prompts, caption: str, examples: list[int], seed: int) -> dict[str, Any]:
    """The fields of one vLLM request row: ``sampling_params`` and ``prompt`` (or chat ``messages``)."""
    c = config
    out: dict[str, Any] = {
        "sampling_params": {"temperature": c.temperature, "top_p": c.top_p, "max_tokens": c.max_new_tokens,
                            "stop": list(STOP), "seed": seed}  # fmt: skip
    }
    if c.mode == "chat":
        out["messages"] = prompts.messages(caption, examples)
    else:
        out["prompt"] = prompts.prompt(caption, examples)
    return out


def engine_kwargs(given: dict[str, Any], num_gpus: float) -> dict[str, Any]:
    """vLLM's engine kwargs: the configured ones, with ``tensor_parallel_size`` = the GPUs of a replica
    when it holds several and none is given."""
    kw = dict(given)
    if num_gpus > 1 and "tensor_parallel_size" not in kw:
        kw["tensor_parallel_size"] = int(num_gpus)
    return kw


def vllm_text(row: dict[str, Any]) -> Generation:
    """(text, error) of a vLLM output row (engine errors arrive as ``__inference_error__``)."""
    return row.get("generated_text"), None


class VLLMEngine(Engine):
    type = "vllm"
    in_stage = False
    without_ray = (
        "engine 'vllm' runs through ray.data.llm under Ray (Rewrite.dataset_hook()); without Ray use "
        "engine 'transformers', or engine 'openai' against `vllm serve`"
    )

    def packages(self) -> list[tuple[str, str, str]]:
        return [("vllm", "engine.type", VLLM_INSTALL)]

    def engine_kwargs(self) -> dict[str, Any]:
        return engine_kwargs(self.engine.engine_kwargs, self.config.num_gpus)

    def hook(self) -> ProcessorHook:
        c, e = self.config, self.engine
        rp = RayPath(c, self.prompts, functools.partial(vllm_request, c, self.prompts), vllm_text)
        kwargs = {
            "batch_size": e.processor_batch_size,
            "concurrency": c.concurrency,
            "model_source": e.model,
            "engine_kwargs": self.engine_kwargs(),
            "accelerator_type": e.accelerator_type,
            "chat_template_stage": c.mode == "chat",
            "tokenize_stage": True,
            "detokenize_stage": False,  # vLLM detokenizes itself (needed for the "\n" stop string)
            "should_continue_on_error": True,  # a failed request becomes a rejected rewrite
        }
        return ProcessorHook(
            "vLLMEngineProcessorConfig", kwargs, rp.preprocess, rp.postprocess, rp.explode, rp.collect
        )

    def info(self) -> dict[str, Any]:
        e = self.engine
        return {"engine_kwargs": self.engine_kwargs(), "accelerator_type": e.accelerator_type, "spares": e.spares}
