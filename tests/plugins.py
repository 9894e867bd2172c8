"""Stages that exist only for tests, plugged in by import path (``tests.plugins:KillOnce``) with no
edit in ``pipeline/``: they are how the tests add a new stage, kill an actor mid-run, and break a
stage on purpose. Real stages, real Ray; the only thing faked is the fault itself."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from stages.base import ComputeConfig, Resources, Stage, StageConfig, replace_column, set_status
from stages.shuffle import PART, ShuffleStage, decisions


class CaptionLengthConfig(StageConfig):
    min_chars: int = Field(0, description="Rows whose caption is shorter are rejected (filtered_basic).")


class CaptionLength(Stage):
    """A new stage, defined outside the project: adds ``caption_chars`` and filters on it."""

    name = "caption_length"
    Config = CaptionLengthConfig
    requires = ("caption",)
    produces = ()

    def extra_produces(self) -> dict[str, pa.DataType]:
        return {"caption_chars": pa.int32()}

    def process(self, batch: pa.Table) -> pa.Table:
        n = pc.utf8_length(batch.column("caption").fill_null("")).cast(pa.int32())
        out = replace_column(batch, "caption_chars", n, pa.int32())
        short = pc.less(n, self.config.min_chars)
        return set_status(out, short, "filtered_basic", f"caption_length:min_chars < {self.config.min_chars}")


class KillOnceConfig(ComputeConfig):
    marker: str = Field(description="File created by the first worker that dies; its absence arms the kill.")


class KillOnce(Stage):
    """An actor that exits hard (``os._exit``) on its first batch, once per ``marker`` file, as a
    crashing worker would; every later call passes rows through unchanged."""

    name = "kill_once"
    Config = KillOnceConfig

    def resources(self) -> Resources:
        c = self.config
        return Resources(num_cpus=c.num_cpus, concurrency=c.concurrency, batch_size=c.batch_size, actor=True)

    def setup(self) -> None:
        pass

    def process(self, batch: pa.Table) -> pa.Table:
        try:
            fd = os.open(self.config.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return batch
        os.close(fd)
        os._exit(1)


BROKEN_ENV = "CLIPCURATE_TEST_BROKEN"  # forwarded to Ray workers (CLIPCURATE_ prefix)


class BrokenConfig(StageConfig):
    fail_shard_prefix: str = Field("", description="Keys starting with this raise (all keys when empty).")
    fail_every: int = Field(1, ge=1, description="Of the matching keys, every n-th raises (1: all of them).")


class Broken(Stage):
    """Raises on rows whose key starts with ``fail_shard_prefix`` (every ``fail_every``-th of them),
    while the environment variable ``CLIPCURATE_TEST_BROKEN`` is set: unset, it is 'fixed'. Runs as
    an actor pool, as model-bearing stages do."""

    name = "broken"
    Config = BrokenConfig
    requires = ("caption",)

    def resources(self) -> Resources:
        return Resources(num_cpus=0.5, concurrency=1, actor=True)

    def process(self, batch: pa.Table) -> pa.Table:
        if os.environ.get(BROKEN_ENV):
            c = self.config
            for key in batch.column("key").to_pylist():
                if key.startswith(c.fail_shard_prefix) and int(key) % c.fail_every == 0:
                    raise KeyError(f"template field 'caption_en' missing (key {key})")
        return batch


class ScoreBandDedupConfig(StageConfig):
    column: str = Field("clip_score", description="The score column.")
    bands: int = Field(10, ge=1, description="Scores are cut into this many bands of [0, max].")


class ScoreBandDedup(ShuffleStage):
    """A shuffle stage with a reduce step (``has_fit``), as SemDeDup's k-means before its shuffle:
    the fit finds the pool's largest score; rows whose score falls in the same band of ``[0, max]``
    are duplicates of the band's smallest key."""

    name = "score_band_dedup"
    Config = ScoreBandDedupConfig
    has_fit = True

    def required_columns(self) -> tuple[str, ...]:
        return ("key", self.config.column)

    @property
    def fit_columns(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.config.column,)

    @property
    def partition_columns(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.config.column,)

    def fit_partial(self, batch: pa.Table) -> float:
        ok = batch.filter(pc.equal(batch.column("status"), "ok"))
        return float(pc.max(ok.column(self.config.column)).as_py() or 0.0)

    def merge(self, states: list[float]) -> dict:
        return {"max": max(states, default=0.0)}

    def load_state(self, state: dict) -> None:
        self._max = state["max"]

    def state_summary(self, state: dict) -> dict:
        return {"max": state["max"]}

    def partition_rows(self, batch: pa.Table) -> pa.Table:
        scores = batch.column(self.config.column).to_pylist()
        band = [min(int(s / self._max * self.config.bands), self.config.bands - 1) for s in scores]
        return pa.table({PART: pa.array(band, pa.uint64()), "key": batch.column("key"), "band": band})

    def decide(self, group: pa.Table) -> pa.Table:
        first: dict[int, str] = {}
        for k, b in sorted(zip(group.column("key").to_pylist(), group.column("band").to_pylist())):
            first.setdefault(b, k)
        keys, bands = group.column("key").to_pylist(), group.column("band").to_pylist()
        idx = [i for i, (k, b) in enumerate(zip(keys, bands)) if first[b] != k]
        reasons = [f"score_band_dedup: band {bands[i]} of key {first[bands[i]]}" for i in idx]
        return decisions(group, idx, reasons, "duplicate:score_band")
