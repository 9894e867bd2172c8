"""clip_score with several models and heads (issue #14, acceptance 1 and 2), on CPU in fp32.

Models: the committed toy CLIP, a second toy CLIP with another architecture and preprocessing (48 px,
other mean/std) and a third with the toy CLIP's architecture and preprocessing but other weights (it
shares the toy CLIP's preprocessed tensor). The two extra ones are open_clip models at a seeded random
initialisation, saved in a tmp dir as ``local-dir:`` folders (scores do not need trained weights to be
compared with a plain open_clip forward). Heads are random MLPs saved in the documented format.
"""

from __future__ import annotations

import io
import json

import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stages.base import StageFailed
from stages.clip_score import ClipScore, Head, save_head
from stages.clip_score import models as clip_models
from tests.conftest import REPO

TOY = "local-dir:" + str(REPO / "demo" / "assets" / "toy_clip")


def _save_model(folder, model_cfg: dict, preprocess_cfg: dict, seed: int) -> str:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg})
    )
    torch.manual_seed(seed)
    model = open_clip.create_model_and_transforms(f"local-dir:{folder}")[0]
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    return f"local-dir:{folder}"


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    toy_cfg = json.loads((REPO / "demo" / "assets" / "toy_clip" / "open_clip_config.json").read_text())
    small = {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 48,
            "layers": 2,
            "width": 64,
            "head_width": 32,
            "mlp_ratio": 2.0,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 24,
            "vocab_size": 49408,
            "width": 32,
            "heads": 4,
            "layers": 1,
            "mlp_ratio": 2.0,
        },
    }
    small_pre = {
        **toy_cfg["preprocess_cfg"],
        "size": 48,
        "mean": [0.48, 0.46, 0.41],
        "std": [0.27, 0.26, 0.28],
    }
    return {
        "toy": TOY,
        "small": _save_model(root / "small", small, small_pre, seed=1),
        "twin": _save_model(root / "twin", toy_cfg["model_cfg"], toy_cfg["preprocess_cfg"], seed=2),
    }


@pytest.fixture(scope="module")
def pairs(demo_world) -> pa.Table:
    """24 demo pairs as JPEG at 96 px (square, so a flip commutes with the resize)."""
    import pyarrow.parquet as pq

    rows = []
    for r in pq.read_table(demo_world / "world.parquet").to_pylist():
        if r["broken"] is not None:
            continue
        with Image.open(demo_world / r["path"]) as im:
            buf = io.BytesIO()
            im.convert("RGB").resize((96, 96)).save(buf, "JPEG", quality=90)
        rows.append(
            {"key": f"{len(rows):04d}", "caption": r["caption"], "image": buf.getvalue(), "status": "ok"}
        )
        if len(rows) == 24:
            break
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> dict[str, str]:
    """A ReLU MLP with a sigmoid (safetensors) on the toy CLIP (64-d) and a LAION-aesthetic-like
    Sequential with dropouts and no activations (a PyTorch state dict, keys layers.0 / layers.2 / layers.4)
    on the small model (32-d)."""
    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(3)
    save_head(
        root / "mlp.safetensors",
        [(torch.randn(16, 64), torch.randn(16)), (torch.randn(1, 16), torch.randn(1))],
    )

    class Aesthetic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(32, 24), torch.nn.Dropout(0.2), torch.nn.Linear(24, 8), torch.nn.Dropout(0.1),
                torch.nn.Linear(8, 1),
            )  # fmt: skip

    torch.save(Aesthetic().state_dict(), root / "aesthetic.pth")
    return {"mlp": str(root / "mlp.safetensors"), "aesthetic": str(root / "aesthetic.pth")}


def _config(toy_models, heads, **kw) -> dict:
    return {
        "models": [
            {"column": "toy", "model": toy_models["toy"], "flipped": True, "embeddings": True},
            {"column": "small", "model": toy_models["small"], "flipped": True},
            {"column": "twin", "model": toy_models["twin"]},
        ],
        "heads": [
            {"column": "quality", "model": "toy", "path": heads["mlp"], "sigmoid": True},
            {"column": "aesthetic", "model": "small", "path": heads["aesthetic"], "activation": "none"},
        ],
        "device": "cpu",
        **kw,
    }


def _plain(model_name: str, images: list[bytes], captions: list[str], flip: bool = False):
    """A plain open_clip forward: (raw image embeddings, cosine scores)."""
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    model.eval()
    tok = open_clip.get_tokenizer(model_name)
    ims = []
    for b in images:
        im = Image.open(io.BytesIO(b))
        ims.append(preprocess(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im))
    with torch.no_grad():
        raw = model.encode_image(torch.stack(ims))
        t = F.normalize(model.encode_text(tok(captions)), dim=-1)
    return raw, (F.normalize(raw, dim=-1) * t).sum(-1).numpy()


def test_each_model_and_head_equals_a_plain_forward(pairs, toy_models, heads):
    """Acceptance 1: three models (two preprocessings) in one stage; each score column, each flipped score,
    and each head equal the plain open_clip forward / the head applied by hand, within 1e-3 in fp32."""
    stage = ClipScore(_config(toy_models, heads, batch_size=10, forward_batch_size=4))
    out = stage(pairs)
    assert len(stage.transforms) == 2, "toy and twin share one preprocessing, small has its own"
    assert list(stage.output_columns()) == [
        "toy", "toy_flipped", "toy_image_embedding", "toy_text_embedding", "small", "small_flipped", "twin",
        "quality", "aesthetic",
    ]  # fmt: skip
    assert set(stage.output_columns()) <= set(out.column_names)
    images, caps = pairs.column("image").to_pylist(), pairs.column("caption").to_pylist()
    raw = {}
    for col in ("toy", "small", "twin"):
        raw[col], ref = _plain(toy_models[col], images, caps)
        got = np.array(out.column(col).to_pylist(), dtype=np.float32)
        assert np.abs(got - ref).max() < 1e-3, col
        assert out.schema.field(col).type == pa.float32()
    for col in ("toy", "small"):
        _, ref = _plain(toy_models[col], images, caps, flip=True)
        got = np.array(out.column(f"{col}_flipped").to_pylist(), dtype=np.float32)
        assert np.abs(got - ref).max() < 1e-3, f"{col}_flipped"
        assert np.abs(got - np.array(out.column(col).to_pylist())).max() > 1e-3, "a flip changes the score"
    # Heads by hand: tensors from the files, normalised embedding, layers in order.
    from safetensors.torch import load_file

    t = load_file(heads["mlp"])
    x = F.normalize(raw["toy"], dim=-1)
    x = torch.relu(x @ t["layers.0.weight"].T + t["layers.0.bias"])
    want = torch.sigmoid(x @ t["layers.1.weight"].T + t["layers.1.bias"])[:, 0].numpy()
    assert np.abs(np.array(out.column("quality").to_pylist()) - want).max() < 1e-3
    s = torch.load(heads["aesthetic"], weights_only=True)
    x = F.normalize(raw["small"], dim=-1)
    for i in (0, 2, 4):  # dropout is the identity at inference; no activations
        x = x @ s[f"layers.{i}.weight"].T + s[f"layers.{i}.bias"]
    assert np.abs(np.array(out.column("aesthetic").to_pylist()) - x[:, 0].numpy()).max() < 1e-3
    emb = out.column("toy_image_embedding")[0].as_py()
    assert len(emb) == 64 and abs(sum(v * v for v in emb) - 1) < 0.02
    assert out.schema.field("toy_image_embedding").type == pa.list_(pa.float16())


def test_one_decode_per_image_whatever_the_models(pairs, toy_models, heads, monkeypatch):
    """Acceptance 2: ``stages.clip_score.models.decode_image`` is the only seam (a counter wraps it; the
    stage reads it through the module, so the patch sees every call). Each image is decoded once per
    stage call, with one model or with three models, two preprocessings, flipped scores and two heads."""
    calls = []
    real = clip_models.decode_image

    def counting(data):
        calls.append(1)
        return real(data)

    monkeypatch.setattr(clip_models, "decode_image", counting)
    ClipScore({"model": TOY, "device": "cpu", "batch_size": 7, "forward_batch_size": 3})(pairs)
    assert len(calls) == pairs.num_rows
    calls.clear()
    ClipScore(_config(toy_models, heads, batch_size=7, forward_batch_size=3))(pairs)
    assert len(calls) == pairs.num_rows


def test_min_score_per_model_and_named_embeddings_of_rejected_rows(pairs, toy_models, heads):
    cfg = _config(toy_models, heads, batch_size=24)
    cfg["models"][0]["min_score"] = 0.99  # rejects everything the toy model scores
    out = ClipScore(cfg)(pairs.slice(0, 4))
    assert out.column("status").to_pylist() == ["filtered_clip"] * 4
    assert out.column("reason")[0].as_py().startswith("clip:min_score toy ")
    assert out.column("toy_image_embedding").null_count == 4, (
        "named embeddings are heavy: nulled on rejection"
    )
    assert out.column("small").null_count == 0, "the scores stay, as the one-model form keeps clip_score"


def test_bad_image_and_tensor_decode(pairs, toy_models, heads):
    t = pairs.slice(0, 5)
    imgs = t.column("image").to_pylist()
    imgs[2] = b"not an image"
    t = t.set_column(t.column_names.index("image"), "image", pa.array(imgs, pa.binary()))
    pil = ClipScore(_config(toy_models, heads))(t)
    assert pil.column("status").to_pylist()[2] == "decode_failed"
    assert pil.column("toy")[2].as_py() is None and pil.column("quality")[2].as_py() is None
    ten = ClipScore(_config(toy_models, heads, decode="tensor"))(t)
    assert ten.column("status").to_pylist() == pil.column("status").to_pylist()
    for col in ("toy", "small", "twin"):
        a = np.array([v for v in pil.column(col).to_pylist() if v is not None])
        b = np.array([v for v in ten.column(col).to_pylist() if v is not None])
        assert np.abs(a - b).max() < 0.05, col


def test_config_errors_name_the_key(toy_models, heads):
    with pytest.raises(ValueError, match="not both"):
        ClipScore.Config(model=TOY, models=[{"column": "a", "model": TOY}])
    with pytest.raises(ValueError, match="give 'model'"):
        ClipScore.Config()
    with pytest.raises(ValueError, match="is not a model column"):
        ClipScore.Config(model=TOY, heads=[{"column": "q", "model": "nope", "path": heads["mlp"]}])
    with pytest.raises(ValueError, match="name its 'model'"):
        ClipScore.Config(models=[{"column": "a", "model": TOY}, {"column": "b", "model": TOY}],
                         heads=[{"column": "q", "path": heads["mlp"]}])  # fmt: skip
    with pytest.raises(ValueError, match="written twice: a"):
        ClipScore.Config(models=[{"column": "a", "model": TOY}, {"column": "a", "model": TOY}])
    with pytest.raises(ValueError, match="lower-case"):
        ClipScore.Config(models=[{"column": "CLIP L/14", "model": TOY}])
    # A head whose width does not fit its model fails setup (the run's error, not a row's).
    stage = ClipScore({"model": TOY, "device": "cpu", "heads": [{"column": "q", "path": heads["aesthetic"]}]})
    with pytest.raises(StageFailed, match="takes 32 inputs; model 'clip_score' gives 64"):
        stage(pa.table({"key": ["0"], "caption": ["x"], "image": [b""], "status": ["ok"]}))


def test_head_format_errors(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"layers.0.weight": torch.zeros(4, 8), "layers.0.bias": torch.zeros(4)}, str(bad))
    with pytest.raises(ValueError, match="gives 4 outputs, a head must give 1"):
        Head.load(str(bad))
    save_file({"fc.weight": torch.zeros(1, 8)}, str(bad))
    with pytest.raises(ValueError, match="unexpected tensors fc.weight"):
        Head.load(str(bad))
    save_file({"layers.0.weight": torch.zeros(4, 8), "layers.0.bias": torch.zeros(4),
               "layers.1.weight": torch.zeros(1, 5), "layers.1.bias": torch.zeros(1)}, str(bad))  # fmt: skip
    with pytest.raises(ValueError, match="layer 1 takes 5 inputs, the previous layer gives 4"):
        Head.load(str(bad))
    with pytest.raises(FileNotFoundError):
        Head.load(str(tmp_path / "missing.safetensors"))


def test_one_model_form_keeps_its_columns_and_info():
    s = ClipScore({"model": TOY, "embeddings": True, "flipped": True})
    assert list(s.output_columns()) == [
        "clip_score",
        "clip_score_flipped",
        "image_embedding",
        "text_embedding",
    ]
    assert s.model_info() == {"model": TOY, "pretrained": None, "model_config_path": None}
    m = ClipScore({"models": [{"column": "clip_l14", "model": "ViT-L-14", "pretrained": "openai"}],
                   "heads": [{"column": "aesthetic", "path": "a.safetensors", "activation": "none"}]})  # fmt: skip
    assert m.model_info() == {
        "models": [{"column": "clip_l14", "model": "ViT-L-14", "pretrained": "openai"}],
        "heads": [{"column": "aesthetic", "model": "clip_l14", "path": "a.safetensors"}],
    }


def test_planner_sees_every_named_column(tmp_path):
    """The planner checks downstream ``requires`` against the declared columns: clip_filter (which
    requires ``clip_score``) plans after a model writing ``clip_score``, and not after one writing ``clip_l14``."""
    from pipeline import config, plan
    from pipeline.config import ConfigError

    def pipe(column):
        raw = {
            "name": "t",
            "stages": [
                {"read": {"path": str(tmp_path / "in.parquet")}},
                {"download": {}},
                {"clip_score": {"models": [{"column": column, "model": TOY}]}},
                {"clip_filter": {"top_fraction": 0.3}},
                {"write": {}},
            ],
        }
        return config.from_dict(raw, source="t.yaml", output=str(tmp_path / "out"))

    steps = plan.check(pipe("clip_score"))
    assert "clip_score" in next(s for s in steps if s.name == "clip_score").produces
    with pytest.raises(ConfigError, match="requires column 'clip_score'"):
        plan.check(pipe("clip_l14"))


def test_bf16_autocast_gives_float32_columns(pairs, toy_models, heads):
    """Under bf16 autocast (the GPU default; here on CPU) every column is still float32 and close to fp32."""
    fp32 = ClipScore(_config(toy_models, heads))(pairs.slice(0, 6))
    bf16 = ClipScore(_config(toy_models, heads, precision="bf16"))(pairs.slice(0, 6))
    for col in ("toy", "small_flipped", "quality", "aesthetic"):
        assert bf16.schema.field(col).type == pa.float32()
        assert (
            np.abs(np.array(bf16.column(col).to_pylist()) - np.array(fp32.column(col).to_pylist())).max()
            < 0.05
        )
