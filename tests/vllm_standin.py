"""A stand-in for vLLM's engine inside Ray's own vLLM processor, for the tests (vLLM cannot run here:
no GPU, and no vLLM release installs beside this project's torch; README, "vLLM").

``ray.data.llm.build_processor(vLLMEngineProcessorConfig(...))`` builds, in Ray's own code: the
preprocess map (our function, wrapped by Ray), Ray's chat-template and tokenize stages (the model's
tokenizer), the vLLM engine stage, and the postprocess map (ours, wrapped: rows carrying
``__inference_error__`` bypass it). Only one piece is replaced here: the object that holds the vLLM
engine inside Ray's engine stage (``vLLMEngineWrapper``). Ray's ``vLLMEngineStageUDF`` still runs
(its batching, its per-row error handling under ``should_continue_on_error`` that turns an engine
exception into ``__inference_error__``, its output schema ``vLLMOutputData``). :class:`ToyVLLM`
generates with the demo's toy LM through ``transformers`` from the token ids Ray's tokenize stage
made, with the request's ``sampling_params`` (``temperature``, ``top_p``, ``max_tokens``, ``stop``
and ``seed``, cut before the first stop string as vLLM does), and refuses a prompt longer than
``engine_kwargs.max_model_len`` with an exception, as vLLM does. The stage reserves no GPU and a
quarter CPU (the test machine's Ray has 2 CPUs and no GPU).

:func:`patch_ray` puts the stand-in into ``ray.llm._internal.batch.stages`` for the duration of a
``with``: the processor is built in the driver, so only the driver needs it; the classes below are
importable (``tests.vllm_standin``), so Ray's workers unpickle them."""

from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace
from typing import Any

from ray.llm._internal.batch.stages.base import StatefulStageUDF
from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF, vLLMOutputData

STAGE_CPUS = 0.25


class ToyVLLM:
    """``vLLMEngineWrapper.generate_async`` for the toy LM: (request, vLLMOutputData dict, seconds)."""

    def __init__(self, model_dir: str, max_model_len: int | None, idx_column: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.max_model_len = max_model_len
        self.idx_column = idx_column
        self.request_id = 0

    async def generate_async(self, row: dict[str, Any]):
        import torch

        t0 = time.perf_counter()
        # vLLMEngineWrapper._prepare_llm_request pops these from the row
        prompt = row.pop("prompt", None)
        ids = [int(i) for i in row.pop("tokenized_prompt")]
        sp = dict(row.pop("sampling_params"))
        if self.max_model_len is not None and len(ids) > self.max_model_len:
            raise ValueError(
                f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of "
                f"{self.max_model_len}."
            )
        temperature = float(sp.get("temperature", 1.0))
        kwargs: dict[str, Any] = {"do_sample": temperature > 0, "max_new_tokens": int(sp["max_tokens"])}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=float(sp.get("top_p", 1.0)))
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            if sp.get("seed") is not None:
                torch.manual_seed(int(sp["seed"]))
            out = self.model.generate(torch.tensor([ids]), pad_token_id=self.tok.pad_token_id, **kwargs)
        new = [int(i) for i in out[0, len(ids) :]]
        text = self.tok.decode(new, skip_special_tokens=True)
        cuts = [text.index(s) for s in list(sp.get("stop") or []) if s and s in text]
        text = text[: min(cuts)] if cuts else text
        data = vLLMOutputData(prompt=prompt or "", prompt_token_ids=ids, num_input_tokens=len(ids),
                              generated_tokens=new, generated_text=text, num_generated_tokens=len(new))  # fmt: skip
        request = SimpleNamespace(request_id=self.request_id, idx_in_batch=row[self.idx_column], params=sp)
        self.request_id += 1
        return request, data.model_dump(), time.perf_counter() - t0

    def shutdown(self) -> None:
        pass


class ToyVLLMStageUDF(vLLMEngineStageUDF):
    """Ray's vLLM engine stage UDF with :class:`ToyVLLM` in place of the vLLM engine (its ``udf`` and
    ``_generate_with_error_handling`` are Ray's)."""

    def __init__(self, data_column, expected_input_keys, batch_size, max_concurrent_batches, model,
                 engine_kwargs, task_type="generate", max_pending_requests=None,
                 dynamic_lora_loading_path=None, should_continue_on_error=False, log_engine_metrics=True):  # fmt: skip
        StatefulStageUDF.__init__(self, data_column, expected_input_keys)
        self.model = model
        self.should_continue_on_error = should_continue_on_error
        self.task_type = task_type
        self.engine_kwargs = {**engine_kwargs, "disable_log_stats": True}
        self.llm = ToyVLLM(model, engine_kwargs.get("max_model_len"), self.IDX_IN_BATCH_COLUMN)


def _light(stage, **resources):
    # in place: assigning the field would rerun the stage's validator (which sets num_gpus again)
    stage.map_batches_kwargs.update(num_cpus=STAGE_CPUS, **resources)
    return stage


@contextlib.contextmanager
def patch_ray():
    """Inside the ``with``: Ray's vLLM processor builder makes its engine stage with
    :class:`ToyVLLMStageUDF` (no GPU), and its tokenizer stages reserve a quarter CPU."""
    import ray.llm._internal.batch.stages as stages

    real = {name: getattr(stages, name) for name in ("vLLMEngineStage", "TokenizeStage", "ChatTemplateStage")}

    def engine_stage(**kwargs):
        stage = real["vLLMEngineStage"](**kwargs)  # Ray's own validation of the stage's arguments
        stage.fn = ToyVLLMStageUDF
        return _light(stage, num_gpus=0)

    stages.vLLMEngineStage = engine_stage
    stages.TokenizeStage = lambda **kw: _light(real["TokenizeStage"](**kw))
    stages.ChatTemplateStage = lambda **kw: _light(real["ChatTemplateStage"](**kw))
    try:
        yield
    finally:
        for name, value in real.items():
            setattr(stages, name, value)
