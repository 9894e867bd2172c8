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

Engines (``engine:``):

* ``transformers`` — a local Hugging Face causal LM inside the stage: batched ``generate`` with left
  padding, stop at a newline, on CPU or GPU. The engine of the demo (``demo/assets/toy_lm``).
* ``openai`` — any OpenAI-compatible ``/v1/completions`` or ``/v1/chat/completions`` endpoint
  (``vllm serve``, a hosted API). Headers come from environment variables named in the config
  (``api_key_env``, ``header_envs``), never from the YAML. The stage has its own thin HTTP client
  (thread pool, ``qps`` pacing, retries with exponential backoff on 429/5xx and connection errors), so
  it runs without Ray; the executor prefers ``ray.data.llm``'s ``HttpRequestProcessorConfig``
  through :meth:`Rewrite.llm_spec`.
* ``vllm`` — vLLM through ``ray.data.llm`` (``vLLMEngineProcessorConfig``), the production path on GPU
  clusters. This module holds no Ray code: :meth:`Rewrite.llm_spec` returns a plain description (the
  processor kwargs and the row functions) that ``pipeline/executor.py`` turns into a processor.

The Ray path (``llm_spec``): ``ray.data.llm`` engines return one generation per row, so each input row
is exploded into one *carrier* row (the original columns and their Arrow schema; it bypasses the LLM
stages through Ray's ``__inference_error__`` mechanism) plus ``n_rewrites + spares`` light request
rows (key, shard column, caption), and the rows are gathered back by key (or by shard) after the
processor, with the original column types restored. That path cannot re-ask after seeing an output,
so its retries are the ``spares``: extra generations that replace rejected ones. HTTP-level retries
(429, 408, 502-504) are Ray's own (``http_retries``, ``http_backoff_s``); Ray does not retry a 500,
which then counts as a failed generation. :func:`http_session` (Ray's ``session_factory``) reduces
every response to ``{"text", "error"}``, so that error bodies and non-JSON pages neither break Ray's
block concatenation nor fail the batch.

Tar members are the writer's: ``write.caption_member`` (``original`` | ``rewrite``: the first rewrite
in ``KEY.txt``) and ``write.rewrite_members`` (each rewrite as ``KEY.rewrite{i}.txt``); the rewrites are
always in the sample's ``.json`` and in the shard Parquet.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from schemas import OK, conform
from stages.base import ComputeConfig, ProcessorHook, Resources, Stage, replace_column
from stages.read import SHARD_COL  # the executor gathers the Ray path's rows by shard

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BANK = Path(__file__).resolve().parent / "data" / "laclip_bank.jsonl"
INSTRUCTION = "write image captions differently,"
DEFAULT_SYSTEM_PROMPT = (
    "You rewrite image captions for training an image-text model. Keep every fact of the caption "
    "(objects, colours, counts, text, names); change the wording and sentence structure. "
    "Answer with the rewritten caption only, on one line."
)
DEFAULT_USER_TEMPLATE = "{prompt}"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]+$")
# Ray path bookkeeping columns (removed again by ``collect``).
SLOT, CAPTION, EXAMPLES, SCHEMA = "_rw_slot", "_rw_caption", "_rw_examples", "_rw_schema"
TEXT, ERROR = "_rw_text", "_rw_error"
RAY_ERROR = "__inference_error__"  # rows with a non-empty value bypass every ray.data.llm stage
CARRY = "rewrite: carrier row"


# ---- bank and prompt ---------------------------------------------------------------------------


def load_bank(path: str | Path | None = None) -> list[tuple[str, str]]:
    """Read a JSONL bank of ``{"source": ..., "target": ...}`` pairs (one per line)."""
    path = Path(path) if path else DEFAULT_BANK
    pairs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            src, tgt = _one_line(d["source"]), _one_line(d["target"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(
                f"{path}:{i}: expected a JSON object with 'source' and 'target' strings"
            ) from None
        if not src or not tgt:
            raise ValueError(f"{path}:{i}: empty source or target")
        pairs.append((src, tgt))
    return pairs


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def draw_examples(n_bank: int, k: int, seed: int, key: str, slot: int, attempt: int) -> list[int]:
    """The bank indices of one prompt's examples: ``k`` distinct ones, seeded by the row and attempt."""
    return random.Random(f"laclip/{seed}/{key}/{slot}/{attempt}").sample(range(n_bank), k)


def completion_prompt(
    examples: list[tuple[str, str]], caption: str, instruction: str = INSTRUCTION, separator: str = "\n\n"
) -> str:
    """The LaCLIP in-context prompt: instruction, ``source => target`` pairs, then ``caption =>``."""
    parts = [instruction] + [f"{s} => {t}" for s, t in examples] + [f"{caption} =>"]
    return separator.join(parts)


def clean_output(raw: str | None) -> str:
    """Cut a generation the LaCLIP way (first line, text before a further ``=>``), normalise spaces,
    and drop quotes around the whole answer (chat models add them)."""
    text = (raw or "").lstrip().split("\n", 1)[0].split("=>", 1)[0]
    text = _one_line(text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def _norm(text: str) -> str:
    return _one_line(text).lower().rstrip(" .!")


class _RowRewrites:
    """Collects the accepted rewrites of one caption and counts why others were rejected."""

    def __init__(self, caption: str, config: RewriteConfig, bank: list[tuple[str, str]]):
        self.caption = caption
        self.config = config
        self.bank = bank
        self.accepted: dict[int, str] = {}  # slot -> rewrite
        self.rejected: Counter[str] = Counter()
        self._seen = {_norm(caption)}

    def rejection(self, text: str, examples: list[int]) -> str | None:
        """Why ``text`` (already cleaned) is not a valid rewrite, or None."""
        if not text:
            return "empty"
        if len(text) > self.config.max_chars:
            return "too_long"
        low = _norm(text)
        instruction = _norm(self.config.instruction)
        if low == _norm(self.caption) or (instruction and instruction in low):
            return "echo"
        ex = self.bank
        if any(low in (_norm(ex[i][0]), _norm(ex[i][1])) for i in examples):
            return "copied_example"
        if low in self._seen:
            return "duplicate"
        return None

    def offer(self, slot: int, raw: str | None, examples: list[int], error: str | None = None) -> str | None:
        """Take one generation for ``slot``; returns the rejection reason (None when accepted)."""
        text = clean_output(raw)
        reason = error or self.rejection(text, examples)
        if reason:
            self.rejected[reason] += 1
            return reason
        self.accepted[slot] = text
        self._seen.add(_norm(text))
        return None

    def result(self) -> tuple[list[str], str | None]:
        rewrites = [self.accepted[s] for s in sorted(self.accepted)][: self.config.n_rewrites]
        why = ", ".join(f"{k} x{v}" for k, v in sorted(self.rejected.items()))
        if len(rewrites) == self.config.n_rewrites:
            return rewrites, None
        if not rewrites:
            return [], f"no valid rewrite: {why or 'no output'}"[:300]
        return rewrites, f"{len(rewrites)}/{self.config.n_rewrites} rewrites; rejected: {why}"[:300]


# ---- config -----------------------------------------------------------------------------------


class RewriteConfig(ComputeConfig):
    engine: Literal["transformers", "openai", "vllm"] = "transformers"
    # transformers/vllm: a HF model dir or Hub id; openai: the model name the server serves.
    model: str = "demo/assets/toy_lm"
    mode: Literal["completion", "chat"] = "completion"  # chat: system + user messages (instruct models)
    instruction: str = INSTRUCTION  # LaCLIP's first line
    example_separator: str = "\n\n"  # between the prompt's parts (LaCLIP: a blank line)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # chat mode only
    # chat mode: the user message; {prompt} = the LaCLIP few-shot prompt, {caption} = the caption
    user_template: str = DEFAULT_USER_TEMPLATE
    bank: str | None = None  # JSONL of {"source", "target"} pairs; None: stages/data/laclip_bank.jsonl
    k: int = Field(3, ge=0)  # examples per prompt
    n_rewrites: int = Field(4, ge=1)  # rewrites kept per caption
    temperature: float = Field(0.9, ge=0.0)  # 0 = greedy
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(77, ge=1)
    seed: int = 0  # seeds the example draws and the sampling
    max_input_chars: int = Field(500, ge=1)  # captions are cut to this length before prompting
    max_chars: int = Field(300, ge=1)  # rewrites longer than this are rejected
    max_retries: int = Field(2, ge=0)  # new attempts for a rejected rewrite (in-stage engines)
    spares: int = Field(2, ge=0)  # Ray path only: extra generations per row that replace rejected ones
    batch_size: int = 64  # rows per call (also the ray.data.llm processor batch size)
    # transformers engine
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available and num_gpus > 0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gen_batch_size: int = Field(64, ge=1)  # prompts per generate() call
    # openai engine
    base_url: str = "http://127.0.0.1:8000/v1"  # ends before /completions
    api_key_env: str | None = None  # NAME of the env var holding the key (sent as Bearer); never the key
    header_envs: dict[str, str] = {}  # extra headers: header name -> NAME of the env var with its value
    qps: float | None = None  # max requests per second per worker (None: no limit)
    request_concurrency: int = Field(8, ge=1)  # parallel requests per worker (in-stage client)
    http_retries: int = Field(5, ge=0)  # retries of a request on 429/5xx/connection errors
    http_backoff_s: float = Field(1.0, ge=0.0)  # base of the exponential backoff
    timeout_s: float = Field(60.0, gt=0)  # per request
    # vllm engine (ray.data.llm)
    engine_kwargs: dict[str, Any] = {}  # vLLM engine kwargs (max_model_len, enable_prefix_caching, ...)
    accelerator_type: str | None = None  # e.g. "H100", "A100", "L4"

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

    @model_validator(mode="after")
    def _check(self):
        if self.engine == "openai" and not re.match(r"^https?://", self.base_url):
            raise ValueError("base_url must start with http:// or https://")
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


# ---- the stage --------------------------------------------------------------------------------


@dataclass
class LLMSpec:
    """A Ray-free description of the ``ray.data.llm`` processor for this stage (see the module doc).

    ``pipeline/executor.py`` builds ``vLLMEngineProcessorConfig(**processor_kwargs)`` (kind ``vllm``)
    or ``HttpRequestProcessorConfig(**processor_kwargs, headers=headers)`` (kind ``http``), then runs
    ``ds.map_batches(explode, batch_format="pyarrow")`` -> ``build_processor(cfg, preprocess, postprocess)(ds)`` ->
    ``ds.groupby(G).map_groups(collect, batch_format="pyarrow")`` with ``G`` = ``key``, or a column
    that holds whole groups of keys (the executor's shard column): ``collect`` takes any number of
    keys and returns their rows sorted by key.
    """

    kind: Literal["vllm", "http"]
    processor_kwargs: dict[str, Any]
    explode: Any  # pa.Table -> pa.Table (map_batches): carrier rows + one request row per generation
    preprocess: Any  # row -> dict: the request (payload, or prompt/messages + sampling_params)
    postprocess: Any  # row -> dict: the raw generation or the error of one request row
    collect: Any  # pa.Table of one key's rows -> pa.Table of one row with the rewrite columns
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # secrets: never log or persist


class Rewrite(Stage):
    name = "rewrite"
    Config = RewriteConfig
    requires = ("caption",)
    produces = ("caption_rewrites", "rewrite_reason")

    def __init__(self, config=None):
        super().__init__(config)
        self.bank = load_bank(self.config.bank)

    # ---- description ----
    def resources(self) -> Resources:
        c = self.config
        gpus = 0.0 if c.engine == "openai" else c.num_gpus  # vllm: GPUs per replica (ray.data.llm)
        return Resources(
            num_cpus=c.num_cpus, num_gpus=gpus, concurrency=c.concurrency, batch_size=c.batch_size, actor=True
        )

    def model_info(self) -> dict[str, Any]:
        c = self.config
        bank_path = Path(c.bank) if c.bank else DEFAULT_BANK
        prompt: dict[str, Any] = {
            "format": "LaCLIP in-context: instruction, k 'source => target' pairs, '{caption} =>'; "
            "output cut at the first newline",
            "instruction": c.instruction,
            "example_separator": c.example_separator,
            "k": c.k,
            "bank": str(c.bank) if c.bank else "stages/data/laclip_bank.jsonl",
            "bank_pairs": len(self.bank),
            "bank_sha256": hashlib.sha256(bank_path.read_bytes()).hexdigest()[:16],
            "example": self.build_prompt("{caption}", self._examples("KEY", 0, 0)),
        }
        if c.mode == "chat":
            prompt.update(system_prompt=c.system_prompt, user_template=c.user_template)
        info = {
            "engine": c.engine,
            "model": c.model,
            "mode": c.mode,
            "prompt": prompt,
            "sampling": {"temperature": c.temperature, "top_p": c.top_p, "max_new_tokens": c.max_new_tokens,
                         "seed": c.seed, "stop": ["\n"]},
            "n_rewrites": c.n_rewrites,
            "max_retries": c.max_retries,
            "validation": {"max_chars": c.max_chars, "max_input_chars": c.max_input_chars},
        }  # fmt: skip
        if c.engine == "openai":
            info["base_url"] = c.base_url
        if c.engine == "vllm":
            info.update(
                engine_kwargs=self._vllm_engine_kwargs(), accelerator_type=c.accelerator_type, spares=c.spares
            )
        return info

    # ---- prompts ----
    def _caption(self, caption: str | None) -> str:
        return _one_line(caption or "")[: self.config.max_input_chars]

    def _examples(self, key: str, slot: int, attempt: int) -> list[int]:
        return draw_examples(len(self.bank), self.config.k, self.config.seed, key, slot, attempt)

    def build_prompt(self, caption: str, examples: list[int]) -> str:
        c = self.config
        return completion_prompt(
            [self.bank[i] for i in examples], caption, c.instruction, c.example_separator
        )

    def build_messages(self, caption: str, examples: list[int]) -> list[dict[str, str]]:
        user = self.config.user_template.format(prompt=self.build_prompt(caption, examples), caption=caption)
        return [{"role": "system", "content": self.config.system_prompt}, {"role": "user", "content": user}]

    # ---- lifecycle ----
    def setup(self) -> None:
        c = self.config
        if c.engine == "transformers":
            self._setup_transformers()
        elif c.engine == "openai":
            import requests

            self._session = requests.Session()
            self._headers = self._http_headers()
            self._pace_lock = threading.Lock()
            self._next_send = 0.0

    def process(self, batch: pa.Table) -> pa.Table:
        c = self.config
        if c.engine == "vllm":
            raise RuntimeError(
                "engine 'vllm' runs through ray.data.llm in the executor (Rewrite.llm_spec()); without Ray use "
                "engine 'transformers', or engine 'openai' against `vllm serve`"
            )
        keys = [str(k) for k in batch.column("key").to_pylist()]
        captions = [self._caption(t) for t in batch.column("caption").to_pylist()]
        rows = [_RowRewrites(cap, c, self.bank) for cap in captions]
        pending = [(r, s, 0) for r in range(len(rows)) if captions[r] for s in range(c.n_rewrites)]
        rnd = 0
        while pending:
            examples = [self._examples(keys[r], s, a) for r, s, a in pending]
            seeds = [_seed(c.seed, keys[r], s, a) for r, s, a in pending]
            reqs = [(captions[r], ex, sd) for (r, _, _), ex, sd in zip(pending, examples, seeds)]
            if c.engine == "transformers":
                outs = self._generate_transformers(reqs, _seed(c.seed, keys[0], "round", rnd))
            else:
                outs = self._generate_openai(reqs)
            retry = []
            for (r, s, a), ex, (text, err) in zip(pending, examples, outs):
                if rows[r].offer(s, text, ex, err) and a < c.max_retries:
                    retry.append((r, s, a + 1))
            pending, rnd = retry, rnd + 1
        results = [row.result() if captions[i] else ([], "no caption") for i, row in enumerate(rows)]
        batch = replace_column(batch, "caption_rewrites", [r for r, _ in results])
        return replace_column(batch, "rewrite_reason", [why for _, why in results])

    # ---- transformers engine ----
    def _setup_transformers(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        c = self.config
        path = _local_path(c.model)
        device = c.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and c.num_gpus > 0 else "cpu"
        dtype = c.dtype if c.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"
        tok.truncation_side = "left"  # a too-long prompt loses its first examples, never the caption
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        self._tok, self._model, self._device = tok, model, device
        ctx = getattr(model.config, "max_position_embeddings", None) or tok.model_max_length
        self._max_prompt_tokens = max(16, min(ctx, tok.model_max_length or ctx) - c.max_new_tokens)

    def _generate_transformers(self, reqs, seed: int) -> list[tuple[str | None, str | None]]:
        import torch

        c = self.config
        tok, model = self._tok, self._model
        if c.mode == "chat":
            prompts = [
                tok.apply_chat_template(
                    self.build_messages(cap, ex), tokenize=False, add_generation_prompt=True
                )
                for cap, ex, _ in reqs
            ]
        else:
            prompts = [self.build_prompt(cap, ex) for cap, ex, _ in reqs]
        outs: list[tuple[str | None, str | None]] = []
        devices = [torch.device(self._device).index or 0] if self._device == "cuda" else []
        for start in range(0, len(prompts), c.gen_batch_size):
            chunk = prompts[start : start + c.gen_batch_size]
            enc = tok(
                chunk, return_tensors="pt", padding=True, truncation=True, max_length=self._max_prompt_tokens
            )
            enc = {k: v.to(self._device) for k, v in enc.items()}
            sample = c.temperature > 0
            kwargs = dict(temperature=c.temperature, top_p=c.top_p) if sample else {}
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(_seed(seed, start))
                gen = model.generate(
                    **enc, do_sample=sample, max_new_tokens=c.max_new_tokens, stop_strings=["\n"], tokenizer=tok,
                    pad_token_id=tok.pad_token_id, **kwargs,
                )  # fmt: skip
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            outs.extend((t, None) for t in texts)
        return outs

    # ---- openai engine (in-stage client) ----
    def _http_headers(self) -> dict[str, str]:
        c = self.config
        headers = {}
        if c.api_key_env:
            key = os.environ.get(c.api_key_env)
            if not key:
                raise RuntimeError(f"rewrite: environment variable {c.api_key_env} (api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        for name, env in c.header_envs.items():
            if env not in os.environ:
                raise RuntimeError(f"rewrite: environment variable {env} (header {name}) is not set")
            headers[name] = os.environ[env]
        return headers

    def _endpoint(self) -> str:
        return self.config.base_url.rstrip("/") + (
            "/chat/completions" if self.config.mode == "chat" else "/completions"
        )

    def request_body(self, caption: str, examples: list[int], seed: int) -> dict[str, Any]:
        """The OpenAI-compatible request body for one generation."""
        c = self.config
        body: dict[str, Any] = {"model": c.model, "max_tokens": c.max_new_tokens, "temperature": c.temperature,
                                "top_p": c.top_p, "stop": ["\n"], "seed": seed, "n": 1}  # fmt: skip
        if c.mode == "chat":
            body["messages"] = self.build_messages(caption, examples)
        else:
            body["prompt"] = self.build_prompt(caption, examples)
        return body

    def _generate_openai(self, reqs) -> list[tuple[str | None, str | None]]:
        from concurrent.futures import ThreadPoolExecutor

        bodies = [self.request_body(cap, ex, sd) for cap, ex, sd in reqs]
        with ThreadPoolExecutor(max_workers=self.config.request_concurrency) as pool:
            return list(pool.map(self._post, bodies))

    def _pace(self) -> None:
        if not self.config.qps:
            return
        with self._pace_lock:
            now = time.monotonic()
            wait = self._next_send - now
            self._next_send = max(now, self._next_send) + 1.0 / self.config.qps
        if wait > 0:
            time.sleep(wait)

    def _post(self, body: dict[str, Any]) -> tuple[str | None, str | None]:
        import requests

        c = self.config
        error, retry_after = "http_error", None
        for attempt in range(c.http_retries + 1):
            if attempt:
                time.sleep(self._backoff(attempt - 1, retry_after))
            self._pace()
            try:
                resp = self._session.post(
                    self._endpoint(), json=body, headers=self._headers, timeout=c.timeout_s
                )
            except requests.RequestException as e:
                error = f"http_error {type(e).__name__}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                error = f"http_error {resp.status_code}"
                retry_after = resp.headers.get("Retry-After") if resp.status_code == 429 else None
                continue
            if resp.status_code != 200:
                return None, f"http_error {resp.status_code}"
            try:
                return parse_openai_response(resp.json(), c.mode), None
            except ValueError as e:
                return None, f"bad_response {e}"[:80]
        return None, error

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        wait = self.config.http_backoff_s * (2**attempt)
        if retry_after:
            try:
                wait = max(wait, float(retry_after))
            except ValueError:
                pass
        return min(wait, 60.0)

    # ---- Ray path (ray.data.llm) ----
    def _vllm_engine_kwargs(self) -> dict[str, Any]:
        kw = dict(self.config.engine_kwargs)
        if self.config.num_gpus > 1 and "tensor_parallel_size" not in kw:
            kw["tensor_parallel_size"] = int(self.config.num_gpus)
        return kw

    def dataset_hook(self) -> ProcessorHook | None:
        """Engines ``vllm`` and ``openai`` run as a ``ray.data.llm`` processor under Ray."""
        if self.config.engine == "transformers":
            return None
        spec = self.llm_spec()
        cls = "vLLMEngineProcessorConfig" if spec.kind == "vllm" else "HttpRequestProcessorConfig"
        secret = {"headers": spec.headers or None} if spec.kind == "http" else {}
        return ProcessorHook(
            cls, spec.processor_kwargs, spec.preprocess, spec.postprocess, spec.explode, spec.collect, secret
        )

    def llm_spec(self) -> LLMSpec:
        """The ``ray.data.llm`` description of this stage (engines ``vllm`` and ``openai``)."""
        c = self.config
        rp = _RayPath(c, self.bank)
        common = {"batch_size": c.batch_size, "concurrency": c.concurrency}
        if c.engine == "vllm":
            kwargs = {
                **common,
                "model_source": c.model,
                "engine_kwargs": self._vllm_engine_kwargs(),
                "accelerator_type": c.accelerator_type,
                "chat_template_stage": c.mode == "chat",
                "tokenize_stage": True,
                "detokenize_stage": False,  # vLLM detokenizes itself (needed for the "\n" stop string)
                "should_continue_on_error": True,  # a failed request becomes a rejected rewrite
            }
            return LLMSpec("vllm", kwargs, rp.explode, rp.preprocess, rp.postprocess, rp.collect)
        if c.engine == "openai":
            kwargs = {
                **common,
                "url": self._endpoint(),
                "qps": max(1, round(c.qps)) if c.qps else None,  # Ray takes an int, per worker
                "max_retries": c.http_retries,
                "base_retry_wait_time_in_s": c.http_backoff_s,
                "session_factory": functools.partial(http_session, c.mode, c.timeout_s),
            }
            spec = LLMSpec("http", kwargs, rp.explode, rp.preprocess, rp.postprocess, rp.collect)
            spec.headers = self._http_headers()
            return spec
        raise ValueError(
            "llm_spec() is for engines 'vllm' and 'openai'; 'transformers' runs inside the stage"
        )


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


def _http_text(resp: Any, mode: str) -> tuple[str | None, str | None]:
    """(text, error) of a ray.data.llm ``http_response``: the compact form of :func:`http_session`,
    or an endpoint's own JSON."""
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


class _RayPath:
    """Row functions of the ``ray.data.llm`` path (picklable; no Ray import)."""

    def __init__(self, config: RewriteConfig, bank: list[tuple[str, str]]):
        self.config = config
        self.bank = bank
        self.stage = Rewrite(config)

    def explode(self, batch: pa.Table) -> pa.Table:
        """One carrier row per input row (all its columns, and its Arrow schema so that ``collect``
        can restore the types after Ray's row dicts), plus ``n_rewrites + spares`` light request
        rows for each ``ok`` row with a caption."""
        c = self.config
        n = batch.num_rows
        schema = batch.schema.remove_metadata().serialize().to_pybytes()
        carriers = batch.append_column(SLOT, pa.array([-1] * n, pa.int64()))
        carriers = carriers.append_column(SCHEMA, pa.array([schema] * n, pa.binary()))
        carriers = carriers.append_column(RAY_ERROR, pa.array([CARRY] * n, pa.string()))
        rows, slots, captions = [], [], []
        status = batch.column("status").to_pylist() if "status" in batch.column_names else [OK] * n
        for i, (caption, st) in enumerate(zip(batch.column("caption").to_pylist(), status)):
            caption = self.stage._caption(caption)
            if st == OK and caption:
                for slot in range(c.n_rewrites + c.spares):
                    rows.append(i)
                    slots.append(slot)
                    captions.append(caption)
        # Request rows keep the key and the shard column (the executor gathers rows by shard).
        reqs = batch.select([name for name in ("key", SHARD_COL) if name in batch.column_names]).take(rows)
        reqs = reqs.append_column(SLOT, pa.array(slots, pa.int64()))
        reqs = reqs.append_column(CAPTION, pa.array(captions, pa.string()))
        reqs = reqs.append_column(RAY_ERROR, pa.array([""] * len(rows), pa.string()))
        return pa.concat_tables([carriers, reqs], promote_options="permissive")

    def preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        if row.get(RAY_ERROR):
            # The carrier bypasses the LLM stages, but gets a request of the same shape: Ray cannot
            # concatenate blocks where a nested struct (payload, sampling_params) is all null.
            key, slot, caption = "carrier", 0, ""
        else:
            key, slot, caption = str(row["key"]), int(row[SLOT]), row[CAPTION]
        examples = self.stage._examples(key, slot, 0)
        seed = _seed(c.seed, key, slot, 0)
        out: dict[str, Any] = {EXAMPLES: examples}
        if c.engine == "openai":
            out["payload"] = self.stage.request_body(caption, examples, seed)
            return out
        out["sampling_params"] = {"temperature": c.temperature, "top_p": c.top_p, "max_tokens": c.max_new_tokens,
                                  "stop": ["\n"], "seed": seed}  # fmt: skip
        if c.mode == "chat":
            out["messages"] = self.stage.build_messages(caption, examples)
        else:
            out["prompt"] = self.stage.build_prompt(caption, examples)
        return out

    def postprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.config.engine == "openai":
            text, error = _http_text(row.get("http_response"), self.config.mode)
        else:
            text, error = row.get("generated_text"), None
        out = {"key": row["key"], SLOT: row[SLOT], CAPTION: row[CAPTION], EXAMPLES: list(row[EXAMPLES]),
               TEXT: text, ERROR: error, RAY_ERROR: ""}  # fmt: skip
        if SHARD_COL in row:
            out[SHARD_COL] = row[SHARD_COL]
        return out

    def collect(self, group: pa.Table) -> pa.Table:
        """Gather carrier and request rows (of one key, or of several: a whole shard) into one row per
        key, sorted by key (the input order within a shard)."""
        carriers: dict[str, dict[str, Any]] = {}
        requests_: dict[str, list[dict[str, Any]]] = {}
        for r in group.to_pylist():
            key = str(r["key"])
            if r.get(SLOT) == -1:
                if key in carriers:
                    raise RuntimeError(f"rewrite: two carrier rows for key {key!r}")
                carriers[key] = r
            else:
                requests_.setdefault(key, []).append(r)
        if set(requests_) - set(carriers):
            raise RuntimeError(
                f"rewrite: request rows without a carrier row: {sorted(set(requests_) - set(carriers))[:3]}"
            )
        order = sorted(carriers)
        rows = [self._collect_one(carriers[k], requests_.get(k, [])) for k in order]
        table = pa.Table.from_pylist(rows)
        schema = _schema(carriers[order[0]][SCHEMA]) if order else pa.schema([])
        for f in schema:  # Ray's row dicts lose Arrow types (int32 -> int64 or double, ...)
            if f.name in table.column_names and table.schema.field(f.name).type != f.type:
                table = table.set_column(table.column_names.index(f.name), f.name, table[f.name].cast(f.type))
        return conform(table)

    def _collect_one(self, carrier: dict[str, Any], reqs: list[dict[str, Any]]) -> dict[str, Any]:
        names = _schema(carrier[SCHEMA]).names
        out = {name: carrier.get(name) for name in names}
        out["caption_rewrites"], out["rewrite_reason"] = None, None  # rows that were not ok
        if reqs:
            state = _RowRewrites(reqs[0][CAPTION], self.config, self.bank)
            for r in sorted(reqs, key=lambda r: r[SLOT]):
                if len(state.accepted) >= self.config.n_rewrites:
                    break
                engine_error = r.get(RAY_ERROR) or None
                error = r.get(ERROR) or (f"engine_error {engine_error}"[:80] if engine_error else None)
                state.offer(r[SLOT], r.get(TEXT), list(r.get(EXAMPLES) or []), error)
            out["caption_rewrites"], out["rewrite_reason"] = state.result()
        elif out.get("status") == OK:
            out["caption_rewrites"], out["rewrite_reason"] = [], "no caption"
        return out


@functools.lru_cache(maxsize=64)
def _schema(serialized: bytes) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(serialized))


def _local_path(model: str) -> str:
    """``model`` as given, or relative to the repository when it names a folder there."""
    if Path(model).exists() or Path(model).is_absolute():
        return model
    in_repo = REPO / model
    return str(in_repo) if in_repo.exists() else model
