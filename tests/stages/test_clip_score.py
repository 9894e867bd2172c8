"""clip_score against a plain open_clip forward (issue #4, acceptance 1), on the toy CLIP, CPU, fp32."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
from PIL import Image

from stages.clip_score import ClipScore
from tests.conftest import REPO

MODEL = "local-dir:" + str(REPO / "demo" / "assets" / "toy_clip")


@pytest.fixture(scope="module")
def pairs(demo_world) -> pa.Table:
    """48 demo pairs (matched and mismatched), re-encoded as the download stage would (JPEG, 96 px)."""
    import pyarrow.parquet as pq

    w = pq.read_table(demo_world / "world.parquet").to_pylist()
    rows = []
    for r in w:
        if r["broken"] is not None:
            continue
        with Image.open(demo_world / r["path"]) as im:
            im = im.convert("RGB").resize((96, 96))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
        rows.append(
            {"key": f"{len(rows):04d}", "caption": r["caption"], "image": buf.getvalue(), "status": "ok"}
        )
        if len(rows) == 48:
            break
    return pa.Table.from_pylist(rows)


def _reference(pairs: pa.Table) -> np.ndarray:
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL)
    tok = open_clip.get_tokenizer(MODEL)
    model.eval()
    ims = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in pairs.column("image").to_pylist()])
    with torch.no_grad():
        i = model.encode_image(ims)
        t = model.encode_text(tok(pairs.column("caption").to_pylist()))
    i = i / i.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    return (i * t).sum(-1).numpy()


def test_scores_equal_plain_open_clip(pairs):
    stage = ClipScore(ClipScore.Config(model=MODEL, batch_size=16, device="cpu"))
    stage.setup()
    out = stage(pairs)
    got = np.array(out.column("clip_score").to_pylist(), dtype=np.float32)
    ref = _reference(pairs)
    assert np.abs(got - ref).max() < 1e-3
    assert out.schema.field("clip_score").type == pa.float32()


def test_batch_size_does_not_change_scores(pairs):
    a = ClipScore(ClipScore.Config(model=MODEL, batch_size=5, device="cpu"))(pairs)
    b = ClipScore(ClipScore.Config(model=MODEL, batch_size=48, device="cpu"))(pairs)
    assert np.allclose(a.column("clip_score").to_pylist(), b.column("clip_score").to_pylist(), atol=1e-5)


def test_tensor_decode_path_is_close_to_pil(pairs):
    """``decode: tensor`` (torchvision decode_jpeg + torch resize, the GPU path) tracks the PIL path."""
    pil = ClipScore(ClipScore.Config(model=MODEL, batch_size=16, device="cpu"))(pairs)
    ten = ClipScore(ClipScore.Config(model=MODEL, batch_size=16, device="cpu", decode="tensor"))(pairs)
    a, b = np.array(pil.column("clip_score").to_pylist()), np.array(ten.column("clip_score").to_pylist())
    assert np.abs(a - b).max() < 0.03
    assert np.corrcoef(a, b)[0, 1] > 0.99


def test_bad_images_min_score_and_embeddings(pairs):
    t = pairs.slice(0, 6)
    imgs = t.column("image").to_pylist()
    imgs[1] = b"not an image"
    imgs[2] = imgs[2][: len(imgs[2]) // 3]  # truncated JPEG
    t = t.set_column(t.column_names.index("image"), "image", pa.array(imgs, pa.binary()))
    stage = ClipScore(
        ClipScore.Config(model=MODEL, batch_size=4, device="cpu", min_score=0.99, embeddings=True)
    )
    out = stage(t)
    st = out.column("status").to_pylist()
    assert st[1] == "decode_failed" and "UnidentifiedImageError" in out.column("reason")[1].as_py()
    assert out.column("image")[1].as_py() is None, "a rejected row's image is nulled"
    scored = [i for i in range(6) if st[i] != "decode_failed"]
    assert all(st[i] == "filtered_clip" for i in scored), "min_score 0.99 rejects everything scored"
    assert out.column("reason")[0].as_py().startswith("clip:min_score clip_score ")
    assert out.column("rejected_by").to_pylist()[0] == "clip_score"
    assert out.column("image_embedding").null_count == 6, "rejected rows carry no embeddings"
    kept = ClipScore(ClipScore.Config(model=MODEL, batch_size=4, device="cpu", embeddings=True))(t)
    emb = kept.column("image_embedding")[0].as_py()
    assert emb is not None and len(emb) == len(kept.column("text_embedding")[0].as_py())
    assert kept.schema.field("image_embedding").type == pa.list_(pa.float16())
    assert abs(sum(v * v for v in emb) - 1.0) < 0.02, "normalised embedding"


def test_model_info_names_model():
    info = ClipScore(ClipScore.Config(model="ViT-L-14", pretrained="datacomp_xl_s13b_b90k")).model_info()
    assert info["model"] == "ViT-L-14" and info["pretrained"] == "datacomp_xl_s13b_b90k"


def test_forward_batch_size_does_not_change_scores(pairs):
    """``batch_size`` is rows per process call; ``forward_batch_size`` the model's batch inside it."""
    a = ClipScore(ClipScore.Config(model=MODEL, batch_size=48, forward_batch_size=5, device="cpu"))(pairs)
    b = ClipScore(ClipScore.Config(model=MODEL, batch_size=48, forward_batch_size=48, device="cpu"))(pairs)
    assert np.allclose(a.column("clip_score").to_pylist(), b.column("clip_score").to_pylist(), atol=1e-5)
    assert ClipScore(ClipScore.Config(model=MODEL, batch_size=48)).resources().batch_size == 48


def test_a_nan_score_is_never_ok_and_unscored(pairs):
    """A model whose weights hold NaN (a broken checkpoint, made by filling one of the toy CLIP's image
    weight matrices with NaN) scores every row NaN: each row is filtered_clip with the tag
    ``clip_score:nan``, never kept with a null score."""
    stage = ClipScore(ClipScore.Config(model=MODEL, batch_size=16, device="cpu"))
    stage.setup()
    visual = stage.loaded[0].model.visual
    with torch.no_grad():
        next(p for p in visual.parameters() if p.ndim == 2).fill_(float("nan"))
    out = stage(pairs)
    assert out.column("status").to_pylist() == ["filtered_clip"] * pairs.num_rows
    assert set(out.column("rule").to_pylist()) == {"clip_score:nan"}
    assert out.column("clip_score").null_count == pairs.num_rows
