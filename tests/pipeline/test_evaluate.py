"""``clipcurate eval`` end to end (issue #20): open_clip's own trainer on a demo output (CPU, the toy
architecture from random weights, a tiny budget), zero-shot and retrieval on the demo's held-out sets,
``eval.json`` and the report's section; and equal compute: two outputs of different sizes are trained
on the same number of samples seen, as the trainer itself reports it."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from demo.evalset import CAPTIONS_NAME, CLASSES_NAME

REPO = Path(__file__).resolve().parents[2]
BUDGET = 96  # samples seen: 3 steps of 32


def _flags(evalset) -> list[str]:
    return [
        f"classification={evalset / CLASSES_NAME}", f"retrieval={evalset / CAPTIONS_NAME}",
        f"samples_seen={BUDGET}", "batch_size=32", "threads=1", "seed=3", "templates=['a {}', 'a drawing of a {}']",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(demo_run, demo_evalset, tmp_path_factory):
    """A copy of the demo output (the shared one stays untouched), evaluated through the CLI."""
    from pipeline import cli

    src, _ = demo_run
    out = tmp_path_factory.mktemp("eval") / "output"
    shutil.copytree(src, out)
    args = ["eval", str(out)]
    for s in _flags(demo_evalset):
        args += ["--set", s]
    assert cli.main(args) == 0
    return out, json.loads((out / "eval.json").read_text())


def test_eval_writes_eval_json_and_the_report_section(evaluated):
    out, ev = evaluated
    assert ev["seed"] == 3
    assert ev["budget"]["samples_seen"] == BUDGET and ev["budget"]["steps"] == 3
    assert ev["trainer"]["samples_seen"] == BUDGET  # what open_clip's trainer says it saw
    assert ev["caption_member"] == "original"  # workflows/demo.yaml keeps the original in KEY.txt
    cfg = json.loads((REPO / "demo/assets/toy_clip/open_clip_config.json").read_text())
    assert ev["model"]["config"] == cfg  # the architecture (weights: random, not the toy's)
    c = ev["classification"]
    assert c["n_classes"] == 80 and len(c["per_class"]) == 80 and c["chance"] == 0.0125
    assert all(0 <= v <= 1 for v in c["per_class"].values())
    assert c["mean_accuracy"] == pytest.approx(sum(c["per_class"].values()) / 80, abs=1e-3)
    r = ev["retrieval"]
    assert set(r["image_to_text"]) == set(r["text_to_image"]) == {"R@1", "R@5"}
    assert all(0 <= v <= 1 for v in [*r["image_to_text"].values(), *r["text_to_image"].values()])
    assert c["in_training_data"] == 0 and r["in_training_data"] == 0
    assert not (out / "_eval" / "logs" / "seed3" / "checkpoints").exists()  # only eval.json is kept
    page = (out / "report.html").read_text()
    assert '<section id="evaluation">' in page and "Zero-shot classification" in page


def test_outputs_of_different_sizes_get_the_same_samples_seen(evaluated, demo_evalset, tmp_path):
    """A second output holding one of the demo output's tars: fewer samples, same budget."""
    from pipeline.evaluate.config import load
    from pipeline.evaluate.run import evaluate

    big, big_ev = evaluated
    small = tmp_path / "small"
    small.mkdir()
    tar = sorted(big.glob("*.tar"))[0]
    shutil.copy(tar, small / tar.name)
    with tarfile.open(tar) as t:
        n = sum(m.name.endswith(".txt") for m in t)
    manifest = json.loads((big / "manifest.json").read_text())
    manifest.update(total_samples=n, shard_pattern=str(small / tar.name), output=str(small))
    (small / "manifest.json").write_text(json.dumps(manifest))

    ev = evaluate(str(small), load(None, _flags(demo_evalset)))
    assert ev["output_samples"] == n < big_ev["output_samples"]
    assert ev["trainer"]["samples_seen"] == big_ev["trainer"]["samples_seen"] == BUDGET
    assert ev["budget"]["steps"] == big_ev["budget"]["steps"]
    assert ev["budget"]["passes"] > big_ev["budget"]["passes"]  # the small output is seen more often


def test_a_trainer_failure_exits_1_naming_its_log(tmp_path, demo_evalset, capsys):
    """A model open_clip does not know: the trainer fails; eval exits 1 with one line naming the log."""
    import io

    from pipeline import cli

    out = tmp_path / "out"
    out.mkdir()
    with tarfile.open(out / "00000.tar", "w") as t:
        for i in range(4):
            for ext, data in (
                ("txt", b"a red circle"),
                ("jpg", (demo_evalset / CLASSES_NAME).read_bytes()[:10]),
            ):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    (out / "manifest.json").write_text(
        json.dumps({"total_samples": 4, "shard_pattern": str(out / "00000.tar")})
    )
    args = ["eval", str(out), "--set", "model=no-such-architecture", "--set", "batch_size=2"]
    args += ["--set", f"retrieval={demo_evalset / CAPTIONS_NAME}", "--set", "samples_seen=4"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out}: the trainer failed") and "train-seed0.log" in err
    assert "\n" not in err and (out / "_eval" / "train-seed0.log").is_file()
