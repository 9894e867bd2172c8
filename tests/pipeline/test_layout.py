"""Layout rules: only pipeline/ray/ imports ray; pipeline/ names no stage; modules stay small; every
registered entry honours the contract of its role."""

from __future__ import annotations

import ast
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import registry
from schemas import STAGE_FIELDS
from schemas.row import known_columns
from stages.base import Stage, StageConfig

REPO = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def test_only_pipeline_ray_imports_ray():
    offenders = []
    for pkg in ("pipeline", "stages", "schemas", "demo"):
        for f in (REPO / pkg).rglob("*.py"):
            rel = f.relative_to(REPO).as_posix()
            if "ray" in _imports(f) and not rel.startswith("pipeline/ray/"):
                offenders.append(rel)
    assert offenders == []
    assert "ray" in _imports(REPO / "pipeline" / "ray" / "executor.py")


ENGINE_NAMES = ("transformers", "openai", "vllm")


def test_pipeline_names_no_stage_and_no_engine():
    """Outside the registry and the docs generator, no string in pipeline/ code names a built-in stage
    or an engine, and no identifier is a stage or engine name other than the generic verbs ``read``
    and ``write`` (file I/O): adding a stage is a change in stages/ (and one line in the registry)."""
    import re

    words = set(registry.names()) | set(ENGINE_NAMES)
    offenders = []
    for f in (REPO / "pipeline").rglob("*.py"):
        rel = f.relative_to(REPO).as_posix()
        if rel in ("pipeline/registry.py", "pipeline/docs.py"):
            continue
        strings, names = _strings_and_names(f.read_text())
        for w in sorted(words):
            pat = rf"(?<![A-Za-z0-9_]){re.escape(w)}(?![A-Za-z0-9_])"
            if any(re.search(pat, s, flags=re.IGNORECASE) for s in strings):
                offenders.append(f"{rel}: '{w}' in a string")
            if w not in ("read", "write") and w in names:
                offenders.append(f"{rel}: identifier {w}")
    assert offenders == []


def _strings_and_names(text: str) -> tuple[list[str], set[str]]:
    """String literals (not docstrings; f-string text included) and identifiers of a module."""
    import ast

    tree = ast.parse(text)
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
                docs.add(id(node.body[0].value))
    strings, names = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            strings.append(node.value)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
    return strings, names


@pytest.mark.parametrize("pkg", ["pipeline", "stages"])
def test_modules_stay_small(pkg):
    big = []
    for f in (REPO / pkg).rglob("*.py"):
        n = len(f.read_text().splitlines())
        if n > 450:
            big.append(f"{f.relative_to(REPO)}: {n} lines")
    assert big == []


@pytest.mark.parametrize("name", registry.names())
def test_stage_contract(name):
    from stages.base import RoleConfig
    from stages.roles import Sink, Source

    cls = registry.get(name)
    assert cls.name == name
    if issubclass(cls, Source | Sink):
        assert issubclass(cls.Config, RoleConfig) and not hasattr(cls, "process")
    else:
        assert issubclass(cls, Stage) and issubclass(cls.Config, StageConfig)
    assert cls.Config.model_config.get("extra") == "forbid"
    for key, f in cls.Config.model_fields.items():
        assert f.description, f"{name}: config key {key!r} has no Field(description=...)"
    for col in (*cls.requires, *cls.produces):
        assert col in known_columns(), f"{name}: column {col!r} is not in schemas/"
    # a stage declares the columns it adds: typed in schemas/ STAGE_FIELDS, never a base column
    # (status, reason, image, ... exist from the source on; set_status/replace_column fill them)
    assert len(set(cls.produces)) == len(cls.produces), f"{name}: a column declared twice"
    for col in cls.produces:
        assert isinstance(STAGE_FIELDS.get(col), pa.DataType), f"{name}: {col!r} is not a STAGE_FIELDS column"
    if getattr(cls, "shuffle", False):  # a shuffle stage (stages.shuffle), maybe with a reduce step
        from stages.shuffle import ShuffleStage

        for m in ("partition_rows", "decide"):
            assert getattr(cls, m) is not getattr(ShuffleStage, m), f"shuffle stage {name} must implement {m}"
    if cls.is_global and (not getattr(cls, "shuffle", False) or cls.has_fit):
        for m in ("fit_partial", "merge", "load_state"):
            assert getattr(cls, m) is not getattr(Stage, m), f"global stage {name} must implement {m}"


def test_base_call_handles_chunked_columns_and_mixed_statuses():
    """Rows arrive as multi-chunk tables (concatenated blocks); non-ok rows pass through in order."""
    import pyarrow as pa

    from stages.base import Stage, set_status

    class Upper(Stage):
        name = "upper"

        def process(self, t):
            caps = [c.upper() if c != "bad" else c for c in t.column("caption").to_pylist()]
            t = t.set_column(t.column_names.index("caption"), "caption", pa.array(caps))
            return set_status(t, [c == "bad" for c in caps], "filtered_basic", "bad caption")

    part1 = pa.table({"key": ["0", "1"], "caption": ["a", "bad"], "status": ["ok", "ok"]})
    part2 = pa.table({"key": ["2", "3"], "caption": ["c", "d"], "status": ["download_failed", "ok"]})
    t = pa.concat_tables([part1, part2])
    assert t.column("status").num_chunks == 2
    out = Upper()(t)
    assert out.column("key").to_pylist() == ["0", "1", "2", "3"]
    assert out.column("caption").to_pylist() == ["A", "bad", "c", "D"]
    assert out.column("status").to_pylist() == ["ok", "filtered_basic", "download_failed", "ok"]
    assert out.column("rejected_by").to_pylist() == [None, "upper", None, None]
