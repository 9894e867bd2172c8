"""Image-text retrieval on a held-out caption set: recall@k in both directions.

Image -> text: an image counts as found at k when its caption is among the k captions most similar to
it; text -> image: a caption counts when its image is among its k most similar images. Captions with
the same text are interchangeable (same text, same embedding): any copy counts as the right one.
"""

from __future__ import annotations

import numpy as np

from pipeline.evaluate.evalsets import CaptionSet
from pipeline.evaluate.zeroshot import encode_images, encode_texts


def recall_at(sim: np.ndarray, right: np.ndarray, ks: list[int]) -> dict[str, float]:
    """``sim``: (queries, candidates) similarities; ``right``: same shape, True where a candidate is a
    right answer to the query. Returns ``{"R@k": share of queries with a right answer in their top k}``."""
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = np.take_along_axis(right, order, axis=1)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), sim.shape[1])  # rank of the first right answer
    return {f"R@{k}": round(float((first < k).mean()), 4) for k in ks}


def retrieval(model, preprocess, tokenizer, data: CaptionSet, cfg) -> dict:
    img = encode_images(model, preprocess, data.images, cfg.eval_batch_size, cfg.device)
    uniq = sorted(set(data.captions))
    idx = {c: i for i, c in enumerate(uniq)}
    txt = encode_texts(model, tokenizer, uniq, cfg.eval_batch_size, cfg.device)
    cap = np.array([idx[c] for c in data.captions])
    right = cap[:, None] == np.arange(len(uniq))[None, :]  # (images, distinct captions)
    i2t = recall_at(img @ txt.T, right, cfg.recall_k)
    t2i = recall_at(txt @ img.T, right.T, cfg.recall_k)
    return {
        "n_pairs": len(data.images),
        "n_distinct_captions": len(uniq),
        "image_to_text": i2t,
        "text_to_image": t2i,
        "mean_recall": {k: round((i2t[k] + t2i[k]) / 2, 4) for k in i2t},
    }
