"""The row-error path of ``stages.base.Stage.__call__`` (no Ray): a micro-batch where one row raises
is retried row by row and only that row becomes ``stage_error``; a stage that returns fewer rows
than it was given is an error (stages must not drop rows); a stage whose every row raises fails.
The stages are plug-in classes defined here, as a user's would be; the only thing faked is the
fault itself."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from stages.base import Stage, StageConfig, StageFailed, replace_column


class CountingConfig(StageConfig):
    bad_caption: str = ""


class RaisesOnOneCaption(Stage):
    """Upper-cases captions; raises on a batch holding ``bad_caption``; records each batch's keys."""

    name = "raises_on_one"
    Config = CountingConfig
    requires = ("caption",)

    def setup(self) -> None:
        self.calls: list[list[str]] = []

    def process(self, batch: pa.Table) -> pa.Table:
        self.calls.append(batch.column("key").to_pylist())
        if self.config.bad_caption in batch.column("caption").to_pylist():
            raise ValueError(f"cannot handle {self.config.bad_caption!r}")
        return replace_column(batch, "caption", pc.utf8_upper(batch.column("caption")), pa.string())


class DropsOneCaption(RaisesOnOneCaption):
    """Returns the batch without the rows whose caption is ``bad_caption`` (a bug: rows dropped)."""

    name = "drops_one"

    def process(self, batch: pa.Table) -> pa.Table:
        self.calls.append(batch.column("key").to_pylist())
        return batch.filter(pc.not_equal(batch.column("caption"), self.config.bad_caption))


def table(captions: list[str], status: list[str] | None = None) -> pa.Table:
    return pa.table(
        {
            "key": [f"{i:03d}" for i in range(len(captions))],
            "caption": captions,
            "status": status or ["ok"] * len(captions),
        }
    )


def test_one_raising_row_of_a_batch_is_the_only_stage_error():
    stage = RaisesOnOneCaption(CountingConfig(bad_caption="boom"))
    captions = ["a", "b", "boom", "d", "e"]
    out = stage(table(captions, ["ok", "ok", "ok", "ok", "download_failed"]))
    keys = ["000", "001", "002", "003", "004"]
    # the batch of the 4 ok rows once, then each of them alone
    assert stage.calls == [keys[:4], ["000"], ["001"], ["002"], ["003"]]
    assert out.column("key").to_pylist() == keys
    assert out.column("status").to_pylist() == ["ok", "ok", "stage_error", "ok", "download_failed"]
    assert out.column("caption").to_pylist() == ["A", "B", "boom", "D", "e"]
    assert out.column("rejected_by").to_pylist() == [None, None, "raises_on_one", None, None]
    assert out.column("rule").to_pylist()[2] == "stage_error"
    reason = out.column("reason").to_pylist()[2]
    assert reason.startswith("raises_on_one: ValueError: cannot handle 'boom'"), reason


def test_a_batch_without_a_bad_row_is_processed_once():
    stage = RaisesOnOneCaption(CountingConfig(bad_caption="boom"))
    out = stage(table(["a", "b", "c"]))
    assert stage.calls == [["000", "001", "002"]]
    assert out.column("status").to_pylist() == ["ok"] * 3


def test_every_row_raising_fails_the_stage():
    stage = RaisesOnOneCaption(CountingConfig(bad_caption="boom"))
    with pytest.raises(StageFailed, match="every row of a batch of 2 raised: ValueError: cannot handle"):
        stage(table(["boom", "boom"]))


def test_a_stage_that_drops_rows_is_caught():
    """Rows in == rows out is enforced: the row a stage drops becomes ``stage_error`` naming the
    rule, the others pass; a stage that drops every row fails."""
    stage = DropsOneCaption(CountingConfig(bad_caption="gone"))
    out = stage(table(["a", "gone", "c"]))
    assert out.column("key").to_pylist() == ["000", "001", "002"]
    assert out.column("status").to_pylist() == ["ok", "stage_error", "ok"]
    reason = out.column("reason").to_pylist()[1]
    assert "returned 0 rows for 1: stages must not drop rows" in reason, reason
    with pytest.raises(StageFailed, match="stages must not drop rows"):
        DropsOneCaption(CountingConfig(bad_caption="gone"))(table(["gone", "gone"]))
