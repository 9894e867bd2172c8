"""LaCLIP caption rewriting: ``caption_rewrites`` (list<string>) and ``rewrite_reason`` (string).

The ``Rewrite`` stage: the in-stage generation loop (prompt, generate, validate, ask again) over the
engine of its config, and the ``ray.data.llm`` hook of the engines that have one. The method is
described in ``stages/rewrite/__init__.py``.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from stages.base import ProcessorHook, Resources, Stage, StageFailed, replace_column
from stages.rewrite import engines
from stages.rewrite.config import RewriteConfig
from stages.rewrite.prompt import Prompts, load_bank, seed_of
from stages.rewrite.validate import RowRewrites


class Rewrite(Stage):
    name = "rewrite"
    Config = RewriteConfig
    requires = ("caption",)
    produces = ("caption_rewrites", "rewrite_reason")

    def __init__(self, config=None):
        super().__init__(config)
        self.bank = load_bank(self.config.bank)
        self.prompts = Prompts(self.config, self.bank)
        self.engine = engines.build(self.config, self.prompts)

    # ---- description ----
    def resources(self) -> Resources:
        c = self.config
        return Resources(
            num_cpus=c.num_cpus,
            num_gpus=self.engine.num_gpus(),  # vllm: GPUs per replica (ray.data.llm); openai: none
            concurrency=c.concurrency,
            batch_size=c.batch_size,
            actor=True,
        )

    def dataset_hook(self) -> ProcessorHook | None:
        """The ``ray.data.llm`` processor of the ``openai`` and ``vllm`` engines; None for ``transformers``."""
        return self.engine.hook()

    def packages(self) -> list[tuple[str, str, str]]:
        return self.engine.packages()

    def model_info(self) -> dict[str, Any]:
        c = self.config
        return {
            "engine": c.engine.type,
            "model": c.engine.model,
            "mode": c.mode,
            "prompt": self.prompts.info(),
            "sampling": self.prompts.sampling(),
            "n_rewrites": c.n_rewrites,
            "validation": {"max_chars": c.max_chars, "max_input_chars": c.max_input_chars},
            **self.engine.info(),
        }

    # ---- prompts (kept on the stage for callers and tests) ----
    def _caption(self, caption: str | None) -> str:
        return self.prompts.caption(caption)

    def _examples(self, key: str, slot: int, attempt: int) -> list[int]:
        return self.prompts.examples(key, slot, attempt)

    def build_prompt(self, caption: str, examples: list[int]) -> str:
        return self.prompts.prompt(caption, examples)

    def build_messages(self, caption: str, examples: list[int]) -> list[dict[str, str]]:
        return self.prompts.messages(caption, examples)

    # ---- lifecycle ----
    def setup(self) -> None:
        self.engine.setup()

    def teardown(self) -> None:
        self.engine.teardown()

    def process(self, batch: pa.Table) -> pa.Table:
        c, engine = self.config, self.engine
        if not engine.in_stage:
            raise RuntimeError(engine.without_ray)
        keys = [str(k) for k in batch.column("key").to_pylist()]
        captions = [self.prompts.caption(t) for t in batch.column("caption").to_pylist()]
        rows = [RowRewrites(cap, c, self.bank) for cap in captions]
        pending = [(r, s, 0) for r in range(len(rows)) if captions[r] for s in range(c.n_rewrites)]
        rnd = 0
        while pending:
            examples = [self.prompts.examples(keys[r], s, a) for r, s, a in pending]
            seeds = [self.prompts.seed(keys[r], s, a) for r, s, a in pending]
            reqs = [(captions[r], ex, sd) for (r, _, _), ex, sd in zip(pending, examples, seeds)]
            outs = engine.generate(reqs, seed_of(c.seed, keys[0], "round", rnd))
            retry = []
            for (r, s, a), ex, (text, err) in zip(pending, examples, outs):
                if rows[r].offer(s, text, ex, err) and a < engine.max_retries:
                    retry.append((r, s, a + 1))
            pending, rnd = retry, rnd + 1
        _fail_if_the_engine_never_answered(self.name, [rows[i] for i in range(len(rows)) if captions[i]])
        results = [row.result() if captions[i] else ([], "no caption") for i, row in enumerate(rows)]
        batch = replace_column(batch, "caption_rewrites", [r for r, _ in results])
        return replace_column(batch, "rewrite_reason", [why for _, why in results])


TRANSPORT_ERRORS = ("http_error", "bad_response")  # the engine did not answer with a generation


def _fail_if_the_engine_never_answered(stage: str, rows: list[RowRewrites]) -> None:
    """Two or more rows, and not one generation came back (every attempt a transport error: the
    endpoint is down, refuses the key, or answers errors): the stage's failure, not the rows'."""
    if len(rows) < 2 or any(r.accepted for r in rows):
        return
    reasons = [k for r in rows for k in r.rejected]
    if reasons and all(k.startswith(TRANSPORT_ERRORS) for k in reasons):
        raise StageFailed(stage, f"no generation for any of {len(rows)} rows: {sorted(set(reasons))[0]}")

