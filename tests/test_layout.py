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
