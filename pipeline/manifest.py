"""Assemble ``manifest.json`` from the shards' ``_stats.json`` and the run's counters (Ray-free),
and check each stage's ``max_error_fraction`` against it."""

from __future__ import annotations

import sys
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from schemas import Status
from schemas.manifest import MANIFEST_NAME, TAR_SUFFIX, Manifest, ShardEntry, shard_files
from stages.base import StageFailed


def versions() -> dict[str, str]:
    """Versions of clipcurate and of the dependencies it declares (those installed)."""
    import re
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        deps = [r for r in requires("clipcurate") or [] if "extra ==" not in r]
    except PackageNotFoundError:
        deps = []
    out = {}
    for p in ["clipcurate", *(re.split(r"[\s\[<>=!~;(]", d, maxsplit=1)[0] for d in deps)]:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    out["python"] = sys.version.split()[0]
    return out


def shard_urls(url: str, tars: list[str]) -> str:
    """The brace pattern of the tar files ``tars`` (``00000.tar`` ...) in output ``url``."""
    root = url.rstrip("/")
    names = [t[: -len(TAR_SUFFIX)] for t in tars]
    if len(names) > 1:
        return f"{root}/{{{names[0]}..{names[-1]}}}{TAR_SUFFIX}"
    return f"{root}/{names[0]}{TAR_SUFFIX}" if names else ""


# Object stores that webdataset (0.2.86) cannot open by URL: a ``pipe:`` command that streams one
# object to stdout (open_clip expands the braces first, so each tar gets its own command).
PIPES = {"s3": "pipe:aws s3 cp {url} -"}


def shard_pattern(url: str, tars: list[str]) -> str:
    """open_clip's ``--train-data`` (and ``wds.WebDataset``'s URL) for the tars ``tars`` in ``url``:
    the brace pattern, wrapped in a ``pipe:`` command for stores webdataset has no handler for."""
    plain = shard_urls(url, tars)
    scheme = url.split("://", 1)[0] if "://" in url else ""
    return PIPES[scheme].format(url=plain) if plain and scheme in PIPES else plain


def entering(stage_names: list[str], stage_status: dict[str, dict[str, int]], total: int) -> list[int]:
    """Rows that enter each stage of ``stage_names`` (pipeline order) as ``ok``: all rows minus those
    the stages before it rejected. The funnel of the manifest, the summary and the report."""
    out, lost = [], 0
    for name in stage_names:
        out.append(total - lost)
        lost += sum(stage_status.get(name, {}).values())
    return out


def stage_errors(stage_names: list[str], stage_status: dict[str, dict[str, int]], total: int) -> dict[str, dict]:
    """Per stage (pipeline order): rows that reached it ``ok``, and how many of them it turned into
    ``stage_error``."""
    out: dict[str, dict] = {}
    for name, entered in zip(stage_names, entering(stage_names, stage_status, total)):
        reached = max(entered, 0)
        errors = stage_status.get(name, {}).get(Status.STAGE_ERROR.value, 0)
        out[name] = {"reached": reached, "stage_error": errors, "fraction": round(errors / reached, 6) if reached else 0.0}
    return out


def build(
    *,
    pipe,
    url: str,
    stats: list[dict],
    tars: dict[str, int] | None = None,
    stage_names: list[str],
    progress: dict,
    fit_seconds: dict[str, float],
    resumed: bool,
    input_rows: int,
    models: dict[str, dict],
    global_state: dict[str, dict],
    started: datetime,
    wall: float,
) -> dict[str, Any]:
    status_counts: dict[str, int] = defaultdict(int)
    rule_counts: dict[str, int] = defaultdict(int)
    stage_status: dict[str, dict[str, int]] = {}
    for st in stats:
        for k, v in st["status_dict"].items():
            status_counts[k] += v
        for k, v in st.get("rule_dict", {}).items():
            rule_counts[k] += v
        for stg, d in st.get("stage_status", {}).items():
            tgt = stage_status.setdefault(stg, {})
            for k, v in d.items():
                tgt[k] = tgt.get(k, 0) + v
    shards = [ShardEntry(name=st["shard"], count=st["count"], successes=st["successes"]) for st in stats]
    total = sum(s.count for s in shards)
    if not tars:  # a sink that lists no tars: one per shard
        tars = {shard_files(st["shard"])[0]: st["successes"] for st in stats}
    m = Manifest(
        name=pipe.config.name,
        output=url,
        total_rows=total,
        total_samples=sum(s.successes for s in shards),
        shard_pattern=shard_pattern(url, list(tars)),
        shard_urls=shard_urls(url, list(tars)),
        tar_count=len(tars),
        shards=shards,
        status_counts=dict(sorted(status_counts.items())),
        rule_counts=dict(sorted(rule_counts.items(), key=lambda kv: -kv[1])),
        stage_status=stage_status,
        stage_seconds={k: round(v, 3) for k, v in progress["seconds"].items()},
        stage_rows=progress["rows"],
        fit_seconds={k: round(v, 3) for k, v in fit_seconds.items()},
        resumed=resumed,
        input_rows=input_rows,
        models=models,
        global_state=global_state,
        config=pipe.resolved(),
        config_hash=pipe.config_hash(),
        versions=versions(),
        started_at=started.isoformat(timespec="seconds"),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        wall_seconds=round(wall, 3),
    )
    data = m.model_dump(mode="json")
    data["stage_errors"] = stage_errors(stage_names, stage_status, total)
    return data


def write(rd, data: dict[str, Any]) -> None:
    rd.write_json(rd.path(MANIFEST_NAME), data)


def check_error_fractions(data: dict[str, Any], limits: dict[str, float]) -> None:
    """Raise ``StageFailed`` for the first stage whose share of ``stage_error`` rows is over its
    ``max_error_fraction`` (``limits``: stage name -> fraction)."""
    for name, e in data.get("stage_errors", {}).items():
        limit = limits.get(name)
        if limit is None or not e["stage_error"]:
            continue
        if e["fraction"] > limit:
            e["over_max_error_fraction"] = limit
            raise StageFailed(
                name,
                f"{e['stage_error']} of {e['reached']} rows ({e['fraction']:.1%}) ended in stage_error, over "
                f"max_error_fraction {limit:g} (see stage_status and reason counts in {MANIFEST_NAME}; "
                f"raise the limit with --set stages.{name}.max_error_fraction=...)",
            )
