"""What the report reads, and what it learns from declarations instead of stage names.

Rows come from the shard Parquet files (only the columns the report uses); the run's stages, their
resolved configs and their fitted-state summaries from ``manifest.json``; what each stage does from
its class in the registry (``fills``, ``requires``, ``produces``); which columns hold scores and
rewrites from ``schemas/``; the optional label and extra sample columns from the workflow's ``report``
keys (``pipeline.config.ReportConfig``).
"""

from __future__ import annotations

import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import registry
from pipeline.config import ReportConfig, label_key
from pipeline.runs import RunDir
from schemas import OK
from schemas.manifest import PARQUET_SUFFIX, TAR_SUFFIX, shard_files, shard_of
from schemas.members import is_image_member, split_member
from schemas.row import (
    IMAGE_COLUMN,
    LANGUAGE_COLUMN,
    OWN_STATUS_COLUMN,
    REWRITE_REASON_COLUMN,
    REWRITES_COLUMN,
    SCORE_COLUMNS,
    SHARD_COL,
    TAR_COLUMN,
    THUMBNAIL_COLUMN,
    field_type,
)

# Always read when present; score, entry, label and extra sample columns are added per run.
BASE_REPORT_COLUMNS = (
    "key", "url", "host", "caption", "status", "reason", "rule", "rejected_by", THUMBNAIL_COLUMN,
    "original_width", "original_height", LANGUAGE_COLUMN, REWRITES_COLUMN, REWRITE_REASON_COLUMN,
)  # fmt: skip


@dataclass
class StageEntry:
    """One entry of the run's ``stages`` list: position, name, resolved config, class (None: not importable)."""

    index: int
    name: str
    config: dict[str, Any]
    cls: type | None

    def declares(self, attr: str, column: str) -> bool:
        return column in (getattr(self.cls, attr, ()) or ())

    def instance(self):
        """The entry built from its resolved config (no ``setup``: nothing loads), or None."""
        if self.cls is None:
            return None
        try:
            return self.cls(self.config)
        except Exception:  # noqa: BLE001 - a config this version cannot build: report without it
            return None

    def score_columns(self) -> tuple[str, ...]:
        """The floating-point columns the entry writes (its ``output_columns``): scores, head outputs."""
        inst = self.instance()
        cols = inst.output_columns() if inst is not None and hasattr(inst, "output_columns") else {}
        return tuple(c for c, t in cols.items() if t is not None and pa.types.is_floating(t))


def stage_entries(manifest: dict) -> list[StageEntry]:
    out = []
    for i, item in enumerate(manifest.get("config", {}).get("stages", [])):
        name, cfg = next(iter(item.items()))
        try:
            cls = registry.get(name)
        except Exception:  # noqa: BLE001 - a plug-in not importable here: report without its declarations
            cls = None
        out.append(StageEntry(i, name, cfg or {}, cls))
    return out


def report_config(manifest: dict) -> ReportConfig:
    return ReportConfig.model_validate(manifest.get("config", {}).get("report") or {})


def image_fillers(stages: list[StageEntry]) -> list[StageEntry]:
    """The stages that fill the image column (their rejected rows are the failures to fetch an image)."""
    return [s for s in stages if s.declares("fills", IMAGE_COLUMN)]


def entry_columns(stage: StageEntry) -> list[str]:
    """Columns the stage produces that hold a list of integer ids per row (matched entries)."""
    out = []
    for col in getattr(stage.cls, "produces", ()) or ():
        t = field_type(col)
        if t is not None and pa.types.is_list(t) and pa.types.is_integer(t.value_type):
            out.append(col)
    return out


def entry_stages(manifest: dict, stages: list[StageEntry]) -> list[StageEntry]:
    """Global stages whose state summary ranks entries by count (a ``top_entries`` list)."""
    gs = manifest.get("global_state") or {}
    return [s for s in stages if isinstance((gs.get(s.name) or {}).get("top_entries"), list)]


def score_columns(manifest: dict) -> tuple[str, ...]:
    """``SCORE_COLUMNS`` and every floating-point column a stage of the run writes (named model scores,
    flipped scores, heads' outputs)."""
    cols = list(SCORE_COLUMNS)
    for s in stage_entries(manifest):
        cols += s.score_columns()
    return tuple(dict.fromkeys(cols))


def thresholds(manifest: dict) -> list[tuple[str, float, tuple[str, ...]]]:
    """Every score threshold of the run: (label, value, score columns it applies to).

    From any stage config key ``min_score`` (also per entry of a ``models`` list, on its ``column``),
    any global state summary with a ``threshold``, and the ``rules`` of a summary (``column``,
    ``threshold``, ``min_score``, ``max_score``); a stage-level threshold applies to the score
    columns its stage requires or produces (all, if undeclared)."""
    out = []
    gs = manifest.get("global_state") or {}
    for s in stage_entries(manifest):
        cols = tuple(c for c in SCORE_COLUMNS if s.declares("requires", c) or s.declares("produces", c))
        cols = cols or (SCORE_COLUMNS if s.cls is None else ())
        if s.config.get("min_score") is not None:
            out.append((f"{s.name} min_score", float(s.config["min_score"]), cols))
        for m in s.config.get("models") or []:
            if isinstance(m, dict) and m.get("min_score") is not None and m.get("column"):
                out.append((f"{s.name} min_score", float(m["min_score"]), (m["column"],)))
        summary = gs.get(s.name) or {}
        rules = summary.get("rules")
        if isinstance(rules, list):
            for r in rules:
                col = r.get("column") if isinstance(r, dict) else None
                if not col:
                    continue
                if r.get("threshold") is not None:
                    out.append((f"{s.name} top_fraction {r.get('top_fraction')}", float(r["threshold"]), (col,)))
                for key in ("min_score", "max_score"):
                    if r.get(key) is not None:
                        out.append((f"{s.name} {key}", float(r[key]), (col,)))
        elif summary.get("threshold") is not None:
            label = f"{s.name} threshold"
            if summary.get("top_fraction") is not None:
                label = f"{s.name} top_fraction {summary['top_fraction']}"
            out.append((label, float(summary["threshold"]), cols))
    return list(dict.fromkeys(out))  # a single-rule summary repeats the config's min_score


def wanted_columns(manifest: dict, stages: list[StageEntry], rc: ReportConfig) -> list[str]:
    cols = [*BASE_REPORT_COLUMNS, *score_columns(manifest)]
    for s in entry_stages(manifest, stages):
        cols += entry_columns(s)
    cols += [c for c in (rc.label_column, *rc.show_columns) if c]
    return list(dict.fromkeys(cols))


def load_rows(rd: RunDir, columns: list[str]) -> pl.DataFrame:
    """Every row of every shard Parquet (those of ``columns`` that exist), plus the shard name."""
    frames = []
    for p in sorted(rd.fs.glob(rd.path("*.parquet"))):
        base = posixpath.basename(p)
        if shard_of(base, (PARQUET_SUFFIX,)) is None:
            continue
        with rd.fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            own = OWN_STATUS_COLUMN in names  # write.img2dataset_compat: `status` holds img2dataset's values
            want = [OWN_STATUS_COLUMN if own and c == "status" else c for c in [*columns, TAR_COLUMN]]
            table = pf.read(columns=[c for c in dict.fromkeys(want) if c in names])
            if own:
                table = table.rename_columns(["status" if c == OWN_STATUS_COLUMN else c for c in table.column_names])
        frames.append(pl.from_arrow(table).with_columns(pl.lit(base[: -len(".parquet")]).alias(SHARD_COL)))
    if not frames:
        base = ("key", "status", "reason", "rejected_by", SHARD_COL)
        return pl.DataFrame(schema=dict.fromkeys(base, pl.String))
    return pl.concat(frames, how="diagonal_relaxed")


def stage_status(df: pl.DataFrame) -> dict[str, dict[str, int]]:
    """stage -> status -> rows, over the rejected rows of the Parquet files."""
    out: dict[str, dict[str, int]] = {}
    rej = df.filter(pl.col("status") != OK).group_by(["rejected_by", "status"]).len()
    for stage, status, n in rej.sort(["rejected_by", "status"]).iter_rows():
        out.setdefault(stage or "unknown", {})[status] = n
    return out


def read_images(rd: RunDir, wanted: dict[str, list[str]]) -> dict[str, bytes]:
    """Image bytes of ``wanted`` keys (tar -> keys; a tar is a path relative to the output, or a shard
    name for its own tar), read from the tars."""
    out: dict[str, bytes] = {}
    for shard, keys in wanted.items():
        path = rd.path(shard if shard.endswith(TAR_SUFFIX) else shard_files(shard)[0])
        if not rd.exists(path):
            continue
        want = set(keys)
        with rd.fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                key, ext = split_member(m.name)
                if m.isfile() and key in want and is_image_member(ext):
                    data = tar.extractfile(m)
                    if data is not None:
                        out[key] = data.read()
                        want.discard(key)
                        if not want:  # do not read the rest of a (possibly remote, large) tar
                            break
    return out


def label_name(rc: ReportConfig, value: Any) -> str:
    """How a value of the label column is shown: its ``report.label_names`` entry, else the value."""
    key = label_key(value)
    return rc.label_names.get(key, key) if key is not None else "(no label)"
