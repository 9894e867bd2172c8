"""The ``openai`` engine: any OpenAI-compatible ``/v1/completions`` or ``/v1/chat/completions`` endpoint
(``vllm serve``, a hosted API).

Headers come from environment variables named in the config (``api_key_env``, ``header_envs``), never
from the YAML, and reach ``ray.data.llm`` only through ``ProcessorHook.secret_kwargs``. Without Ray the
stage uses its own thin client (a thread pool, ``qps`` pacing, retries with exponential backoff on
429/5xx and connection errors). Under Ray it runs as ``ray.data.llm``'s ``HttpRequestProcessorConfig``,
whose HTTP retries (429, 408, 502-504) are Ray's own; Ray does not retry a 500, which then counts as a
failed generation. :func:`http_session` (Ray's ``session_factory``) reduces every response to
``{"text", "error"}``, so that error bodies and non-JSON pages neither break Ray's block concatenation
nor fail the batch.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from typing import Any

from stages.base import ProcessorHook
from stages.rewrite.engines.base import Engine, Generation, Request
from stages.rewrite.prompt import STOP, Prompts
from stages.rewrite.raypath import RayPath


def endpoint(config) -> str:
    """The URL requests go to (``config``: a ``RewriteConfig`` with an openai engine)."""
    return config.engine.base_url.rstrip("/") + ("/chat/completions" if config.mode == "chat" else "/completions")


def request_body(config, prompts: Prompts, caption: str, examples: list[int], seed: int) -> dict[str, Any]:
    """The OpenAI-compatible request body for one generation."""
    c = config
    body: dict[str, Any] = {"model": c.engine.model, "max_tokens": c.max_new_tokens, "temperature": c.temperature,
                            "top_p": c.top_p, "stop": list(STOP), "seed": seed, "n": 1}  # fmt: skip
    if c.mode == "chat":
        body["messages"] = prompts.messages(caption, examples)
    else:
        body["prompt"] = prompts.prompt(caption, examples)
    return body


def _payload(config, prompts: Prompts, caption: str, examples: list[int], seed: int) -> dict[str, Any]:
    return {"payload": request_body(config, prompts, caption, examples, seed)}


def http_headers(engine) -> dict[str, str]:
    """The request headers, read from the environment variables the engine config names."""
    headers = {}
    if engine.api_key_env:
        key = os.environ.get(engine.api_key_env)
        if not key:
            raise RuntimeError(f"rewrite: environment variable {engine.api_key_env} (api_key_env) is not set")
        headers["Authorization"] = f"Bearer {key}"
    for name, env in engine.header_envs.items():
        if env not in os.environ:
            raise RuntimeError(f"rewrite: environment variable {env} (header {name}) is not set")
        headers[name] = os.environ[env]
    return headers


def parse_openai_response(resp: Any, mode: str) -> str:
    """The generated text of an OpenAI-compatible completion or chat completion response."""
    if not isinstance(resp, dict):
        raise ValueError("response is not a JSON object")
    if resp.get("error"):
        err = resp["error"]
        raise ValueError(str(err.get("message", err) if isinstance(err, dict) else err))
    choices = resp.get("choices") or []
    if not choices:
        raise ValueError("no choices")
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") if mode == "chat" else choice.get("text")
    if text is None:
        raise ValueError("choice has no text")
    return text


def http_session(mode: str, timeout_s: float):
    """The aiohttp session of ray.data.llm's HTTP stage (its ``session_factory``).

    Its responses' ``json()`` returns ``{"text": ..., "error": ...}`` instead of the endpoint's JSON:
    every row then has the same small ``http_response`` struct whatever the endpoint answers (Ray
    cannot concatenate blocks whose nested structs disagree), and a non-JSON error page becomes an
    error string instead of an exception that fails the whole batch. ``timeout_s`` bounds a request."""
    import aiohttp

    return aiohttp.ClientSession(
        response_class=_compact_response(mode), timeout=aiohttp.ClientTimeout(total=timeout_s)
    )


@functools.cache
def _compact_response(mode: str):
    import aiohttp

    class CompactResponse(aiohttp.ClientResponse):
        async def json(self, *, encoding=None, loads=json.loads, content_type=None):
            try:
                data = await super().json(encoding=encoding, loads=loads, content_type=None)
            except ValueError:
                return {"text": None, "error": f"http {self.status}: the body is not JSON"}
            try:
                return {"text": parse_openai_response(data, mode), "error": None}
            except ValueError as e:
                return {"text": None, "error": f"http {self.status}: {e}"[:200]}

    return CompactResponse


def http_text(mode: str, row: dict[str, Any]) -> Generation:
    """(text, error) of a ray.data.llm ``http_response``: the compact form of :func:`http_session`,
    or an endpoint's own JSON."""
    resp = row.get("http_response")
    compact = (
        isinstance(resp, dict) and set(resp) <= {"text", "error"} and not isinstance(resp.get("error"), dict)
    )
    if compact:
        if resp.get("error"):
            return None, f"http_error {resp['error']}"[:120]
        if resp.get("text") is not None:
            return resp["text"], None
    try:
        return parse_openai_response(resp, mode), None
    except ValueError as e:
        return None, f"http_error {e}"[:120]


class OpenAIEngine(Engine):
    type = "openai"

    def num_gpus(self) -> float:
        return 0.0  # the model runs behind the endpoint

    def request_body(self, caption: str, examples: list[int], seed: int) -> dict[str, Any]:
        return request_body(self.config, self.prompts, caption, examples, seed)

    # ---- in-stage client ----
    def setup(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import requests

        self._headers = http_headers(self.engine)
        self._session = requests.Session()
        self._pool = ThreadPoolExecutor(max_workers=self.engine.request_concurrency)
        self._pace_lock = threading.Lock()
        self._next_send = 0.0

    def teardown(self) -> None:
        pool, session = getattr(self, "_pool", None), getattr(self, "_session", None)
        if pool is not None:
            pool.shutdown(wait=True)
        if session is not None:
            session.close()
        self._pool = self._session = None

    def generate(self, reqs: list[Request], round_seed: int) -> list[Generation]:
        bodies = [self.request_body(cap, ex, sd) for cap, ex, sd in reqs]
        return list(self._pool.map(self._post, bodies))

    def _pace(self) -> None:
        if not self.engine.qps:
            return
        with self._pace_lock:
            now = time.monotonic()
            wait = self._next_send - now
            self._next_send = max(now, self._next_send) + 1.0 / self.engine.qps
        if wait > 0:
            time.sleep(wait)

    def _post(self, body: dict[str, Any]) -> Generation:
        import requests

        e = self.engine
        error, retry_after = "http_error", None
        for attempt in range(e.http_retries + 1):
            if attempt:
                time.sleep(self._backoff(attempt - 1, retry_after))
            self._pace()
            try:
                resp = self._session.post(endpoint(self.config), json=body, headers=self._headers, timeout=e.timeout_s)
            except requests.RequestException as exc:
                error = f"http_error {type(exc).__name__}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                error = f"http_error {resp.status_code}"
                retry_after = resp.headers.get("Retry-After") if resp.status_code == 429 else None
                continue
            if resp.status_code != 200:
                return None, f"http_error {resp.status_code}"
            try:
                return parse_openai_response(resp.json(), self.config.mode), None
            except ValueError as exc:
                return None, f"bad_response {exc}"[:80]
        return None, error

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        wait = self.engine.http_backoff_s * (2**attempt)
        if retry_after:
            try:
                wait = max(wait, float(retry_after))
            except ValueError:
                pass
        return min(wait, 60.0)

    # ---- ray.data.llm ----
    def hook(self) -> ProcessorHook:
        c, e = self.config, self.engine
        rp = RayPath(
            c, self.prompts, functools.partial(_payload, c, self.prompts), functools.partial(http_text, c.mode)
        )
        kwargs = {
            "batch_size": e.processor_batch_size,
            "concurrency": c.concurrency,
            "url": endpoint(c),
            "qps": max(1, round(e.qps)) if e.qps else None,  # Ray takes an int, per worker
            "max_retries": e.http_retries,
            "base_retry_wait_time_in_s": e.http_backoff_s,
            "session_factory": functools.partial(http_session, c.mode, e.timeout_s),
        }
        secret = {"headers": http_headers(e) or None}
        return ProcessorHook(
            "HttpRequestProcessorConfig", kwargs, rp.preprocess, rp.postprocess, rp.explode, rp.collect, secret
        )

    def info(self) -> dict[str, Any]:
        e = self.engine
        return {"base_url": e.base_url, "max_retries": e.max_retries, "spares": e.spares}
