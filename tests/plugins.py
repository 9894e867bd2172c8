"""Stages that exist only for tests, plugged in by import path (``tests.plugins:KillOnce``) with no
edit in ``pipeline/``: they are how the tests add a new stage, kill an actor mid-run, and break a
stage on purpose. Real stages, real Ray; the only thing faked is the fault itself."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from stages.base import ComputeConfig, Resources, Stage, StageConfig, replace_column, set_status


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
