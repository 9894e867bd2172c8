"""Does a caption name the image's colour and shape? Scoring helpers for the demo world (its generator's
ground truth), used by ``demo/train_vlm.py``, the tests and ``bench/recaption.py``."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pyarrow as pa


def names(text: str | None, colour: str, shape: str) -> bool:
    """``text`` names ``colour`` and ``shape`` as words (the background "light blue" is not "blue")."""
    low = (text or "").lower().replace("light blue", " ")
    return bool(re.search(rf"\b{re.escape(colour)}\b", low) and re.search(rf"\b{re.escape(shape)}s?\b", low))


def pipeline_bytes(data: bytes, resizer) -> bytes:
    """``data`` as the demo pipeline stores it (img2dataset's resizer: 64 px, border mode, JPEG)."""
    import io

    out, *_, err = resizer(io.BytesIO(data))
    if err is not None:
        raise ValueError(err)
    return out


def recaption_table(pairs, resizer) -> pa.Table:
    """An ``ok`` row table of world pairs (``demo.world.Pair``) with pipeline-resized image bytes."""
    n = len(pairs)
    return pa.table({
        "key": [f"{i:09d}" for i in range(n)], "status": ["ok"] * n,
        "caption": [p.caption for p in pairs], "image": [pipeline_bytes(p.data, resizer) for p in pairs],
    })  # fmt: skip


def world_accuracy(model_dir: str | Path, pairs, resizer, batch_size: int = 64) -> dict[str, Any]:
    """Recaption ``pairs`` with the ``recaption`` stage (transformers engine) in both prompt modes and
    report the share of captions naming the true colour and shape (all, mismatched, matched), and for the
    matched pairs in ``altogether`` mode the share that keep the alt-text unchanged."""
    from stages.recaption import Recaption

    table = recaption_table(pairs, resizer)
    out: dict[str, Any] = {"eval_rows": len(pairs), "mismatched": sum(p.is_mismatched for p in pairs)}
    for mode in ("scratch", "altogether"):
        stage = Recaption({"engine": {"type": "transformers", "model": str(model_dir)}, "prompt_mode": mode,
                           "batch_size": batch_size})  # fmt: skip
        stage.setup()
        t0 = time.perf_counter()
        caps = []
        for start in range(0, table.num_rows, batch_size):
            caps += stage.process(table.slice(start, batch_size)).column("caption_recap").to_pylist()
        secs = time.perf_counter() - t0
        stage.teardown()
        ok = [names(c, p.true_colour, p.true_shape) for c, p in zip(caps, pairs)]
        mis = [o for o, p in zip(ok, pairs) if p.is_mismatched]
        res = {"names_true_colour_and_shape": sum(ok) / len(ok),
               "mismatched_names_truth": sum(mis) / max(1, len(mis)),
               "matched_names_truth": (sum(ok) - sum(mis)) / max(1, len(ok) - len(mis)),
               "seconds": round(secs, 2), "captions_per_second": round(len(caps) / secs, 1),
               "examples": [{"alt_text": p.caption, "recap": c, "truth": f"{p.true_colour} {p.true_shape}"}
                            for c, p in list(zip(caps, pairs))[:6]]}  # fmt: skip
        if mode == "altogether":
            kept = [c == p.caption for c, p in zip(caps, pairs) if not p.is_mismatched]
            res["matched_unchanged"] = sum(kept) / max(1, len(kept))
        out[mode] = res
    return out
