"""Train the demo's toy vision-language model and save it as an ordinary Hugging Face model dir.

    python -m demo.train_vlm --n-images 2000 --steps 2000 --out P1          # phase 1: the caption format
    python -m demo.train_vlm --init-from P1 --out P2 --n-images 8000 --steps 2500 --lr 1e-3 \
        --encoder-lr-scale 1.0 --aux-weight 1.0 --seed 5678                      # phase 2: shapes (aux loss)
    python -m demo.train_vlm --init-from P2 --out demo/assets/toy_vlm --n-images 8000 --steps 1500 \
        --lr 5e-4 --encoder-lr-scale 1.0 --aux-weight 1.0 --seed 9012            # phase 3: lower rate

About 13 CPU-minutes on one thread in all (the three phases' ``train_cpu_seconds`` in ``train_info.json``).

1. Images of the shapes world (``demo.world.render``, a training seed of its own), fed the way the demo
   pipeline stores them: img2dataset's ``Resizer`` to 64 px in ``border`` mode, JPEG re-encode
   (``demo.train_clip.as_pipeline_image``).
2. A ``VisionEncoderDecoderModel``: the toy CLIP's image tower (``demo/assets/toy_clip``, converted from
   open_clip to a ``CLIPVisionModel``) as the encoder, a 2-layer GPT-2 with cross-attention as the
   decoder, and a word-level tokenizer (``tokenizers`` ``WordLevel``) over the world's caption words.
   ``AutoModelForImageTextToText``, ``AutoTokenizer`` and ``AutoImageProcessor`` load the folder.
3. Two prompt modes, as decoder prefixes that the tokenizer's chat template renders from the user
   message (so the ``recaption`` stage prompts it like any chat VLM):
   * scratch: ``<s> <cap>`` -> "a red circle on a white background";
   * alt-text-conditioned (Altogether style): a user message ending in ``Alt-text: {alt}`` renders
     ``<s> <alt> {alt} <fix>``; the target is the alt-text's own template with the colour, shape and
     background the image shows, and the alt-text's other words (size, wording) kept. Half the training
     alt-texts are wrong (another colour and shape, like the world's mismatched captions), half right
     (the target is then the alt-text itself).
4. Trained deterministically on CPU (seeded, ``torch.use_deterministic_algorithms``, fixed threads),
   saved with ``save_pretrained`` (float32, a few MB), evaluated on the demo world (seed 0, n=400):
   the share of captions naming the true colour and shape, per mode, into ``train_info.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers  # noqa: E402

from demo.world import BACKGROUND_WEIGHTS, BACKGROUNDS, COLOURS, SHAPES, TEMPLATES, _article, render  # noqa: E402

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "toy_vlm"
CLIP_DIR = Path(__file__).resolve().parent / "assets" / "toy_clip"
IMAGE_SIZE = 64
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<cap>", "<alt>", "<fix>"]
ALT_MARKER = "Alt-text:"
# The decoder prefix from chat messages: the last user text; "...Alt-text: X" -> "<s> <alt> X <fix>".
CHAT_TEMPLATE = (
    "{%- set ns = namespace(text='') -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
    "{%- if m['content'] is string -%}{%- set ns.text = m['content'] -%}"
    "{%- else -%}{%- for c in m['content'] -%}{%- if c['type'] == 'text' -%}{%- set ns.text = c['text'] -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endif -%}{%- endfor -%}"
    "{%- if '"
    + ALT_MARKER
    + "' in ns.text -%}<s> <alt> {{ ns.text.split('"
    + ALT_MARKER
    + "')[-1].strip() }} <fix>"
    "{%- else -%}<s> <cap>{%- endif -%}"
)
DECODER_CFG = dict(n_positions=64, n_embd=96, n_layer=2, n_head=4, n_inner=256)
SCRATCH_TEMPLATE = "{a} {colour} {shape} on {bg_a} {bg} background"
TRAIN_SEED = 4321


def fmt(template: str, colour: str, shape: str, bg: str, size: str) -> str:
    return template.format(a=_article(colour), colour=colour, shape=shape, bg=bg, bg_a=_article(bg), size=size,
                           a_size=_article(size))  # fmt: skip


def vocabulary() -> list[str]:
    words = set()
    for t in (*TEMPLATES, SCRATCH_TEMPLATE):
        for c in COLOURS:
            for s in SHAPES:
                for bg in BACKGROUNDS:
                    for size in ("small", "large"):
                        words.update(fmt(t, c, s, bg, size).split())
    return SPECIAL + sorted(words)


def build_tokenizer():
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIAL[4:],
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = DECODER_CFG["n_positions"]
    return fast


def clip_vision_from_open_clip(clip_dir: Path = CLIP_DIR):
    """The toy CLIP's image tower as a ``CLIPVisionModel`` (same weights, open_clip's layout renamed)."""
    import open_clip
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = json.loads((clip_dir / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    width, layers = cfg["width"], cfg["layers"]
    hf_cfg = CLIPVisionConfig(
        hidden_size=width, intermediate_size=int(width * cfg["mlp_ratio"]), num_hidden_layers=layers,
        num_attention_heads=width // cfg["head_width"], image_size=cfg["image_size"], patch_size=cfg["patch_size"],
        hidden_act="gelu", layer_norm_eps=1e-5,
    )  # fmt: skip
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    sd = {k: v.float() for k, v in model.visual.state_dict().items()}
    out = {
        "embeddings.patch_embedding.weight": sd["conv1.weight"],
        "embeddings.class_embedding": sd["class_embedding"],
        "embeddings.position_embedding.weight": sd["positional_embedding"],
        "pre_layrnorm.weight": sd["ln_pre.weight"],
        "pre_layrnorm.bias": sd["ln_pre.bias"],
        "post_layernorm.weight": sd["ln_post.weight"],
        "post_layernorm.bias": sd["ln_post.bias"],
    }
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        qw, kw, vw = sd[src + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = sd[src + "attn.in_proj_bias"].chunk(3)
        for name, w, b in (("q_proj", qw, qb), ("k_proj", kw, kb), ("v_proj", vw, vb)):
            out[dst + f"self_attn.{name}.weight"], out[dst + f"self_attn.{name}.bias"] = w, b
        pairs = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                 "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
        for d, s in pairs.items():
            out[dst + d + ".weight"], out[dst + d + ".bias"] = sd[src + s + ".weight"], sd[src + s + ".bias"]
    vision = CLIPVisionModel(hf_cfg)
    missing, unexpected = vision.load_state_dict(out, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise RuntimeError(f"open_clip -> CLIPVisionModel: missing {missing}, unexpected {unexpected}")
    return vision


def build_model(tok):
    from transformers import GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderModel

    dec_cfg = GPT2Config(
        vocab_size=len(tok), add_cross_attention=True, is_decoder=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **DECODER_CFG,
    )  # fmt: skip
    model = VisionEncoderDecoderModel(encoder=clip_vision_from_open_clip(), decoder=GPT2LMHeadModel(dec_cfg))
    model.config.decoder_start_token_id = tok.bos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    return model


def image_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3, do_rescale=True,
        do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )  # fmt: skip


def pipeline_png(img, resizer):
    """``img`` as the demo pipeline stores it (border-resized to 64 px, JPEG), decoded."""
    import io

    from demo.train_clip import as_pipeline_image

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return as_pipeline_image(buf.getvalue(), resizer).convert("RGB")


def make_images(n: int, seed: int):
    """``n`` rendered training images (pipeline-preprocessed tensors) with their truth."""
    from demo.train_clip import pipeline_resizer

    resizer, proc = pipeline_resizer(), image_processor()
    rng = random.Random(seed)
    pix, truth = [], []
    for i in range(n):
        r = random.Random(f"{seed}:{i}")
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        bg = r.choices(list(BACKGROUNDS), weights=BACKGROUND_WEIGHTS)[0]
        while bg == colour:
            bg = r.choices(list(BACKGROUNDS), weights=BACKGROUND_WEIGHTS)[0]
        img, size = render(colour, shape, bg, r)
        pix.append(proc(pipeline_png(img, resizer), return_tensors="pt")["pixel_values"][0])
        truth.append((colour, shape, bg, size))
    return torch.stack(pix), truth


def example(truth, rng: random.Random) -> tuple[str, str]:
    """(prefix, target) of one training example for an image with ``truth``."""
    colour, shape, bg, size = truth
    if rng.random() < 0.3:
        return "<s> <cap>", fmt(SCRATCH_TEMPLATE, colour, shape, bg, size)
    t = rng.choice(TEMPLATES)
    if rng.random() < 0.5:  # a wrong alt-text: another colour and shape, background and size drawn afresh
        a_colour = rng.choice([c for c in COLOURS if c not in (colour, bg)])
        a_shape = rng.choice([s for s in SHAPES if s != shape])
        a_bg = rng.choice([b for b in BACKGROUNDS if b != a_colour])
        a_size = rng.choice(("small", "large"))
    else:
        a_colour, a_shape, a_bg, a_size = colour, shape, bg, size
    alt = fmt(t, a_colour, a_shape, a_bg, a_size)
    return f"<s> <alt> {alt} <fix>", fmt(t, colour, shape, bg, a_size)


def encode_batch(tok, pairs):
    """decoder_input_ids, attention mask and labels (-100 on the prefix and padding), right-padded."""
    seqs, labels = [], []
    for prefix, target in pairs:
        p = tok(prefix, add_special_tokens=False)["input_ids"]
        t = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(p + t)
        labels.append([-100] * len(p) + t)
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), tok.pad_token_id)
    lab = torch.full((len(seqs), n), -100)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)], lab[i, : len(lb)], mask[i, : len(s)] = torch.tensor(s), torch.tensor(lb), 1
    return ids, mask, lab


def train(
    out_dir: Path, n_images: int, steps: int, batch_size: int, lr: float, threads: int,
    init_from: Path | None = None, aux_weight: float = 0.0, encoder_lr_scale: float = 0.3, seed: int = TRAIN_SEED,
) -> dict:  # fmt: skip
    """Train (or, with ``init_from``, continue training a saved model: phase 2) and save to ``out_dir``.

    ``aux_weight`` adds linear colour and shape classifiers on the mean of the encoder's output tokens
    (trained with it, not saved): a direct signal that teaches the image tower the shapes, which the toy
    CLIP's contrastive training barely needed (its mismatched captions differ in colour too)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    if init_from is not None:
        tok = AutoTokenizer.from_pretrained(init_from)
        model = AutoModelForImageTextToText.from_pretrained(init_from, dtype=torch.float32)
    else:
        tok = build_tokenizer()
        model = build_model(tok)
    t0 = time.time()
    pix, truth = make_images(n_images, seed)
    t_images = time.time() - t0
    hidden = model.config.encoder.hidden_size
    heads = torch.nn.ModuleDict(
        {"colour": torch.nn.Linear(hidden, len(COLOURS)), "shape": torch.nn.Linear(hidden, len(SHAPES))}
    )
    labels = {"colour": torch.tensor([list(COLOURS).index(t[0]) for t in truth]),
              "shape": torch.tensor([SHAPES.index(t[1]) for t in truth])}  # fmt: skip
    enc_params = list(model.encoder.parameters())
    other = [p for n, p in model.named_parameters() if not n.startswith("encoder.")] + list(
        heads.parameters()
    )
    enc_lr = lr * encoder_lr_scale
    opt = torch.optim.AdamW(
        [{"params": enc_params, "lr": enc_lr}, {"params": other, "lr": lr}], weight_decay=0.01
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[enc_lr, lr], total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    model.train()
    losses = []
    t1, cpu1 = time.time(), time.process_time()
    for step in range(steps):
        idx = [rng.randrange(n_images) for _ in range(batch_size)]
        ids, mask, lab = encode_batch(tok, [example(truth[i], rng) for i in idx])
        out = model(pixel_values=pix[idx], decoder_input_ids=ids, decoder_attention_mask=mask)
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100
        )
        if aux_weight:
            pooled = out.encoder_last_hidden_state.mean(1)
            for name, head in heads.items():
                loss = loss + aux_weight * torch.nn.functional.cross_entropy(head(pooled), labels[name][idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step} loss {np.mean(losses[-50:]):.4f} ({time.time() - t1:.0f}s)", flush=True)
    model.eval()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.generation_config.max_new_tokens = 24
    model.generation_config.decoder_start_token_id = tok.bos_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    image_processor().save_pretrained(out_dir)
    return {
        "params": sum(p.numel() for p in model.parameters()), "n_images": n_images, "steps": steps,
        "batch_size": batch_size, "lr": lr, "seed": seed, "threads": threads, "aux_weight": aux_weight,
        "encoder_lr_scale": encoder_lr_scale, "init_from": str(init_from) if init_from else None,
        "image_seconds": round(t_images, 1), "train_seconds": round(time.time() - t1, 1),
        "train_cpu_seconds": round(time.process_time() - cpu1, 1), "final_loss": round(float(np.mean(losses[-50:])), 4),
        "vocab_size": len(tok), "decoder_config": DECODER_CFG,
    }  # fmt: skip


def evaluate(model_dir: Path, n: int = 400) -> dict:
    """Recaption the demo world (seed 0) through the ``recaption`` stage's transformers engine."""
    from demo.train_clip import DEMO_WORLD, pipeline_resizer
    from demo.world import generate
    from stages.recaption.eval import world_accuracy

    pairs = [p for p in generate(n, DEMO_WORLD["seed"], DEMO_WORLD["mismatch_rate"], DEMO_WORLD["n_broken"])]
    pairs = [p for p in pairs if p.broken is None]
    return world_accuracy(model_dir, pairs, pipeline_resizer())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m demo.train_vlm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ASSET_DIR)
    ap.add_argument("--n-images", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init-from", type=Path, help="continue training this saved model (phase 2)")
    ap.add_argument("--aux-weight", type=float, default=0.0)
    ap.add_argument("--encoder-lr-scale", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=TRAIN_SEED)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--eval-only", action="store_true", help="Re-evaluate a saved model (train_info.json).")
    a = ap.parse_args(argv)
    if a.eval_only:
        info = json.loads((a.out / "train_info.json").read_text())
    else:
        info = train(a.out, a.n_images, a.steps, a.batch_size, a.lr, a.threads, a.init_from, a.aux_weight,
                     a.encoder_lr_scale, a.seed)  # fmt: skip
        if a.init_from is not None and (a.init_from / "train_info.json").is_file():
            prev = json.loads((a.init_from / "train_info.json").read_text())
            info["phase1"] = {k: v for k, v in prev.items() if k != "eval"}
    if not a.no_eval:
        info["eval"] = evaluate(a.out)
    (a.out / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "eval"}), json.dumps(info.get("eval", {}))[:2000])


if __name__ == "__main__":
    main()
