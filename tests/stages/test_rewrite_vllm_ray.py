"""The ``vllm`` engine's hook through Ray's own vLLM processor (issue #21): ``pipeline.ray.hooks
.apply_processor`` — what the executor runs — on ``ray.data.llm.build_processor(
vLLMEngineProcessorConfig(...))`` with the stage's explode / preprocess / postprocess / collect.

What is real: the processor config the stage describes, Ray's processor builder, its wrapping of our
preprocess and postprocess, Ray's chat-template and tokenize stages (the toy LM's tokenizer, named by
``model``), Ray's vLLM engine stage UDF (batching, ``should_continue_on_error`` turning an engine
exception into ``__inference_error__``, the ``vLLMOutputData`` fields), the bypass of error rows (our
carrier rows ride through as such), Ray Data's block concatenation and the group-by that gathers a
row back. What is faked, and why: vLLM itself (no GPU here, and vLLM does not install beside this
project's torch) — ``tests/vllm_standin.py`` replaces only the object that holds the engine inside
Ray's engine stage, generating with the toy LM through ``transformers`` with the request's sampling
parameters, and raising on a prompt over ``max_model_len`` as vLLM does. It also lowers the stages'
CPU reservations (this Ray has 2 CPUs). The vLLM engine's own sampling and batching are not tested."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from stages.rewrite import Rewrite
from tests.conftest import require_module

REPO = Path(__file__).resolve().parents[2]
# aiohttp is a dependency (pyproject): under CI=true its absence fails the test, elsewhere it skips
LLM_MISSING = "ray.data.llm cannot be imported (it needs aiohttp, a dependency: pip install -e .)"
TOY_LM = REPO / "demo" / "assets" / "toy_lm"
MAX_MODEL_LEN = 160  # the demo prompts are 72-94 tokens of the toy LM; the long caption's over 200
LONG = " ".join(["a very long caption about a red circle and a blue square"] * 8)[:480]


def test_vllm_hook_through_rays_vllm_processor(ray_session):
    """Chat mode, as ``workflows/laclip_rewrite.yaml`` runs vLLM: Ray's chat-template stage applies the
    model's template to our ``messages``, then its tokenize stage, then the engine stage. (Completion
    mode differs only in the preprocess giving ``prompt`` instead of ``messages``: one Ray stage fewer;
    not run here, to keep the suite's time.)"""
    mode = "chat"
    require_module("ray.data.llm", LLM_MISSING)
    import ray
    from transformers import AutoTokenizer

    from demo.world import generate
    from pipeline.ray.hooks import apply_processor
    from tests.stages.test_rewrite import keeps_concept
    from tests.vllm_standin import patch_ray

    pairs = list(generate(5, seed=3))
    captions = [p.caption for p in pairs] + [LONG, "a red circle"]
    n = len(captions)
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(n)],
            "caption": captions,
            "status": ["ok"] * (n - 1) + ["download_failed"],
            # columns a read stage keeps (save_additional_columns), not base columns: only the carrier's
            # schema can restore their types after Ray's row dicts
            "faces": pa.array(range(n), pa.int16()),
            "score": pa.array([0.25 * i for i in range(n)], pa.float32()),
            "tags": pa.array([[f"t{i}"] for i in range(n)], pa.list_(pa.string())),
        }
    )
    stage = Rewrite({"engine": {"type": "vllm", "model": str(TOY_LM), "spares": 2, "processor_batch_size": 4,
                                "engine_kwargs": {"max_model_len": MAX_MODEL_LEN}},
                     "mode": mode, "n_rewrites": 2})  # fmt: skip
    tok = AutoTokenizer.from_pretrained(TOY_LM)
    ex = stage._examples(table["key"][5].as_py(), 0, 0)
    assert len(tok(stage.build_prompt(LONG, ex))["input_ids"]) > MAX_MODEL_LEN  # the engine refuses it
    with patch_ray():
        ds = apply_processor(ray.data.from_arrow(table), stage.dataset_hook(), group_by="key")
        out = pa.concat_tables(ds.iter_batches(batch_format="pyarrow", batch_size=None)).sort_by("key")
    assert out.column("key").to_pylist() == table.column("key").to_pylist(), "no row lost or repeated"
    for name in ("caption", "status", "faces", "score", "tags"):
        assert out.column(name).to_pylist() == table.column(name).to_pylist()
        assert out.schema.field(name).type == table.schema.field(name).type, "the carrier restores the types"
    rewrites = out.column("caption_rewrites").to_pylist()
    reasons = out.column("rewrite_reason").to_pylist()
    for i, p in enumerate(pairs):  # the toy LM's rewrites of the caption, cut at the stop string
        assert rewrites[i] and (len(rewrites[i]) == 2) == (reasons[i] is None), (rewrites[i], reasons[i])
        assert reasons[i] is None or "engine_error" not in reasons[i], reasons[i]
        assert all(keeps_concept(r, p.colour, p.shape) and "\n" not in r for r in rewrites[i]), rewrites[i]
    assert sum(len(r) == 2 for r in rewrites[:5]) >= 3, reasons  # most of them get both
    # the engine refused all 4 prompts of the long caption: the row stays ok, kept, with the reason
    assert rewrites[5] == [], rewrites[5]
    assert reasons[5].startswith("no valid rewrite: engine_error ValueError: The decoder prompt"), reasons[5]
    assert rewrites[6] is None and reasons[6] is None  # not ok: untouched
    assert not [c for c in out.column_names if c.startswith("_rw") or c.startswith("__")]
