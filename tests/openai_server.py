"""A small OpenAI-compatible HTTP server for the tests; it stands in for vLLM's (``vllm serve``).

vLLM cannot run on these machines, so the ``openai`` engine of the ``rewrite`` stage is tested against
this server instead: a real HTTP server on 127.0.0.1 that serves a Hugging Face causal LM (the demo's
toy LM) through ``transformers`` with the same request and response shapes as vLLM's
OpenAI-compatible server:

* ``POST /v1/completions`` — ``prompt`` (a string or a list), ``max_tokens``, ``temperature``,
  ``top_p``, ``stop``, ``seed``, ``n``; answers ``choices[i].text``.
* ``POST /v1/chat/completions`` — ``messages`` through the tokenizer's chat template; answers
  ``choices[i].message.content``.
* ``GET /v1/models``.

With ``vlm_dir`` (the demo's toy VLM) a chat request whose messages hold an ``image_url`` part with a
base64 ``data:`` URI, as vLLM's server accepts them for vision-language models, is answered by that
model through the ``recaption`` stage's transformers engine (``generate_messages``); a URL that is not
a data URI is a 400.

Failure injection: with ``fail_500_every=N`` every N-th POST is answered ``500`` and with
``fail_429_every=M`` every M-th ``429`` (with ``Retry-After: 0``), both with an OpenAI-style JSON error
body. ``fail_500_when(request_json)`` (called under the server's lock) answers ``500`` to the requests it
returns True for. ``api_key`` makes it require ``Authorization: Bearer <key>`` (401 otherwise). ``log``
records ``(path, status)`` of every POST, ``headers_log`` the ``record_headers`` of every POST.

    with ToyLMServer("demo/assets/toy_lm", fail_500_every=4) as server:
        server.base_url   # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ToyLMServer:
    def __init__(
        self,
        model_dir: str,
        model_name: str = "toy-lm",
        fail_500_every: int = 0,
        fail_429_every: int = 0,
        api_key: str | None = None,
        fail_500_when=None,
        record_headers: tuple[str, ...] = (),
        vlm_dir: str | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = model_name
        self.fail_500_every = fail_500_every
        self.fail_429_every = fail_429_every
        self.api_key = api_key
        self.fail_500_when = fail_500_when
        self.record_headers = record_headers
        self.headers_log: list[dict[str, str | None]] = []
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.log: list[tuple[str, int]] = []
        self.vlm = None
        if vlm_dir is not None:
            from stages.recaption.config import RecaptionConfig
            from stages.recaption.engines.transformers_engine import RecapTransformersEngine
            from stages.recaption.prompt import RecapPrompts

            cfg = RecaptionConfig(engine={"type": "transformers", "model": vlm_dir, "device": "cpu"})
            self.vlm = RecapTransformersEngine(cfg, RecapPrompts(cfg))
            self.vlm.setup()
        self._count = 0
        self._lock = threading.Lock()  # one generation at a time; also guards the counters
        self._httpd: ThreadingHTTPServer | None = None

    # ---- lifecycle ----
    def __enter__(self) -> ToyLMServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(
                        200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]}
                    )
                else:
                    self._send(404, _error("not found", 404))

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                status, body, extra = server.handle(self.path, self.headers, raw)
                self._send(status, body, extra)

            def _send(self, status: int, body: dict, extra: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for _, status in self.log:
            out[status] = out.get(status, 0) + 1
        return out

    # ---- requests ----
    def handle(self, path: str, headers, raw: bytes) -> tuple[int, dict, dict | None]:
        path = path.rstrip("/")
        with self._lock:
            self._count += 1
            n = self._count
            if self.record_headers:
                self.headers_log.append({h: headers.get(h) for h in self.record_headers})
        if self.api_key is not None and headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._logged(path, 401, _error("invalid api key", 401))
        if self.fail_500_every and n % self.fail_500_every == 0:
            return self._logged(path, 500, _error("injected internal error", 500))
        if self.fail_429_every and n % self.fail_429_every == 0:
            return self._logged(path, 429, _error("injected rate limit", 429), {"Retry-After": "0"})
        try:
            req = json.loads(raw)
        except ValueError:
            return self._logged(path, 400, _error("body is not JSON", 400))
        if self.fail_500_when is not None:
            with self._lock:
                refuse = self.fail_500_when(req)
            if refuse:
                return self._logged(path, 500, _error("injected internal error", 500))
        if path == "/v1/completions":
            prompts = req.get("prompt")
            prompts = [prompts] if isinstance(prompts, str) else prompts
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                return self._logged(path, 400, _error("'prompt' must be a string or a list of strings", 400))
            obj, chat = "text_completion", False
        elif path == "/v1/chat/completions":
            messages = req.get("messages")
            if not isinstance(messages, list):
                return self._logged(path, 400, _error("'messages' must be a list", 400))
            images = _images(messages)
            if images:
                return self._logged(path, *self._vision(req, messages, images, n))
            prompts = [self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]
            obj, chat = "chat.completion", True
        else:
            return self._logged(path, 404, _error(f"no route {path}", 404))
        choices = []
        n_out = int(req.get("n") or 1)
        for p in prompts:
            for j in range(n_out):
                seed = req.get("seed")
                text, reason = self.generate(p, req, None if seed is None else int(seed) + j)
                i = len(choices)
                if chat:
                    choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                    "finish_reason": reason})  # fmt: skip
                else:
                    choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
        body = {"id": f"cmpl-{n}", "object": obj, "created": int(time.time()), "model": self.model_name,
                "choices": choices}  # fmt: skip
        return self._logged(path, 200, body)

    def _vision(self, req: dict, messages: list, images: list, n: int) -> tuple[int, dict]:
        """A chat completion of the toy VLM for messages with one image (a data: URI)."""
        from stages.recaption.prompt import decode_data_uri

        if self.vlm is None:
            return 400, _error("this server has no vision model (vlm_dir)", 400)
        if len(images) != 1:
            return 400, _error("exactly one image per request", 400)
        try:
            data = decode_data_uri(images[0])
        except ValueError as e:
            return 400, _error(f"image_url: {e}", 400)
        update = {
            "temperature": float(req.get("temperature", 0.0)),
            "max_new_tokens": int(req.get("max_tokens") or 32),
        }
        with self._lock:
            self.vlm.config = self.vlm.config.model_copy(update=update)
            ((text, err),) = self.vlm.generate_messages([(messages, data, int(req.get("seed") or 0))])
        if err:
            return 400, _error(err, 400)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        return 200, {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                     "model": self.model_name, "choices": [choice]}  # fmt: skip

    def _logged(self, path: str, status: int, body: dict, extra: dict | None = None):
        with self._lock:
            self.log.append((path, status))
        return status, body, extra

    def generate(self, prompt: str, req: dict[str, Any], seed: int | None) -> tuple[str, str]:
        import torch

        temperature = float(req.get("temperature", 1.0))
        max_tokens = int(req.get("max_tokens") or 16)
        stop = req.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        enc = self.tok(prompt, return_tensors="pt")
        kwargs: dict[str, Any] = {"do_sample": temperature > 0}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=float(req.get("top_p", 1.0)))
        with self._lock, torch.random.fork_rng(devices=[]), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(
                **enc, max_new_tokens=max_tokens, pad_token_id=self.tok.pad_token_id, **kwargs
            )
        new = out[0, enc["input_ids"].shape[1] :]
        text = self.tok.decode(new, skip_special_tokens=True)
        cuts = [text.index(s) for s in stop if s and s in text]
        if cuts:
            return text[: min(cuts)], "stop"
        ended = len(new) and int(new[-1]) == self.tok.eos_token_id
        return text, "stop" if ended or len(new) < max_tokens else "length"


def _images(messages: list) -> list[str]:
    """The ``image_url`` URLs of chat messages (OpenAI content parts)."""
    urls = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = part.get("image_url")
                urls.append(url.get("url", "") if isinstance(url, dict) else str(url))
    return urls


def _error(message: str, code: int) -> dict:
    return {"error": {"message": message, "type": "server_error" if code >= 500 else "invalid_request_error",
                      "code": code}}  # fmt: skip
