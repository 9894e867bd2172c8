"""Stage name (the key used in YAML) -> class of a source, stage or sink.

Classes are imported lazily, so validating a config does not import torch or open_clip for
stages the pipeline does not use. A stage that is not built in is named by its import path,
``package.module:ClassName`` (the module must be importable on every Ray worker, e.g. from the
working dir or an installed package); it needs no edit here or anywhere in ``pipeline/``.
"""

from __future__ import annotations

import importlib

STAGES: dict[str, str] = {
    "read": "stages.read:Read",
    "download": "stages.download:Download",
    "basic_filter": "stages.filters:BasicFilter",
    "dedup": "stages.dedup:Dedup",
    "near_dedup": "stages.near_dedup:NearDedup",
    "semdedup": "stages.semdedup:SemDedup",
    "decontaminate": "stages.decontaminate:Decontaminate",
    "clip_score": "stages.clip_score:ClipScore",
    "clip_filter": "stages.clip_filter:ClipFilter",
    "balance": "stages.balance:Balance",
    "balance_worldwide": "stages.worldwide:WorldwideBalance",
    "rewrite": "stages.rewrite:Rewrite",
    "recaption": "stages.recaption:Recaption",
    "fuse": "stages.recaption.fuse:Fuse",
    "write": "stages.write:Write",
}


class UnknownStage(KeyError):
    pass


def names() -> list[str]:
    return sorted(STAGES)


def get(name: str) -> type:
    target = STAGES.get(name)
    if target is None:
        if ":" not in name:
            raise UnknownStage(name)
        target = name  # a plug-in stage named by its import path
    module, _, cls = target.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        if target is name:
            raise UnknownStage(f"{name} ({e})") from None
        raise
