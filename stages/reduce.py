"""Fitting a reduce stage (a global stage with ``fit_partial``/``merge``/``load_state``) in one
process, as ``pipeline/ray/fitting.py`` does it on Ray: ``fit_rounds`` rounds; each round after the
first runs on a stage that loaded the previous round's state (JSON round trip, as workers load it);
partials are folded with ``combine`` when the stage has it."""

from __future__ import annotations

import json
import random
from typing import Any

import pyarrow as pa


def fit_local(stage, tables: list[pa.Table], shuffle_seed: int | None = None) -> Any:
    """Fit ``stage`` over ``tables`` (one partial each; their order shuffled by ``shuffle_seed``),
    load the final state into it (after a JSON round trip) and return that state."""
    state = None
    for r in range(getattr(stage, "fit_rounds", 1)):
        parts = [stage.fit_partial(t) for t in tables]
        if shuffle_seed is not None:
            random.Random(shuffle_seed + r).shuffle(parts)
        state = json.loads(json.dumps(stage.merge(parts)))
        stage.load_state(state)
    return state
