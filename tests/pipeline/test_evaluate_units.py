"""``clipcurate eval`` pieces without training: the samples-seen budget, the config and its one-line
errors, the eval-set loaders (folder and Parquet), recall@k and zero-shot scoring on hand-made
embeddings, the report section."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ConfigError
from pipeline.evaluate import evalsets, train
from pipeline.evaluate.config import EvalConfig, load
from pipeline.evaluate.retrieval import recall_at


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_budget_is_samples_seen_whatever_the_output_size():
    cfg = EvalConfig(samples_seen=1000, batch_size=64)
    small, large = train.budget(cfg, 50), train.budget(cfg, 50_000)
    assert small.samples_seen == large.samples_seen == 16 * 64  # ceil(1000 / 64) whole batches
    assert small.steps == large.steps == 16
    assert small.passes == pytest.approx(1024 / 50, abs=1e-4) and large.passes == pytest.approx(
        1024 / 50_000, abs=1e-4
    )
    # open_clip rounds the batches up to a multiple of the loader workers: the budget says so too
    assert train.budget(EvalConfig(samples_seen=1000, batch_size=64, workers=3), 50).steps == 18


def test_trainer_command_carries_the_budget_not_the_output_size(tmp_path):
    cfg = EvalConfig(samples_seen=1000, batch_size=64, seed=3)
    b = train.budget(cfg, 50)
    cmd = train.command(cfg, "out/{00000..00001}.tar", b, train.model_arg(cfg, tmp_path), tmp_path, "x")
    args = dict(zip(cmd[3::2], cmd[4::2]))
    assert cmd[1:3] == ["-m", "open_clip_train.main"]
    assert args["--train-num-samples"] == "1024" and args["--epochs"] == "1" and args["--seed"] == "3"
    # the architecture only: a copy of the config without the toy weights (random initialisation)
    model_dir = args["--model"].removeprefix("local-dir:")
    assert sorted(p.name for p in (tmp_path / "arch").iterdir()) == ["open_clip_config.json"]
    assert model_dir == str(tmp_path / "arch")


def test_parse_trainer_log():
    text = (
        "INFO | Train Epoch: 0 [ 32/96 (33%)] Data (t): 0.1 LR: 0.001 Contrastive_loss: 3.4657 (3.4657)\n"
        "INFO | Train Epoch: 0 [ 96/96 (100%)] Data (t): 0.1 LR: 0.000 Contrastive_loss: 3.2100 (3.3000)\n"
    )
    assert train.parse_log(text) == (96, 96, 3.21)
    assert train.parse_log("nothing") == (None, None, None)


def test_config_from_yaml_and_flags(tmp_path):
    (tmp_path / "classes.parquet").write_bytes(b"")
    y = tmp_path / "eval.yaml"
    y.write_text("samples_seen: 512\nclassification: classes.parquet\ntemplates: ['a {}']\n")
    cfg = load(str(y), ["seed=7", "recall_k=[5, 1, 5]"])
    assert cfg.samples_seen == 512 and cfg.seed == 7 and cfg.recall_k == [1, 5]
    assert cfg.classification == str(tmp_path / "classes.parquet")  # beside the YAML, as workflow paths
    assert cfg.model == "local-dir:demo/assets/toy_clip"
    for field in EvalConfig.model_fields.values():
        assert field.description, field


@pytest.mark.parametrize(
    "sets, msg",
    [
        (["templates=['a photo']"], "key 'templates'"),
        (["batch_size=1"], "key 'batch_size'"),
        (["sample_seen=10"], "key 'sample_seen'"),
        (["seed"], "KEY=VALUE"),
    ],
)
def test_config_errors_are_one_line(sets, msg):
    with pytest.raises(ConfigError) as e:
        load(None, sets)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_labelled_set_from_a_folder_and_from_parquet(tmp_path):
    for name, rgb in (("red_circle", (255, 0, 0)), ("blue_star", (0, 0, 255))):
        (tmp_path / "f" / name).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "f" / name / f"{i}.png").write_bytes(_png(rgb))
    (tmp_path / "f" / "notes.txt").write_text("not a class")
    s = evalsets.labelled_set(str(tmp_path / "f"))
    assert s.classes == ["blue_star", "red_circle"] and s.labels.count("red_circle") == 2
    img = _png((0, 255, 0))
    pq.write_table(
        pa.table({"img": [{"bytes": img, "path": None}, {"bytes": img, "path": None}], "y": [3, 4]}),
        tmp_path / "l.parquet",
    )
    p = evalsets.labelled_set(str(tmp_path / "l.parquet"), image_column="img", label_column="y")
    assert p.classes == ["3", "4"] and p.images == [img, img]
    with pytest.raises(ConfigError, match="no column 'label'"):
        evalsets.labelled_set(str(tmp_path / "l.parquet"), image_column="img")


def test_caption_set_from_a_folder(tmp_path):
    for key, cap in (("a", "a red circle"), ("b", "a blue star"), ("c", None)):
        (tmp_path / f"{key}.png").write_bytes(_png((1, 2, 3)))
        if cap:
            (tmp_path / f"{key}.txt").write_text(cap + "\n")
    s = evalsets.caption_set(str(tmp_path))
    assert s.captions == ["a red circle", "a blue star"] and len(s.images) == 2


def test_recall_at_k_counts_the_first_right_answer():
    sim = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.7], [0.1, 0.2, 0.3]])
    right = np.eye(3, dtype=bool)
    assert recall_at(sim, right, [1, 2, 3]) == {"R@1": 0.6667, "R@2": 0.6667, "R@3": 1.0}
    # a duplicate caption is as good as the image's own
    right[1, 0] = True
    assert recall_at(sim, right, [1])["R@1"] == 1.0


def test_zeroshot_scores_per_class(monkeypatch):
    """Hand-made embeddings stand in for a model (the real one is used in test_evaluate.py)."""
    from pipeline.evaluate import zeroshot as zs

    data = evalsets.LabelledSet([b"x"] * 4, ["a", "a", "b", "b"], ["a", "b"])
    monkeypatch.setattr(zs, "encode_images", lambda *a: np.array([[1, 0], [0, 1], [0, 1], [0, 1]], float))
    monkeypatch.setattr(zs, "encode_texts", lambda m, t, texts, *a: np.array(
        [[1, 0] if "a" == x.split()[-1] else [0, 1] for x in texts], float))  # fmt: skip
    out = zs.zeroshot(None, None, None, data, EvalConfig(templates=["{}", "x {}"]))
    assert out["per_class"] == {"a": 0.5, "b": 1.0}
    assert out["mean_accuracy"] == 0.75 and out["accuracy"] == 0.75 and out["chance"] == 0.5


def test_report_section_renders_eval_json(tmp_path):
    from pipeline.html import evaluation
    from pipeline.runs import RunDir

    assert evaluation.sections(RunDir(str(tmp_path))) == []
    ev = {
        "budget": {"samples_seen": 96, "steps": 3, "batch_size": 32, "passes": 0.3},
        "seed": 0, "output_samples": 320, "caption_member": "original", "model": {"name": "m"},
        "trainer": {"samples_seen": 96, "final_loss": 3.1},
        "classification": {"mean_accuracy": 0.25, "accuracy": 0.3, "chance": 0.0125, "n_classes": 2,
                           "per_class": {"red circle": 0.5, "<b>": 0.0}, "templates": ["a {}"]},
        "retrieval": {"image_to_text": {"R@1": 0.1, "R@5": 0.4}, "text_to_image": {"R@1": 0.2, "R@5": 0.5},
                      "mean_recall": {"R@1": 0.15, "R@5": 0.45}, "n_pairs": 40},
    }  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    [html] = evaluation.sections(RunDir(str(tmp_path)))
    assert html.startswith('<section id="evaluation">')
    assert "25.0%" in html and "R@5" in html and "45.0%" in html and "&lt;b&gt;" in html


def test_readme_lists_every_eval_key_and_the_demo_eval_yaml_loads():
    from pathlib import Path

    from pipeline.docs import _rows

    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text()
    missing = [row for row in _rows(EvalConfig) if row not in readme]
    assert missing == [], "README's eval key table is out of date"
    cfg = load(str(repo / "workflows" / "eval_demo.yaml"))
    assert cfg.classification.endswith("demo_out/evalset/classes.parquet") and cfg.threads == 1


def test_shard_spec_is_a_brace_range_of_the_tars_found():
    from pipeline.evaluate.run import shard_spec

    assert shard_spec([f"/o/{i:05d}.tar" for i in range(3)]) == "/o/{00000..00002}.tar"
    assert shard_spec(["/o/00000.tar", "/o/00002.tar"]) == "/o/00000.tar::/o/00002.tar"  # a gap
    assert shard_spec(["/o/00007.tar"]) == "/o/00007.tar"
