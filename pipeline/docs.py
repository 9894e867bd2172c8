"""Generate the README's stage reference from the pydantic schema: every config key of the top level
and of each stage, with its default and its ``Field(description=...)`` (else the comment beside it in
the source); a tagged union (a key with ``Field(discriminator=...)``) gets one sub-table per member;
keys that name local paths are marked (resolved by ``pipeline.paths``). ``python -m pipeline.docs`` prints it;
``python -m pipeline.docs --write`` replaces the block between the markers in README.md, and
``tests/pipeline/test_docs.py`` checks that README.md is up to date."""

from __future__ import annotations

import inspect
import io
import re
import sys
import tokenize
from pathlib import Path
from typing import get_args

from pydantic import BaseModel

from pipeline import registry
from stages.base import PATH_MARK

BEGIN = "<!-- BEGIN STAGE REFERENCE (python -m pipeline.docs --write) -->"
END = "<!-- END STAGE REFERENCE -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its comment: the comment lines just above the field plus the comment at the
    end of its line (the convention of every stage's Config)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        trailing: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT and not tok.line.strip().startswith("#"):
                trailing[tok.start[0]] = tok.string.lstrip("#").strip()
        pending: list[str] = []
        for line_no, line in enumerate(src.splitlines(), start=1):
            stripped = line.strip()
            if line.startswith("    #") and not line.startswith("     "):
                pending.append(stripped.lstrip("#").strip())
                continue
            m = re.match(r"    (\w+)\s*:", line)
            if m and not stripped.startswith(("def ", "@", "return")):
                text = " ".join([*pending, trailing.get(line_no, "")]).strip()
                if text:
                    out[m.group(1)] = text
            pending = []
    return out


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    d = field.get_default(call_default_factory=True)
    if d is None:
        return "`null`"
    if isinstance(d, float) and d == float("inf"):
        return "`.inf`"
    return f"`{d!r}`".replace("'", '"') if not isinstance(d, bool) else f"`{str(d).lower()}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rows(model: type[BaseModel], skip: set[str] = frozenset()) -> list[str]:
    """One table row per key of ``model``: its description (else the comment beside it in the source)."""
    comments = _comments(model)
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, field in model.model_fields.items():
        if key in skip:
            continue
        text = field.description or comments.get(key, "")
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get(PATH_MARK):
            text += " *(path: resolved against the workflow's folder, then the working directory)*"
        rows.append(f"| `{key}` | {_default(field)} | {_cell(text)} |")
    return rows


def _top_level() -> list[str]:
    from pipeline.config import PipelineConfig, RayConfig, ReportConfig

    parts = ["#### Top level", "", *_rows(PipelineConfig), ""]
    parts += ["#### `ray:`", "", *_rows(RayConfig), ""]
    parts += ["#### `report:`", "", *_rows(ReportConfig), ""]
    return parts


def _list_members(field) -> list[type[BaseModel]]:
    """The model of a ``list[Model]`` (or ``list[Model] | None``) field, else []."""
    for arg in (field.annotation, *get_args(field.annotation)):
        if getattr(arg, "__origin__", None) is list:
            return [a for a in get_args(arg) if isinstance(a, type) and issubclass(a, BaseModel)]
    return []


def _list_tables(key: str, field) -> list[str]:
    """One sub-table for the items of a list of nested models (``key: [{...}, ...]``)."""
    parts = []
    for m in _list_members(field):
        text = _cell((m.__doc__ or "").strip().split("\n\n")[0])
        parts += ["", f"`{key}:` items — {text}", "", *_rows(m)]
    return parts


def _union_members(field) -> tuple[str, list[type[BaseModel]]] | None:
    """``(discriminator, member models)`` of a tagged-union field, else None."""
    disc = field.discriminator
    if not isinstance(disc, str):
        return None
    members = [a for a in get_args(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return (disc, members) if members else None


def _union_tables(key: str, field) -> list[str]:
    """One sub-table per member of a tagged union (``key: {disc: TAG, ...}``)."""
    union = _union_members(field)
    if union is None:
        return []
    disc, members = union
    parts = []
    for m in members:
        tag = ", ".join(str(v) for v in get_args(m.model_fields[disc].annotation))
        text = _cell(m.model_fields[disc].description or (m.__doc__ or "").strip().split("\n\n")[0])
        parts += ["", f"`{key}: {{{disc}: {tag}, ...}}` — {text}", "", *_rows(m, skip={disc})]
    return parts


def stage_reference() -> str:
    parts = []
    for name in registry.names():
        cls = registry.get(name)
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]
        doc = " ".join(doc.split())
        kind = "global (fit over the whole pool first)" if cls.is_global else "per batch"
        if getattr(cls, "shuffle", False):
            kind = "global, shuffle (rows hash-partitioned by the compared key, decided per partition)"
        parts.append(f"#### `{name}` ({kind})\n\n{doc}\n")
        if cls.requires:
            parts.append(f"Requires: {', '.join(f'`{c}`' for c in cls.requires)}. ")
        if cls.produces:
            parts.append(f"Adds: {', '.join(f'`{c}`' for c in cls.produces)}.")
        parts.append("")
        parts += _rows(cls.Config)
        for key, field in cls.Config.model_fields.items():
            parts += _union_tables(key, field)
            parts += _list_tables(key, field)
        parts.append("")
    return "\n".join([*_top_level(), *parts]).strip() + "\n"


def main() -> int:
    ref = stage_reference()
    if "--write" in sys.argv:
        text = README.read_text()
        i, j = text.index(BEGIN), text.index(END)
        README.write_text(text[: i + len(BEGIN)] + "\n" + ref + text[j:])
        print(f"updated {README}")
    else:
        print(ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
