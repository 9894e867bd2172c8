"""Recaptioning throughput of the transformers engine on CPU with the toy VLM, and the token cost model
of a GPU run (issue 15).

    python bench/recaption.py --n 392 --rounds 3 --threads 1

Measured: captions per second of the ``recaption`` stage's ``process`` (model loaded once, images
already stored as the pipeline stores them: 64 px JPEG), per prompt mode, wall and process CPU time,
median of ``--rounds``; and the tokens of each caption (decoder prefix, generated). Printed as JSON.

Cost model (printed, not measured: no GPU or vLLM here): a chat VLM's request is
``system + instruction + alt-text`` text tokens, plus the image's tokens (Qwen2-VL / Qwen2.5-VL: one per
28x28 px after resizing, ``ceil(h/28) * ceil(w/28)``; LLaVA-1.5 at 336 px: 576), plus the caption's
tokens; a GPU run's captions per second is its prefill and decode throughput divided by those.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
VLM = REPO / "demo" / "assets" / "toy_vlm"


def words_to_tokens(text: str) -> int:
    """A BPE token estimate for English text (about 1.3 tokens per word)."""
    return math.ceil(len(text.split()) * 1.3)


def qwen2_vl_image_tokens(h: int, w: int) -> int:
    return math.ceil(h / 28) * math.ceil(w / 28)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=392, help="pairs of the demo world (seed 0) to caption")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from demo.train_clip import pipeline_resizer
    from demo.world import generate
    from stages.recaption import Recaption
    from stages.recaption.config import DEFAULT_ALTOGETHER_PROMPT, DEFAULT_SYSTEM_PROMPT
    from stages.recaption.eval import names, recaption_table

    pairs = [p for p in generate(a.n + 16, 0, 0.15, 8) if p.broken is None][: a.n]
    table = recaption_table(pairs, pipeline_resizer())
    result: dict = {
        "n": len(pairs),
        "threads": a.threads,
        "batch_size": a.batch_size,
        "load_avg": os.getloadavg(),
    }
    for mode in ("altogether", "scratch"):
        stage = Recaption({"engine": {"type": "transformers", "model": str(VLM), "generate_batch_size": a.batch_size},
                           "prompt_mode": mode, "batch_size": a.batch_size})  # fmt: skip
        stage.setup()
        walls, cpus, caps = [], [], []
        for _ in range(a.rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            caps = []
            for s in range(0, table.num_rows, a.batch_size):
                caps += stage.process(table.slice(s, a.batch_size)).column("caption_recap").to_pylist()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        tok = stage.engine._tok
        prefix = [len(tok(tok.apply_chat_template(stage.prompts.messages(p.caption), tokenize=False),
                          add_special_tokens=False)["input_ids"]) for p in pairs]  # fmt: skip
        out_tokens = [len(tok(c or "", add_special_tokens=False)["input_ids"]) + 1 for c in caps]
        stage.teardown()
        result[mode] = {
            "captions_per_s_wall": round(len(pairs) / statistics.median(walls), 1),
            "captions_per_s_cpu": round(len(pairs) / statistics.median(cpus), 1),
            "wall_s": [round(w, 2) for w in walls], "cpu_s": [round(c, 2) for c in cpus],
            "prefix_tokens_mean": round(statistics.mean(prefix), 2),
            "generated_tokens_mean": round(statistics.mean(out_tokens), 2),
            "image_tokens": 65,  # the toy CLIP tower: 8x8 patches of 8 px + CLS, through cross-attention
            "names_truth": round(sum(names(c, p.true_colour, p.true_shape) for c, p in zip(caps, pairs)) / len(pairs), 4),
        }  # fmt: skip
    alt = statistics.mean(words_to_tokens(p.caption) for p in pairs)
    text = words_to_tokens(DEFAULT_SYSTEM_PROMPT) + words_to_tokens(
        DEFAULT_ALTOGETHER_PROMPT.format(caption="")
    )
    out_words = statistics.mean(len((c or "").split()) for c in caps)
    result["cost_model_qwen2_vl"] = {
        "text_prompt_tokens": text, "alt_text_tokens_mean_demo": round(alt, 1),
        "chat_template_overhead_tokens": 20,
        "image_tokens": {"224x224": qwen2_vl_image_tokens(224, 224), "448x448": qwen2_vl_image_tokens(448, 448),
                         "672x672": qwen2_vl_image_tokens(672, 672)},
        "caption_tokens_demo": round(out_words * 1.3, 1),
        "caption_tokens_real_assumed": 60,
        "prefill_tokens_per_caption_448": text + 20 + qwen2_vl_image_tokens(448, 448) + 20,
    }  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
