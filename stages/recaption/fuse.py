"""The ``fuse`` stage: merge the alt-text and the VLM caption into one caption with an LLM (VeCap/KALE
style), written to ``caption_fused``, with ``fuse_reason``.

It is the ``rewrite`` stage (same engines, prompts, validation, ``ray.data.llm`` path) with one rewrite
per row, whose input text is ``source_template`` filled from the row: ``{caption}`` the alt-text,
``{recap}`` the ``caption_recap`` of the ``recaption`` stage. In ``chat`` mode ``user_template`` gets
that text as ``{caption}``; the default asks an instruct model to merge the two. In ``completion`` mode
(LaCLIP's few-shot prompt, the demo's toy LM) the text is rewritten as a caption.

A row whose fusion fails keeps its alt-text in ``caption_fused`` and gets the reason in ``fuse_reason``
(``no recap: ...`` when the recaption gave nothing, else the rewrite's reason). Its status stays ``ok``.
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
from pydantic import Field, model_validator

from schemas import OK
from stages.base import ProcessorHook, replace_column
from stages.rewrite.config import RewriteConfig
from stages.rewrite.stage import Rewrite

FUSE_USER_TEMPLATE = (
    "Merge these two descriptions of one image into a single caption of one sentence. The image description "
    "is right about what is visible; keep the alt-text's names, places, numbers and other facts that do not "
    "contradict it. Answer with the caption only.\n{caption}"
)
DEFAULT_SOURCE = "Alt-text: {caption}\nImage description: {recap}"  # both, as the chat template asks (the demo's toy LM gets `{recap}`: it cannot merge)
_STASH = {"caption": "_fuse_caption", "caption_rewrites": "_fuse_rewrites", "rewrite_reason": "_fuse_rreason"}


class FuseConfig(RewriteConfig):
    source_template: str = Field(
        DEFAULT_SOURCE,
        description="The text the LLM gets as its caption: `{caption}` = the alt-text, `{recap}` = the VLM "
        "caption (e.g. `Alt-text: {caption}\\nImage description: {recap}` for an instruct model in chat mode).",
    )
    n_rewrites: int = Field(1, ge=1, le=1, description="One fused caption per row.")
    user_template: str = Field(
        FUSE_USER_TEMPLATE,
        description="Chat mode: the user message; `{caption}` = the filled `source_template`.",
    )
    max_input_chars: int = Field(
        1000, ge=1, description="The filled `source_template` is cut to this length."
    )

    @model_validator(mode="after")
    def _source(self):
        try:
            self.source_template.format(caption="", recap="")
        except (KeyError, IndexError, ValueError):
            raise ValueError("source_template may only use {caption} and {recap}") from None
        if "{recap}" not in self.source_template:
            raise ValueError("source_template must use {recap} (the VLM caption)")
        return self


class Fuse(Rewrite):
    name = "fuse"
    Config = FuseConfig
    requires = ("caption", "caption_recap")
    produces = ("caption_fused", "fuse_reason")

    def _sources(self, batch: pa.Table) -> list[str | None]:
        status = batch.column("status").to_pylist()
        alts, recaps = batch.column("caption").to_pylist(), batch.column("caption_recap").to_pylist()
        fmt = self.config.source_template.format
        return [
            fmt(caption=a or "", recap=r) if st == OK and r else None
            for st, a, r in zip(status, alts, recaps)
        ]

    def _stash(self, batch: pa.Table) -> pa.Table:
        """The rewrite machinery reads ``caption`` and writes ``caption_rewrites``/``rewrite_reason``: keep
        the row's own under other names, and put the fusion source in ``caption``."""
        for col, tmp in _STASH.items():
            if col in batch.column_names:
                batch = replace_column(batch, tmp, batch.column(col))
        return replace_column(batch, "caption", self._sources(batch), pa.string())

    def _unstash(self, batch: pa.Table) -> pa.Table:
        alts = batch.column(_STASH["caption"]).to_pylist()
        recap_reasons = (
            batch.column("recap_reason").to_pylist()
            if "recap_reason" in batch.column_names
            else [None] * len(alts)
        )
        srcs, status = batch.column("caption").to_pylist(), batch.column("status").to_pylist()
        rws, whys = batch.column("caption_rewrites").to_pylist(), batch.column("rewrite_reason").to_pylist()
        fused, reasons = [], []
        for alt, src, st, rw, why, rwhy in zip(alts, srcs, status, rws, whys, recap_reasons):
            if st != OK:
                fused.append(None), reasons.append(None)
            elif not src:
                fused.append(alt), reasons.append(f"no recap: {rwhy or 'no caption_recap'}"[:200])
            elif rw:
                fused.append(rw[0]), reasons.append(None)
            else:
                fused.append(alt), reasons.append((why or "no output")[:200])
        batch = batch.drop_columns(["caption_rewrites", "rewrite_reason"])
        for col, tmp in _STASH.items():
            if tmp in batch.column_names:
                batch = replace_column(batch, col, batch.column(tmp)).drop_columns([tmp])
        batch = replace_column(batch, "caption_fused", fused, pa.string())
        return replace_column(batch, "fuse_reason", reasons, pa.string())

    def process(self, batch: pa.Table) -> pa.Table:
        return self._unstash(super().process(self._stash(batch)))

    def dataset_hook(self) -> ProcessorHook | None:
        hook = super().dataset_hook()
        if hook is None:
            return None
        explode, collect = hook.explode, hook.collect
        return dataclasses.replace(
            hook, explode=lambda b: explode(self._stash(b)), collect=lambda g: self._unstash(collect(g))
        )

    def model_info(self):
        return {**super().model_info(), "source_template": self.config.source_template}
