"""The ``vllm`` engine of the recaption stage: a vision-language model on vLLM through ``ray.data.llm``
(``vLLMEngineProcessorConfig`` with its ``prepare_multimodal_stage``), the production path on GPUs.

Each request row carries chat ``messages`` whose user message holds the row's image (a base64 ``data:``
URI in an ``image_url`` part, or a decoded PIL image in an ``image`` part: ``image_format``), which the
multimodal stage turns into vLLM's ``multi_modal_data``; the chat template stage renders the prompt with
the model's own template; ``limit_mm_per_prompt`` goes to the engine kwargs. Not run in this repository's
CI (no GPU, no vLLM): the processor configuration is unit-tested (tests/stages/test_recaption_vllm.py).
"""

from __future__ import annotations

import functools
import io
from typing import Any

from stages.base import ProcessorHook
from stages.recaption.engines.base import RecapEngine
from stages.recaption.prompt import RecapPrompts, data_uri
from stages.recaption.raypath import RecapRayPath
from stages.rewrite.engines.vllm_engine import VLLM_INSTALL, engine_kwargs, vllm_text


def image_part(data: bytes, image_format: str) -> dict[str, Any]:
    if image_format == "pil":
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return {"type": "image", "image": im.convert("RGB")}
    return {"type": "image_url", "image_url": {"url": data_uri(data)}}


def vllm_request(config, prompts: RecapPrompts, caption: str, image: bytes, seed: int) -> dict[str, Any]:
    """The fields of one vLLM request row: chat ``messages`` with the image, and ``sampling_params``."""
    c = config
    return {
        "messages": prompts.messages(caption, image_part(image, c.engine.image_format)),
        "sampling_params": {
            "temperature": c.temperature,
            "top_p": c.top_p,
            "max_tokens": c.max_new_tokens,
            "seed": seed,
        },  # fmt: skip
    }


class RecapVLLMEngine(RecapEngine):
    type = "vllm"
    in_stage = False
    without_ray = (
        "engine 'vllm' runs through ray.data.llm under Ray (Recaption.dataset_hook()); without Ray use "
        "engine 'transformers', or engine 'openai' against `vllm serve`"
    )

    def packages(self) -> list[tuple[str, str, str]]:
        return [("vllm", "engine.type", VLLM_INSTALL)]

    def engine_kwargs(self) -> dict[str, Any]:
        kw = engine_kwargs(self.engine.engine_kwargs, self.config.num_gpus)
        kw.setdefault("limit_mm_per_prompt", dict(self.engine.limit_mm_per_prompt))
        return kw

    def hook(self) -> ProcessorHook:
        c, e = self.config, self.engine
        rp = RecapRayPath(c, self.prompts, functools.partial(vllm_request, c, self.prompts), vllm_text)
        kwargs = {
            "batch_size": e.processor_batch_size,
            "concurrency": c.concurrency,
            "model_source": e.model,
            "engine_kwargs": self.engine_kwargs(),
            "accelerator_type": e.accelerator_type,
            "prepare_multimodal_stage": {"enabled": True},  # image parts -> vLLM multi_modal_data
            "chat_template_stage": True,  # the model's own chat template (image placeholder tokens)
            "tokenize_stage": True,
            "detokenize_stage": False,  # vLLM detokenizes itself
            "should_continue_on_error": True,  # a failed request keeps the alt-text, with a reason
        }
        return ProcessorHook(
            "vLLMEngineProcessorConfig", kwargs, rp.preprocess, rp.postprocess, rp.explode, rp.collect
        )

    def info(self) -> dict[str, Any]:
        e = self.engine
        return {"engine_kwargs": self.engine_kwargs(), "accelerator_type": e.accelerator_type,
                "image_format": e.image_format}  # fmt: skip
