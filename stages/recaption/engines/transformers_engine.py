"""The ``transformers`` engine: a local vision-language model inside the stage (CPU or GPU).

Loaded with ``AutoModelForImageTextToText``. Two model families:

* encoder-decoder models (``VisionEncoderDecoderModel``, the demo's ``toy_vlm``): the image goes through
  ``AutoImageProcessor``; the tokenizer's chat template renders the messages as the decoder prefix, and
  requests are batched by prefix length (no padding inside the decoder, so a caption does not depend on
  its batch);
* chat VLMs (LLaVA, Qwen2-VL, ...): ``AutoProcessor.apply_chat_template`` renders the messages with the
  image placeholder, ``processor(text=..., images=...)`` with left padding. Not exercised here (no such
  model in this repository's assets).

Decoding is greedy at ``temperature: 0``; otherwise each batch samples under a seed of its first request.
"""

from __future__ import annotations

import io
from typing import Any

from stages.recaption.engines.base import Generation, RecapEngine, RecapRequest
from stages.rewrite.prompt import seed_of


def open_image(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class RecapTransformersEngine(RecapEngine):
    type = "transformers"

    def setup(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        e = self.engine
        device = e.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and self.config.num_gpus > 0 else "cpu"
        dtype = e.dtype if e.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        model = AutoModelForImageTextToText.from_pretrained(e.model, dtype=getattr(torch, dtype))
        self._model, self._device = model.to(device).eval(), device
        self._enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
        if self._enc_dec:
            from transformers import AutoImageProcessor

            self._tok = AutoTokenizer.from_pretrained(e.model)
            self._images = AutoImageProcessor.from_pretrained(e.model)
        else:
            from transformers import AutoProcessor

            self._proc = AutoProcessor.from_pretrained(e.model)
            self._proc.tokenizer.padding_side = "left"
            self._tok = self._proc.tokenizer

    def teardown(self) -> None:
        self._model = self._tok = self._images = self._proc = None

    def generate(self, reqs: list[RecapRequest]) -> list[Generation]:
        return self.generate_messages([(self.prompts.messages(cap), data, seed) for cap, data, seed in reqs])

    def generate_messages(self, reqs: list[tuple[list[dict], bytes, int]]) -> list[Generation]:
        """One generation per ``(chat messages, image bytes, seed)``; the messages' image part is a
        placeholder (the image goes to the image processor). The test server calls this too."""
        outs: list[Generation | None] = [None] * len(reqs)
        images = {}
        for i, (_, data, _) in enumerate(reqs):
            try:
                images[i] = open_image(data)
            except Exception as exc:  # noqa: BLE001 - any decode failure is the row's
                outs[i] = (None, f"bad_image {type(exc).__name__}")
        todo = sorted(images)
        run = self._encoder_decoder if self._enc_dec else self._chat
        for idx, text in run(reqs, images, todo):
            outs[idx] = (text, None)
        return [o if o is not None else (None, "no output") for o in outs]

    def _sampling(self) -> dict[str, Any]:
        c = self.config
        sample = c.temperature > 0
        kw: dict[str, Any] = dict(do_sample=sample, max_new_tokens=c.max_new_tokens)
        if sample:
            kw.update(temperature=c.temperature, top_p=c.top_p)
        return kw

    def _run(self, seed: int, **inputs):
        import torch

        devices = [torch.device(self._device).index or 0] if self._device == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            return self._model.generate(**inputs, **self._sampling())

    def _encoder_decoder(self, reqs, images, todo):
        import torch

        tok, bs = self._tok, self.engine.generate_batch_size
        prefix = {}
        for i in todo:
            text = tok.apply_chat_template(reqs[i][0], tokenize=False)
            prefix[i] = tok(text, add_special_tokens=False)["input_ids"]
        by_len: dict[int, list[int]] = {}
        for i in todo:
            by_len.setdefault(len(prefix[i]), []).append(i)
        for n in sorted(by_len):
            group = by_len[n]
            for start in range(0, len(group), bs):
                chunk = group[start : start + bs]
                pix = self._images([images[i] for i in chunk], return_tensors="pt")["pixel_values"]
                ids = torch.tensor([prefix[i] for i in chunk])
                gen = self._run(
                    seed_of(reqs[chunk[0]][2], len(chunk)),
                    pixel_values=pix.to(self._device, self._model.dtype),
                    decoder_input_ids=ids.to(self._device),
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
                texts = tok.batch_decode(gen[:, n:], skip_special_tokens=True)
                yield from zip(chunk, texts)

    def _chat(self, reqs, images, todo):
        proc, bs = self._proc, self.engine.generate_batch_size
        for start in range(0, len(todo), bs):
            chunk = todo[start : start + bs]
            texts = [
                proc.apply_chat_template(reqs[i][0], add_generation_prompt=True, tokenize=False)
                for i in chunk
            ]
            enc = proc(text=texts, images=[images[i] for i in chunk], padding=True, return_tensors="pt")
            enc = {k: v.to(self._device) for k, v in enc.items()}
            gen = self._run(
                seed_of(reqs[chunk[0]][2], len(chunk)), **enc, pad_token_id=self._tok.pad_token_id
            )
            out = self._tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            yield from zip(chunk, out)

    def info(self) -> dict[str, Any]:
        e = self.engine
        return {"max_retries": self.max_retries, "device": e.device, "dtype": e.dtype}
