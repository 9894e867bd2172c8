"""The one rule for path keys (pipeline/paths.py): the workflow file's folder first, then the working
directory; ``local-dir:`` resolved after its prefix; URLs, fsspec paths and ``hf-hub:`` untouched. And
config-dependent required columns fail at plan time."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import config, plan
from pipeline.config import ConfigError
from pipeline.paths import resolve_path
from tests.conftest import REPO


def _workflow(folder: Path, *stages: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wf = folder / "w.yaml"
    raw = {"stages": [{"read": {"path": "urls.parquet"}}, *stages, {"write": {}}]}
    wf.write_text(yaml.safe_dump(raw))
    return wf


def _cfg(pipe, name: str):
    return next(s.config for s in pipe.stages if s.name == name)


def test_relative_to_the_workflow_file(tmp_path, monkeypatch):
    wf = _workflow(tmp_path / "flows", {"balance": {"metadata": "meta.json"}})
    (tmp_path / "flows" / "meta.json").write_text('["a"]')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # outside the workflow's folder: an absolute path
    assert _cfg(config.load(wf), "balance").metadata == str(tmp_path / "flows" / "meta.json")
    monkeypatch.chdir(tmp_path)  # the workflow's folder is inside the cwd: relative to the cwd
    assert _cfg(config.load(wf), "balance").metadata == "flows/meta.json"


def test_cwd_fallback_keeps_the_path_as_written(tmp_path, monkeypatch):
    wf = _workflow(tmp_path / "flows", {"balance": {"metadata": "assets/meta.json"}})
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "meta.json").write_text('["a"]')
    monkeypatch.chdir(tmp_path)
    assert _cfg(config.load(wf), "balance").metadata == "assets/meta.json"


def test_workflow_folder_wins_over_cwd(tmp_path, monkeypatch):
    wf = _workflow(tmp_path / "flows", {"balance": {"metadata": "meta.json"}})
    (tmp_path / "flows" / "meta.json").write_text('["a"]')
    (tmp_path / "meta.json").write_text('["b"]')
    monkeypatch.chdir(tmp_path)
    assert _cfg(config.load(wf), "balance").metadata == "flows/meta.json"


def test_found_nowhere_is_kept_and_urls_are_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wf = _workflow(tmp_path / "flows", {"balance": {"metadata": "missing.json"}})
    assert _cfg(config.load(wf), "balance").metadata == "missing.json"
    for url in ("s3://bucket/meta.json", "gs://b/m.txt", "file:///x/meta.json"):
        wf = _workflow(tmp_path / "flows", {"balance": {"metadata": url}})
        assert _cfg(config.load(wf), "balance").metadata == url


def test_local_dir_prefix_and_model_names(tmp_path, monkeypatch):
    (tmp_path / "flows" / "toy").mkdir(parents=True)
    (tmp_path / "ViT-B-32").mkdir()  # a folder named like an architecture: clip_score's model stays a name
    monkeypatch.chdir(tmp_path)
    for model, want in [
        ("local-dir:toy", "local-dir:flows/toy"),
        ("ViT-B-32", "ViT-B-32"),
        ("hf-hub:org/name", "hf-hub:org/name"),
        ("local-dir:not-here", "local-dir:not-here"),
    ]:
        wf = _workflow(tmp_path / "flows", {"clip_score": {"model": model}})
        assert _cfg(config.load(wf), "clip_score").model == want, model


def test_path_keys_inside_a_list_of_nested_models(tmp_path, monkeypatch):
    """clip_score's ``models:`` and ``heads:`` items: each item's path keys follow the same rule."""
    (tmp_path / "flows" / "toy").mkdir(parents=True)
    (tmp_path / "flows" / "q.safetensors").write_bytes(b"")
    (tmp_path / "ViT-B-32").mkdir()
    monkeypatch.chdir(tmp_path)
    models = [{"column": "a", "model": "local-dir:toy"}, {"column": "b", "model": "ViT-B-32"}]
    heads = [{"column": "q", "model": "a", "path": "q.safetensors"}]
    wf = _workflow(tmp_path / "flows", {"clip_score": {"models": models, "heads": heads}})
    c = _cfg(config.load(wf), "clip_score")
    assert [m.model for m in c.models] == ["local-dir:flows/toy", "ViT-B-32"]
    assert c.heads[0].path == "flows/q.safetensors"


def test_demo_workflow_both_spellings_resolve_to_the_toy_clip(monkeypatch):
    """From the repository root (make demo, ray job submit --working-dir .), the workflow may name the
    toy CLIP relative to itself or to the root; both give the same config (and config hash)."""
    monkeypatch.chdir(REPO)
    bases = [REPO / "workflows", REPO]
    want = "local-dir:demo/assets/toy_clip"
    assert resolve_path("local-dir:../demo/assets/toy_clip", bases) == want
    assert resolve_path(want, bases) == want
    pipe = config.load(REPO / "workflows" / "demo.yaml")
    assert _cfg(pipe, "clip_score").model == want
    # Another working directory: the relative-to-the-workflow spelling still finds it (absolute).
    assert resolve_path("local-dir:../demo/assets/toy_clip", bases, cwd=REPO / "bench") == (
        f"local-dir:{REPO / 'demo' / 'assets' / 'toy_clip'}"
    )


def test_resolve_path_edge_cases(tmp_path):
    flows, other = tmp_path / "flows", tmp_path / "cwd"
    flows.mkdir()
    (flows / "a.tar").write_text("")
    bases = [flows]
    assert resolve_path("/abs/x.json", bases) == "/abs/x.json"
    assert resolve_path("*.tar", bases, cwd=other) == str(flows / "*.tar")  # a glob that matches
    assert resolve_path("*.tar", bases, cwd=tmp_path) == "flows/*.tar"
    assert resolve_path("*.zip", bases, cwd=other) == "*.zip"
    assert resolve_path("a.tar", bases, prefixed=True) == "a.tar"  # prefixed keys: plain values are names


def test_from_dict_without_a_file_uses_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "meta.json").write_text('["a"]')
    monkeypatch.chdir(tmp_path)
    raw = {"stages": [{"read": {"path": "u.parquet"}}, {"balance": {"metadata": "./meta.json"}}, {"write": {}}]}
    assert _cfg(config.from_dict(raw), "balance").metadata == "./meta.json"


# ---- config-dependent required columns fail at plan time ------------------------------------------


def test_plan_rejects_a_missing_text_column():
    raw = {
        "stages": [
            {"read": {"path": "u.parquet"}},
            {"balance": {"metadata": "m.json", "text_column": "alt_text"}},
            {"write": {}},
        ]
    }
    with pytest.raises(ConfigError, match=r"stages\[1\] \(balance\): requires column 'alt_text'"):
        plan.check(config.from_dict(raw, source="w.yaml"))


def test_plan_rejects_a_dedup_on_sha256_before_download():
    raw = {"stages": [{"read": {"path": "u.parquet"}}, {"dedup": {"by": ["sha256"]}}, {"write": {}}]}
    with pytest.raises(ConfigError, match=r"stages\[1\] \(dedup\): requires column 'sha256'.*'download'"):
        plan.check(config.from_dict(raw, source="w.yaml"))
    raw["stages"][1] = {"dedup": {"by": ["url"]}}
    plan.check(config.from_dict(raw, source="w.yaml"))


# ---- missing_paths: the files a workflow names exist (clipcurate validate, a local run) --------------


def test_missing_paths_names_each_missing_file(tmp_path, monkeypatch):
    """Keys whose value is always a path are checked; a key that may hold a name (a model id, a tag)
    only when the value can only be a path; URLs and hf-hub: ids never."""
    from pipeline import registry
    from pipeline.paths import missing_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "meta.json").write_text('["a"]')
    (tmp_path / "model").mkdir()
    cfg = lambda name, **kw: registry.get(name).Config(**kw)  # noqa: E731
    assert missing_paths(cfg("balance", metadata="meta.json")) == []
    assert missing_paths(cfg("balance", metadata="nope.json")) == [("metadata", "nope.json")]
    assert missing_paths(cfg("clip_score", model="local-dir:model")) == []
    assert missing_paths(cfg("clip_score", model="local-dir:gone")) == [("model", "local-dir:gone")]
    assert missing_paths(cfg("clip_score", model="ViT-B-32", pretrained="laion2b_s34b_b79k")) == []
    assert missing_paths(cfg("clip_score", model="hf-hub:org/name")) == []
    assert missing_paths(cfg("clip_score", model="ViT-B-32", pretrained="./ckpt.pt")) == [("pretrained", "./ckpt.pt")]
    assert missing_paths(cfg("read", path=["meta.json", "s3://bucket/x.parquet", "gone*.parquet"])) == [
        ("path", "gone*.parquet")
    ]
    assert missing_paths(cfg("read", path=f"file://{tmp_path}/meta.json")) == []
    # nested configs (rewrite's engine): a Hub id is a name; a folder spelled as a path must exist
    rw = cfg("rewrite", engine={"type": "transformers", "model": "org/model"})
    assert missing_paths(rw) == []
    rw = cfg("rewrite", engine={"type": "transformers", "model": "./models/lm"})
    assert missing_paths(rw) == [("engine.model", "./models/lm")]
