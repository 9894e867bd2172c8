"""The ``Recaption`` stage: an image-conditioned caption per ``ok`` row from its stored image bytes.

Writes ``caption_recap`` (null where no valid caption came back) and ``recap_reason`` (null when it did;
otherwise why: ``no image``, ``bad_image ...``, ``http_error ...``, ``empty``, ``too_long``). The row
keeps its alt-text in ``caption`` and its status: a failed recaption never drops a row.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from schemas import OK
from stages.base import ProcessorHook, Resources, Stage, StageFailed, replace_column
from stages.recaption import engines
from stages.recaption.config import RecaptionConfig
from stages.recaption.prompt import RecapPrompts
from stages.recaption.validate import clean_output, rejection

TRANSPORT_ERRORS = ("http_error", "bad_response")


class Recaption(Stage):
    name = "recaption"
    Config = RecaptionConfig
    requires = ("image", "caption")
    produces = ("caption_recap", "recap_reason")

    def __init__(self, config=None):
        super().__init__(config)
        self.prompts = RecapPrompts(self.config)
        self.engine = engines.build(self.config, self.prompts)

    def resources(self) -> Resources:
        c = self.config
        return Resources(num_cpus=c.num_cpus, num_gpus=self.engine.num_gpus(), concurrency=c.concurrency,
                         batch_size=c.batch_size, actor=True)  # fmt: skip

    def dataset_hook(self) -> ProcessorHook | None:
        """The ``ray.data.llm`` processor of the ``openai`` and ``vllm`` engines; None for ``transformers``."""
        return self.engine.hook()

    def packages(self) -> list[tuple[str, str, str]]:
        return self.engine.packages()

    def model_info(self) -> dict[str, Any]:
        c = self.config
        return {"engine": c.engine.type, "model": c.engine.model, "prompt": self.prompts.info(),
                "sampling": c.sampling(), "validation": {"max_chars": c.max_chars,
                "max_input_chars": c.max_input_chars}, **self.engine.info()}  # fmt: skip

    def setup(self) -> None:
        self.engine.setup()

    def teardown(self) -> None:
        self.engine.teardown()

    def process(self, batch: pa.Table) -> pa.Table:
        c, engine = self.config, self.engine
        if not engine.in_stage:
            raise RuntimeError(engine.without_ray)
        n = batch.num_rows
        keys = [str(k) for k in batch.column("key").to_pylist()]
        captions = [self.prompts.caption(t) for t in batch.column("caption").to_pylist()]
        images = batch.column("image").to_pylist()
        status = batch.column("status").to_pylist() if "status" in batch.column_names else [OK] * n
        texts: list[str | None] = [None] * n
        reasons: list[str | None] = [None] * n
        pending = []
        for i in range(n):
            if status[i] != OK:
                continue
            if not images[i]:
                reasons[i] = "no image"
            else:
                pending.append((i, 0))
        asked = [i for i, _ in pending]
        while pending:
            outs = engine.generate(
                [(captions[i], images[i], self.prompts.seed(keys[i], a)) for i, a in pending]
            )
            retry = []
            for (i, a), (raw, err) in zip(pending, outs):
                text = clean_output(raw)
                why = err or rejection(text, c.max_chars)
                if why is None:
                    texts[i], reasons[i] = text, None
                else:
                    reasons[i] = why[:200]
                    if a < engine.max_retries and not why.startswith("bad_image"):
                        retry.append((i, a + 1))
            pending = retry
        _fail_if_the_engine_never_answered(self.name, [reasons[i] for i in asked], [texts[i] for i in asked])
        batch = replace_column(batch, "caption_recap", texts, pa.string())
        return replace_column(batch, "recap_reason", reasons, pa.string())


def _fail_if_the_engine_never_answered(stage: str, reasons: list, texts: list) -> None:
    """Two or more rows asked, none answered, every failure a transport error: the stage's failure."""
    if len(reasons) < 2 or any(t is not None for t in texts):
        return
    if all(r and r.startswith(TRANSPORT_ERRORS) for r in reasons):
        raise StageFailed(stage, f"no caption for any of {len(reasons)} rows: {sorted(set(reasons))[0]}")
