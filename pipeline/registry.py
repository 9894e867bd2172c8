"""Stage name (the key used in YAML) -> stage class.

Classes are imported lazily, so validating a config does not import torch or open_clip for
stages the pipeline does not use.
"""

from __future__ import annotations

import importlib

from stages.base import Stage

STAGES: dict[str, str] = {
    "read": "stages.read:Read",
    "download": "stages.download:Download",
    "basic_filter": "stages.filters:BasicFilter",
    "dedup": "stages.dedup:Dedup",
    "clip_score": "stages.clip_score:ClipScore",
    "clip_filter": "stages.clip_filter:ClipFilter",
    "balance": "stages.balance:Balance",
    "rewrite": "stages.rewrite:Rewrite",
    "write": "stages.write:Write",
}


class UnknownStage(KeyError):
    pass


def names() -> list[str]:
    return sorted(STAGES)


def get(name: str) -> type[Stage]:
    try:
        target = STAGES[name]
    except KeyError:
        raise UnknownStage(name) from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
