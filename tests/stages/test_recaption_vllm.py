"""Acceptance 4: the recaption stage's ``vllm`` engine builds ``ray.data.llm``'s
``vLLMEngineProcessorConfig`` with the multimodal stage, the image from the row's bytes, the sampling and
the limits. vLLM and a GPU do not exist here, so the processor is not run: the configuration is built
with the installed Ray's own class, and the row functions are run on rows shaped as the processor's
(the engine's output column ``generated_text`` is written by the test: the one faked part)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from stages.recaption.prompt import decode_data_uri


def _stage(**engine):
    from stages.recaption import Recaption

    return Recaption({
        "engine": {"type": "vllm", "model": "Qwen/Qwen2.5-VL-7B-Instruct", "accelerator_type": "H100",
                   "engine_kwargs": {"max_model_len": 8192}, "processor_batch_size": 16, **engine},
        "prompt_mode": "altogether", "max_new_tokens": 96, "seed": 3, "concurrency": 2,
    })  # fmt: skip


def _batch():
    from tests.conftest import _jpeg

    return pa.table({
        "key": ["000000001", "000000002", "000000003"], "status": ["ok", "filtered_clip", "ok"],
        "caption": ["a red circle", "x", "a blue star"],
        "image": pa.array([_jpeg(1), None, _jpeg(3)], pa.binary()), "_shard": [0, 0, 0],
    })  # fmt: skip


def test_vllm_processor_config_is_built():
    hook = _stage().dataset_hook()
    assert hook.config_class == "vLLMEngineProcessorConfig"
    kw = hook.config_kwargs
    assert kw["prepare_multimodal_stage"] == {"enabled": True}
    assert kw["chat_template_stage"] is True and kw["should_continue_on_error"] is True
    assert kw["engine_kwargs"] == {"max_model_len": 8192, "limit_mm_per_prompt": {"image": 1}}
    assert kw["model_source"] == "Qwen/Qwen2.5-VL-7B-Instruct" and kw["accelerator_type"] == "H100"
    assert kw["batch_size"] == 16 and kw["concurrency"] == 2
    llm = pytest.importorskip("ray.data.llm")
    config = llm.vLLMEngineProcessorConfig(**kw)
    assert config.model_source == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert config.engine_kwargs["limit_mm_per_prompt"] == {"image": 1}
    assert config.prepare_multimodal_stage == {"enabled": True}


def test_requests_carry_the_rows_image_and_sampling_and_rows_come_back():
    stage = _stage()
    hook = stage.dataset_hook()
    batch = _batch()
    exploded = hook.explode(batch)
    rows = exploded.to_pylist()
    assert [bool(r["__inference_error__"]) for r in rows] == [False, True, False], "not-ok rows bypass"
    reqs = [hook.preprocess(r) for r in rows]
    user = reqs[0]["messages"][-1]["content"]
    assert (
        user[0]["type"] == "image_url"
        and decode_data_uri(user[0]["image_url"]["url"]) == batch["image"][0].as_py()
    )
    assert "Alt-text: a red circle" in user[1]["text"]
    sp = reqs[0]["sampling_params"]
    assert (
        sp["max_tokens"] == 96 and sp["temperature"] == 0.0 and sp["seed"] == stage.prompts.seed("000000001")
    )
    assert reqs[1]["messages"][-1]["content"][0]["type"] == "image_url", (
        "carriers: requests of the same shape"
    )
    # What the processor hands back: postprocess on the answered rows, carriers as they were.
    answered = [hook.postprocess({**reqs[0], "generated_text": "a red circle\n"}), rows[1],
                {**reqs[2], "__inference_error__": "engine died"}]  # fmt: skip
    out = hook.collect(pa.Table.from_pylist(answered))
    assert out.num_rows == 3 and out.column("key").to_pylist() == batch.column("key").to_pylist()
    assert out.column("caption_recap").to_pylist() == ["a red circle", None, None]
    why = out.column("recap_reason").to_pylist()
    assert why[0] is None and why[1] is None and why[2].startswith("engine_error")
    assert out.schema.field("image").type == pa.binary() and out.column("image").equals(batch.column("image"))


def test_pil_image_format_and_tensor_parallel():
    from PIL import Image

    stage = _stage(image_format="pil")
    stage.config.num_gpus = 2
    assert stage.engine.engine_kwargs()["tensor_parallel_size"] == 2
    req = stage.dataset_hook().preprocess(_batch().to_pylist()[0])
    part = req["messages"][-1]["content"][0]
    assert part["type"] == "image" and isinstance(part["image"], Image.Image)


def test_vllm_has_no_in_stage_path():
    with pytest.raises(RuntimeError, match="ray.data.llm"):
        _stage().process(_batch())


def test_openai_engine_under_ray_sends_the_image_as_a_data_uri():
    """The ``openai`` engine's ``ray.data.llm`` processor (``HttpRequestProcessorConfig``): the request
    payload carries the row's bytes as an ``image_url`` data URI (built, not sent: the HTTP path itself is
    tested against the local server without Ray in test_recaption_openai.py)."""
    from stages.recaption import Recaption

    stage = Recaption({"engine": {"type": "openai", "model": "toy-vlm", "base_url": "http://127.0.0.1:9/v1"}})
    hook = stage.dataset_hook()
    assert hook.config_class == "HttpRequestProcessorConfig"
    assert hook.config_kwargs["url"] == "http://127.0.0.1:9/v1/chat/completions"
    batch = _batch()
    req = hook.preprocess(hook.explode(batch).to_pylist()[0])
    part = req["payload"]["messages"][-1]["content"][0]
    assert decode_data_uri(part["image_url"]["url"]) == batch["image"][0].as_py()
    out = hook.collect(
        pa.Table.from_pylist(
            [hook.postprocess({**req, "http_response": {"text": "a red circle", "error": None}})]
        )
    )
    assert out.column("caption_recap").to_pylist() == ["a red circle"]
