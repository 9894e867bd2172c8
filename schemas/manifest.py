"""Layout of the run-level files: ``NNNNN_stats.json`` per shard and ``manifest.json`` per run.

These are plain dicts written as JSON. The pydantic models here document and validate them;
``clipcurate report`` and the tests read the files back through them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"  # open_clip's {"NNNNN.tar": samples} beside the tars (written at the end of a run)
MANIFEST_VERSION = 1
STATE_DIR = "_clipcurate"  # run state inside the output folder: config, input shards, fit states


def shard_name(shard_id: int, digits: int = 5) -> str:
    return f"{shard_id:0{digits}d}"


# The files of one output shard NAME: NAME.tar, NAME.parquet, NAME_stats.json (written last: it
# marks the shard complete).
TAR_SUFFIX, PARQUET_SUFFIX, STATS_SUFFIX = ".tar", ".parquet", "_stats.json"
SHARD_SUFFIXES = (TAR_SUFFIX, PARQUET_SUFFIX, STATS_SUFFIX)


def shard_files(name: str) -> tuple[str, str, str]:
    """The file names (tar, parquet, stats) of shard ``name`` (``shard_name(...)``)."""
    return tuple(f"{name}{suffix}" for suffix in SHARD_SUFFIXES)


def shard_of(base: str, suffixes: tuple[str, ...] = SHARD_SUFFIXES) -> str | None:
    """The shard name of a file name ``base`` (``00012.tar`` -> ``00012``) when it is one of the
    shard files with one of ``suffixes``, else None."""
    for suffix in suffixes:
        if base.endswith(suffix) and base[: -len(suffix)].isdigit():
            return base[: -len(suffix)]
    return None


def shard_complete(name: str, file_names: set[str] | frozenset[str]) -> bool:
    """Whether shard ``name`` is complete: its Parquet and its ``_stats.json`` (written last, after
    the tar) are among ``file_names`` (base names). The tar is not looked for: with
    ``write.reshard`` it is kept in the run state until the balanced tars replace it."""
    _, parquet, stats = shard_files(name)
    return {parquet, stats} <= set(file_names)


class ShardStats(BaseModel):
    """``NNNNN_stats.json`` — img2dataset's per-shard stats, plus per-stage funnels."""

    model_config = ConfigDict(extra="allow")

    shard: str
    count: int  # rows in this shard (all statuses)
    successes: int  # ``ok`` rows, i.e. samples in the tar
    failed_to_download: int = 0
    failed_to_resize: int = 0
    status_dict: dict[str, int] = Field(default_factory=dict)  # status -> count
    # "status: reason" -> count, the reason's per-row numbers as "#" (top 200, rest summed)
    reason_dict: dict[str, int] = Field(default_factory=dict)
    rule_dict: dict[str, int] = Field(default_factory=dict)  # "status: rule" -> count (the `rule` column)
    stage_status: dict[str, dict[str, int]] = Field(default_factory=dict)  # stage -> status -> count
    tar_bytes: int = 0
    parquet_bytes: int = 0
    tar_samples: int | None = None  # samples written to this shard's tar (None in older stats: successes)
    # img2dataset's timing fields (seconds since the epoch): the shard's rows loaded by the source
    # (start_time) to its files written (end_time); shards overlap, as img2dataset's do across processes.
    start_time: float | None = None
    end_time: float | None = None
    duration: float | None = None


class ShardEntry(BaseModel):
    name: str
    count: int
    successes: int


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    version: int = MANIFEST_VERSION
    name: str
    output: str
    total_rows: int  # rows in == rows out: every input row is in some shard Parquet
    total_samples: int  # ``ok`` rows: use as open_clip's --train-num-samples
    # open_clip's --train-data: the tars' brace pattern (out/{00000..00041}.tar), as a webdataset
    # ``pipe:aws s3 cp ... -`` for s3:// outputs (webdataset has no s3 handler)
    shard_pattern: str
    shard_urls: str = ""  # the same brace pattern as plain URLs (s3://..., gs://..., local paths)
    tar_count: int = 0  # tars listed in sizes.json (with write.reshard: the balanced ones)
    shards: list[ShardEntry]
    status_counts: dict[str, int]
    rule_counts: dict[str, int] = Field(default_factory=dict)  # "status: rule" -> rows, summed over shards
    stage_status: dict[str, dict[str, int]]  # stage -> status -> rows it set (rows it rejected or kept)
    stage_seconds: dict[str, float] = Field(default_factory=dict)  # busy seconds summed over workers (this run)
    stage_rows: dict[str, int] = Field(default_factory=dict)  # rows each stage processed (this run)
    fit_seconds: dict[str, float] = Field(default_factory=dict)  # global stages' fit pass (this run)
    resumed: bool = False
    input_rows: int = 0
    models: dict[str, dict] = Field(default_factory=dict)  # stage -> model names, tags, prompts
    global_state: dict[str, dict] = Field(default_factory=dict)  # stage -> summary of fitted state
    config: dict
    config_hash: str
    versions: dict[str, str]
    started_at: str
    finished_at: str
    wall_seconds: float
