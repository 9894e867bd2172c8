"""Train the demo's toy rewriter LM and save it as an ordinary Hugging Face model dir.

    python -m demo.train_lm          # ~3 minutes on 2 free CPU cores; overwrites demo/assets/toy_lm/

1. Paraphrase pairs of the shapes world: a source caption from the world's own templates
   (``demo.world.TEMPLATES``), and a target from this module's paraphrase templates that keeps the
   colour and shape words (and the size and background when the source names them).
2. Each training text is the exact LaCLIP prompt the ``rewrite`` stage builds
   (``stages.rewrite.completion_prompt``): the instruction, k = 3 ``source => target`` examples drawn
   from the stage's default bank (``stages/data/laclip_bank.jsonl``), then ``{caption} =>`` and the
   target, a newline and the end-of-text token. The loss is on the target only; its tokens that copy
   a caption word (colour, shape, size, background) weigh ``COPY_WEIGHT`` times more. A curriculum
   makes this affordable on a CPU: first ``--short-steps`` steps with k = 0 (the same format without
   examples: short sequences, where copying the colour and shape words is learnt), then ``--steps``
   steps in the full k = 3 format (where the model learns to find the caption after the examples).
3. A byte-level BPE tokenizer (the ``tokenizers`` library) trained on the bank and the world's text,
   and a small Llama-architecture causal LM (``transformers``), trained deterministically on CPU.
4. Saved with ``save_pretrained``: ``config.json``, ``model.safetensors``, ``generation_config.json``,
   ``tokenizer.json``, ``tokenizer_config.json`` — ``AutoModelForCausalLM``/``AutoTokenizer`` load it,
   and so could ``vllm serve`` (the files are also spelled the transformers 4.x way). Its chat
   template passes the user message through, so chat mode gives the same prompt.
   Same seed and thread count on the same machine: the same bytes.
5. Evaluated through the ``rewrite`` stage itself (transformers engine) on a demo world;
   the figures go to ``train_info.json`` next to the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from demo.world import BACKGROUNDS, COLOURS, SHAPES, TEMPLATES  # noqa: E402
from stages.rewrite import completion_prompt, load_bank  # noqa: E402

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "toy_lm"
EOS = "<|endoftext|>"
K = 3
COPY_WEIGHT = 3.0  # loss weight of the target tokens that copy a caption word (colour, shape, size, bg)
VOCAB_SIZE = 2048
MODEL_CFG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512, rope_theta=10000.0,
                 tie_word_embeddings=True)  # fmt: skip
# A chat template that passes the user message through: chat mode then sends the LaCLIP prompt itself.
CHAT_TEMPLATE = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"

# Paraphrase templates by the attributes the source names (colour and shape are always there).
PARAPHRASES: dict[tuple[str, ...], tuple[str, ...]] = {
    (): (
        "A single {colour} {shape}.",
        "Simple illustration of {a} {colour} {shape}.",
        "The picture shows {a} {colour} {shape}.",
        "{A} {shape} filled with {colour}.",
        "A flat {colour} {shape} shape.",
        "One {colour} {shape} drawn in a plain style.",
        "A plain drawing of a {shape} in {colour}.",
        "Here is {a} {colour} {shape}.",
    ),
    ("bg",): (
        "{A} {colour} {shape} against {bg_a} {bg} backdrop.",
        "On {bg_a} {bg} background there is {a} {colour} {shape}.",
        "{A} {colour} {shape} placed on plain {bg}.",
        "A plain {bg} background with {a} {colour} {shape}.",
        "A {shape} in {colour}, set on {bg}.",
        "{A} {colour} {shape} sitting on {bg_a} {bg} field.",
        "Graphic of {a} {colour} {shape} over {bg}.",
    ),
    ("size",): (
        "{A} {colour} {shape} of {size} size.",
        "{A_size} {size} {shape} in {colour}.",
        "{A_size} {size} {shape}, coloured {colour}.",
        "A {colour} {shape}, {size} in size.",
        "Picture of one {size} {colour} {shape}.",
        "A {shape} in {colour}, drawn {size}.",
        "Close view of {a_size} {size} {colour} {shape}.",
    ),
    ("bg", "size"): (
        "{A_size} {size} {colour} {shape} against {bg_a} {bg} backdrop.",
        "{A} {colour} {shape} of {size} size on {bg_a} {bg} background.",
        "On plain {bg}, {a_size} {size} {colour} {shape}.",
        "A {bg} backdrop behind {a_size} {size} {shape} in {colour}.",
        "{A_size} {size} {shape} coloured {colour}, shown on {bg}.",
        "A {colour} {shape}, {size} in size, over {bg_a} {bg} backdrop.",
        "Over plain {bg} sits {a_size} {size} {shape} in {colour}.",
    ),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def paraphrase_pair(rng: random.Random) -> tuple[str, str, dict[str, str]]:
    """One (source, target, attributes) triple: a world-style caption and a paraphrase of it."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    bg = rng.choice([b for b in BACKGROUNDS if b != colour])
    size = rng.choice(("small", "large"))
    words = dict(colour=colour, shape=shape, bg=bg, size=size, a=_article(colour), bg_a=_article(bg),
                 a_size=_article(size))  # fmt: skip
    template = rng.choice(TEMPLATES)
    source = template.format(**words)
    attrs = tuple(a for a in ("bg", "size") if "{" + a + "}" in template)
    target = rng.choice(PARAPHRASES[attrs]).format(
        A=_article(colour).capitalize(), A_size=_article(size).capitalize(), **words
    )
    return source, target, words


def training_text(rng: random.Random, bank: list[tuple[str, str]], k: int = K) -> tuple[str, str]:
    """(prompt, completion) in the exact LaCLIP format; the completion is `` target\\n<eos>``."""
    source, target, _ = paraphrase_pair(rng)
    examples = [bank[i] for i in rng.sample(range(len(bank)), k)]
    return completion_prompt(examples, source), f" {target}\n{EOS}"


def build_tokenizer(bank: list[tuple[str, str]], seed: int):
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [completion_prompt([], "")] * 200 + [f"{s} => {t}" for s, t in bank] * 20
    for _ in range(3000):
        s, t, _ = paraphrase_pair(rng)
        corpus.append(f"{s} => {t}\n\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        model_max_length=MODEL_CFG["max_position_embeddings"], chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


def copy_token_ids(tok) -> set[int]:
    """Ids of the tokens that spell a caption word (`` red``, `` circle``, `` large``, `` beige``...)."""
    words = list(COLOURS) + list(SHAPES) + ["small", "large"] + [w for b in BACKGROUNDS for w in b.split()]
    return {i for w in words for i in tok(" " + w, add_special_tokens=False)["input_ids"]}


def make_batch(tok, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded input ids with labels on the completion tokens only."""
    ids, labels = [], []
    for prompt, completion in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(x) for x in ids)
    pad = tok.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": lab}


def train(
    out_dir: Path, short_steps: int, steps: int, batch_size: int, lr: float, seed: int, threads: int
) -> dict:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    bank = load_bank()
    tok = build_tokenizer(bank, seed)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **MODEL_CFG)  # fmt: skip
    config._attn_implementation = "eager"  # much faster than sdpa for training on CPU
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    total = short_steps + steps
    warmup = max(1, total // 25)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, total) / total))),
    )
    copy_ids = torch.tensor(sorted(copy_token_ids(tok)))
    rng = random.Random(seed)
    model.train()
    t0, cpu0, losses = time.time(), time.process_time(), []
    for step in range(total):
        k, size = (0, batch_size * 3 // 2) if step < short_steps else (K, batch_size)
        batch = make_batch(tok, [training_text(rng, bank, k) for _ in range(size)])
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        tok_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="none"
        )
        weight = (target.reshape(-1) != -100).float()
        weight[torch.isin(target.reshape(-1), copy_ids)] *= COPY_WEIGHT
        loss = (tok_loss * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == total - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            print(f"step {step:4d}  k={k}  loss {recent:.3f}  {time.time() - t0:5.0f}s", flush=True)
    train_s, cpu_s = time.time() - t0, time.process_time() - cpu0
    model.eval()
    model.config._attn_implementation = "sdpa"
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.9, top_p=0.95, max_new_tokens=77, bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    _make_portable(out_dir)
    return {"params": n_params, "short_steps": short_steps, "steps": steps, "batch_size": batch_size, "lr": lr,
            "seed": seed, "threads": threads, "train_seconds": round(train_s, 1), "train_cpu_seconds": round(cpu_s, 1),
            "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4), "vocab_size": len(tok),
            "model_config": MODEL_CFG}  # fmt: skip


def _make_portable(out_dir: Path) -> None:
    """Also spell the files the way transformers 4.x (and so vLLM builds pinned to it) reads them:
    the tokenizer class name, the chat template inside tokenizer_config.json, rope_theta/torch_dtype."""
    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.pop("backend", None)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["chat_template"] = CHAT_TEMPLATE
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("rope_theta", MODEL_CFG["rope_theta"])
    cfg.setdefault("torch_dtype", cfg.get("dtype", "float32"))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def evaluate(model_dir: Path, n: int = 100, seed: int = 0) -> dict:
    """Rewrite a demo world's captions with the stage (transformers engine); count what was kept."""
    import pyarrow as pa

    from demo.world import generate
    from stages.rewrite import Rewrite

    pairs = list(generate(n, seed=seed))
    table = pa.table({"key": [f"{i:09d}" for i in range(n)], "caption": [p.caption for p in pairs],
                      "status": ["ok"] * n})  # fmt: skip
    stage = Rewrite({"engine": "transformers", "model": str(model_dir), "seed": seed})
    t0 = time.time()
    out = stage(table)
    seconds = time.time() - t0
    rewrites = out.column("caption_rewrites").to_pylist()
    kept = total = full = distinct = 0
    for p, rws in zip(pairs, rewrites):
        full += len(rws) == stage.config.n_rewrites
        distinct += len({r.lower() for r in rws}) == len(rws)
        for r in rws:
            total += 1
            words = r.lower().replace(",", " ").replace(".", " ").split()
            kept += p.colour in r.lower() and p.shape in words
    with_any = sum(bool(r) for r in rewrites)
    return {"eval_rows": n, "rows_with_rewrites": with_any / n, "rows_with_all_rewrites": full / n,
            "rewrites_keeping_colour_and_shape": kept / max(1, total), "eval_seconds": round(seconds, 1),
            "examples": [{"caption": p.caption, "rewrites": r} for p, r in list(zip(pairs, rewrites))[:5]]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m demo.train_lm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ASSET_DIR)
    ap.add_argument("--short-steps", type=int, default=1500, help="curriculum: steps with k = 0 first")
    ap.add_argument("--steps", type=int, default=600, help="steps in the full k = 3 format")
    ap.add_argument("--batch-size", type=int, default=16, help="k = 3 batches (k = 0 batches are 1.5x)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-eval", action="store_true")
    a = ap.parse_args(argv)
    info = train(a.out, a.short_steps, a.steps, a.batch_size, a.lr, a.seed, a.threads)
    if not a.no_eval:
        info["eval"] = evaluate(a.out)
    (a.out / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "model_config"}, indent=1))


if __name__ == "__main__":
    main()
