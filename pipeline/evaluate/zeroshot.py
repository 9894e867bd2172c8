"""Zero-shot classification: one text embedding per class (the normalised mean over the prompt
templates), each image assigned the class of highest cosine similarity."""

from __future__ import annotations

import io

import numpy as np

from pipeline.evaluate.evalsets import LabelledSet


def encode_images(model, preprocess, images: list[bytes], batch: int, device: str) -> np.ndarray:
    """L2-normalised image embeddings, one row per image."""
    import torch
    from PIL import Image

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.stack(
                [preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[i : i + batch]]
            )
            out.append(model.encode_image(x.to(device), normalize=True).float().cpu().numpy())
    return np.concatenate(out)


def encode_texts(model, tokenizer, texts: list[str], batch: int, device: str) -> np.ndarray:
    """L2-normalised text embeddings, one row per text."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            out.append(
                model.encode_text(tokenizer(texts[i : i + batch]).to(device), normalize=True)
                .float()
                .cpu()
                .numpy()
            )
    return np.concatenate(out)


def prompt_name(label: str, names: dict[str, str]) -> str:
    """The name a label takes in the prompts: ``names[label]``, else the label with ``_`` as spaces."""
    return names.get(label, label.replace("_", " "))


def class_embeddings(model, tokenizer, classes, templates, names, batch, device) -> np.ndarray:
    """(classes, dim): per class, the normalised mean of its normalised prompt embeddings."""
    prompts = [t.format(prompt_name(c, names)) for c in classes for t in templates]
    emb = encode_texts(model, tokenizer, prompts, batch, device).reshape(len(classes), len(templates), -1)
    mean = emb.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True).clip(1e-12)


def zeroshot(model, preprocess, tokenizer, data: LabelledSet, cfg) -> dict:
    """Per-class accuracy, their mean (balanced accuracy), overall top-1 accuracy and chance level."""
    img = encode_images(model, preprocess, data.images, cfg.eval_batch_size, cfg.device)
    cls = class_embeddings(model, tokenizer, data.classes, cfg.templates, cfg.class_names,
                           cfg.eval_batch_size, cfg.device)  # fmt: skip
    pred = (img @ cls.T).argmax(axis=1)
    index = {c: i for i, c in enumerate(data.classes)}
    truth = np.array([index[lab] for lab in data.labels])
    correct = pred == truth
    per_class = {c: round(float(correct[truth == i].mean()), 4) for i, c in enumerate(data.classes)}
    return {
        "n_images": len(data.images),
        "n_classes": len(data.classes),
        "templates": list(cfg.templates),
        "mean_accuracy": round(float(np.mean(list(per_class.values()))), 4),
        "accuracy": round(float(correct.mean()), 4),
        "chance": round(1 / len(data.classes), 4),
        "per_class": per_class,
    }
