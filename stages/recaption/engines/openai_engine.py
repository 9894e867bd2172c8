"""The ``openai`` engine of the recaption stage: any OpenAI-compatible ``/v1/chat/completions`` endpoint
that accepts ``image_url`` content parts with ``data:`` URIs (``vllm serve`` of a VLM, hosted APIs).

The HTTP client (thread pool, ``qps`` pacing, retries with backoff on 429/5xx and connection errors,
headers from environment variables) is the ``rewrite`` stage's; only the request body differs: the chat
messages carry the row's image bytes as a base64 data URI. Under Ray: ``HttpRequestProcessorConfig``.
"""

from __future__ import annotations

import functools
from typing import Any

from stages.base import ProcessorHook
from stages.recaption.engines.base import Generation, RecapEngine, RecapRequest
from stages.recaption.prompt import RecapPrompts, data_uri
from stages.recaption.raypath import RecapRayPath
from stages.rewrite.engines.openai_engine import OpenAIEngine, endpoint, http_headers, http_session, http_text


def request_body(config, prompts: RecapPrompts, caption: str, image: bytes, seed: int) -> dict[str, Any]:
    """The chat completion request of one row: its image as a data URI, the prompt, the sampling."""
    c = config
    part = {"type": "image_url", "image_url": {"url": data_uri(image)}}
    return {"model": c.engine.model, "messages": prompts.messages(caption, part), "max_tokens": c.max_new_tokens,
            "temperature": c.temperature, "top_p": c.top_p, "seed": seed, "n": 1}  # fmt: skip


def _payload(config, prompts, caption: str, image: bytes, seed: int) -> dict[str, Any]:
    return {"payload": request_body(config, prompts, caption, image, seed)}


class RecapOpenAIEngine(RecapEngine):
    type = "openai"

    def num_gpus(self) -> float:
        return 0.0

    def setup(self) -> None:
        self._client = OpenAIEngine(self.config, self.prompts)  # the rewrite engine's HTTP client
        self._client.setup()

    def teardown(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            client.teardown()
        self._client = None

    @property
    def max_retries(self) -> int:
        return self.engine.max_retries if self.config.temperature > 0 else 0

    def generate(self, reqs: list[RecapRequest]) -> list[Generation]:
        bodies = [request_body(self.config, self.prompts, cap, img, sd) for cap, img, sd in reqs]
        return list(self._client._pool.map(self._client._post, bodies))

    def hook(self) -> ProcessorHook:
        c, e = self.config, self.engine
        rp = RecapRayPath(
            c,
            self.prompts,
            functools.partial(_payload, c, self.prompts),
            functools.partial(http_text, "chat"),
        )
        kwargs = {
            "batch_size": e.processor_batch_size,
            "concurrency": c.concurrency,
            "url": endpoint(c),
            "qps": max(1, round(e.qps)) if e.qps else None,
            "max_retries": e.http_retries,
            "base_retry_wait_time_in_s": e.http_backoff_s,
            "session_factory": functools.partial(http_session, "chat", e.timeout_s),
        }
        return ProcessorHook("HttpRequestProcessorConfig", kwargs, rp.preprocess, rp.postprocess, rp.explode,
                             rp.collect, {"headers": http_headers(e) or None})  # fmt: skip

    def info(self) -> dict[str, Any]:
        return {"base_url": self.engine.base_url, "max_retries": self.max_retries}
