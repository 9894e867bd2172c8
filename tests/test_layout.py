"""Layout rules: only pipeline/executor.py imports ray; every registered stage honours the contract."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline import registry
from schemas import STAGE_FIELDS
from schemas.row import known_columns
from stages.base import Stage, StageConfig

REPO = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def test_only_executor_imports_ray():
    offenders = []
    for pkg in ("pipeline", "stages", "schemas", "demo"):
        for f in (REPO / pkg).rglob("*.py"):
            if "ray" in _imports(f) and f.relative_to(REPO).as_posix() != "pipeline/executor.py":
                offenders.append(str(f.relative_to(REPO)))
    assert offenders == []
    assert "ray" in _imports(REPO / "pipeline" / "executor.py")


@pytest.mark.parametrize("name", registry.names())
def test_stage_contract(name):
    cls = registry.get(name)
    assert issubclass(cls, Stage) and cls.name == name
    assert issubclass(cls.Config, StageConfig)
    assert cls.Config.model_config.get("extra") == "forbid"
    for col in (*cls.requires, *cls.produces):
        assert col in known_columns(), f"{name}: column {col!r} is not in schemas/"
    for col in cls.produces:
        assert col in STAGE_FIELDS or col in known_columns()
    if cls.is_global:
        for m in ("fit_partial", "merge", "load_state"):
            assert getattr(cls, m) is not getattr(Stage, m), f"global stage {name} must implement {m}"
