"""The ``transformers`` engine: a local Hugging Face causal LM inside the stage (batched ``generate``
with left padding, stop at a newline, on CPU or GPU). No ``ray.data.llm`` processor."""

from __future__ import annotations

from typing import Any

from stages.rewrite.engines.base import Engine, Generation, Request
from stages.rewrite.prompt import STOP, seed_of


class TransformersEngine(Engine):
    type = "transformers"

    def setup(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        e = self.engine
        path = e.model  # resolved at load (pipeline.paths)
        device = e.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and self.config.num_gpus > 0 else "cpu"
        dtype = e.dtype if e.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"
        tok.truncation_side = "left"  # a too-long prompt loses its first examples, never the caption
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        self._tok, self._model, self._device = tok, model, device
        ctx = getattr(model.config, "max_position_embeddings", None) or tok.model_max_length
        self._max_prompt_tokens = max(16, min(ctx, tok.model_max_length or ctx) - self.config.max_new_tokens)

    def teardown(self) -> None:
        self._tok = self._model = None

    def generate(self, reqs: list[Request], round_seed: int) -> list[Generation]:
        import torch

        c, e = self.config, self.engine
        tok, model = self._tok, self._model
        if c.mode == "chat":
            prompts = [
                tok.apply_chat_template(
                    self.prompts.messages(cap, ex), tokenize=False, add_generation_prompt=True
                )
                for cap, ex, _ in reqs
            ]
        else:
            prompts = [self.prompts.prompt(cap, ex) for cap, ex, _ in reqs]
        outs: list[Generation] = []
        devices = [torch.device(self._device).index or 0] if self._device == "cuda" else []
        for start in range(0, len(prompts), e.generate_batch_size):
            chunk = prompts[start : start + e.generate_batch_size]
            enc = tok(
                chunk, return_tensors="pt", padding=True, truncation=True, max_length=self._max_prompt_tokens
            )
            enc = {k: v.to(self._device) for k, v in enc.items()}
            sample = c.temperature > 0
            kwargs = dict(temperature=c.temperature, top_p=c.top_p) if sample else {}
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(seed_of(round_seed, start))
                gen = model.generate(
                    **enc, do_sample=sample, max_new_tokens=c.max_new_tokens, stop_strings=list(STOP),
                    tokenizer=tok, pad_token_id=tok.pad_token_id, **kwargs,
                )  # fmt: skip
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            outs.extend((t, None) for t in texts)
        return outs

    def info(self) -> dict[str, Any]:
        e = self.engine
        return {"max_retries": e.max_retries, "device": e.device, "dtype": e.dtype}
