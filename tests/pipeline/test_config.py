"""Bad configs fail before any work, with one line naming the file, the stage and the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config, plan
from pipeline.config import ConfigError

GOOD = """
name: t
output: {out}
stages:
  - read: {{path: urls.parquet}}
  - download: {{image_size: 64, allowed_networks: ["127.0.0.0/8"]}}
  - clip_score: {{model: local-dir:demo/assets/toy_clip, min_score: 0.2}}
  - write: {{}}
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


def _error(path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        pipe = config.load(path, overrides=list(overrides))
        plan.check(pipe)
    msg = str(e.value)
    assert "\n" not in msg, "the error is one line"
    assert msg.startswith(str(path)), "the error names the file"
    return msg


def test_good_config_validates(tmp_path):
    p = _write(tmp_path, GOOD.format(out=tmp_path / "o"))
    pipe = config.load(p)
    steps = plan.check(pipe)
    assert [s.name for s in steps] == ["read", "download", "clip_score", "write"]
    assert steps[2].kind == "actor"  # clip_score holds a model: actor pool
    assert "clip_score" in plan.describe(pipe, steps)


def test_unknown_stage(tmp_path):
    p = _write(tmp_path, GOOD.format(out="o").replace("clip_score:", "clip_scorer:"))
    msg = _error(p)
    assert "stages[2]" in msg and "unknown stage 'clip_scorer'" in msg and "clip_score" in msg


def test_unknown_key(tmp_path):
    p = _write(tmp_path, GOOD.format(out="o").replace("min_score:", "min_scor:"))
    msg = _error(p)
    assert "stages[2] (clip_score)" in msg and "unknown key 'min_scor'" in msg
    assert "allowed keys:" in msg and "min_score" in msg


def test_wrong_type(tmp_path):
    p = _write(tmp_path, GOOD.format(out="o").replace("image_size: 64", "image_size: big"))
    msg = _error(p)
    assert "stages[1] (download)" in msg and "'image_size'" in msg and "'big'" in msg


def test_wrong_type_through_set(tmp_path):
    p = _write(tmp_path, GOOD.format(out="o"))
    msg = _error(p, "stages.clip_score.batch_size=lots")
    assert "stages[2] (clip_score)" in msg and "'batch_size'" in msg


def test_missing_required_column(tmp_path):
    text = """
stages:
  - read: {path: urls.parquet}
  - clip_score: {model: local-dir:demo/assets/toy_clip}
  - download: {}
  - write: {}
"""
    msg = _error(_write(tmp_path, text))
    assert "stages[1] (clip_score)" in msg and "requires column 'image'" in msg and "'download'" in msg


def test_unknown_top_level_key(tmp_path):
    msg = _error(_write(tmp_path, GOOD.format(out="o") + "sampels_per_shard: 3\n"))
    assert "unknown key 'sampels_per_shard'" in msg and "samples_per_shard" in msg


def test_set_overrides_by_name_and_position(tmp_path):
    p = _write(tmp_path, GOOD.format(out="o"))
    pipe = config.load(p, overrides=["stages.clip_score.min_score=0.5", "stages.1.timeout=3", "samples_per_shard=7"])
    assert pipe.stages[2].config.min_score == 0.5
    assert pipe.stages[1].config.timeout == 3
    assert pipe.config.samples_per_shard == 7


def test_cli_fails_before_any_work(tmp_path):
    out = tmp_path / "never"
    p = _write(tmp_path, GOOD.format(out=out).replace("min_score:", "min_scor:"))
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(p)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "min_scor" in lines[0]
    assert not out.exists(), "no work (not even the output folder) before the config is valid"


def test_yaml_is_safe_loaded(tmp_path):
    p = _write(tmp_path, "!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert "invalid YAML" in str(e.value)
