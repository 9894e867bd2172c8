"""Executor checks that need a real Ray session: resources are checked before any work."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from tests.conftest import demo_pipeline


@pytest.mark.parametrize(
    "override, words",
    [
        ("stages.clip_score.num_gpus=1", ["stages[2] (clip_score)", "num_gpus=1", "no GPU"]),
        ("stages.clip_score.concurrency=8", ["stages[2] (clip_score)", "clip_score 8x", "lower 'concurrency'"]),
    ],
)
def test_unplaceable_actor_pools_fail_before_any_work(ray_session, demo_urls, tmp_path, override, words):
    from pipeline import ray as executor

    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        executor.run(demo_pipeline(demo_urls, out, [override]))
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(("stages", "num_gpus=0)"))
    for w in words:
        assert w in msg, msg
    assert not out.exists(), "no work before the check"


def test_counters_count_the_rows_a_stage_works_on():
    """The progress counters count the ``ok`` rows a stage got (``Stage.__call__`` processes only
    those), not the rejected rows it passes through."""
    import pyarrow as pa

    from pipeline.ray.workers import ok_rows

    t = pa.table({"status": ["ok", "filtered_clip", "ok", None, "download_failed"]})
    assert ok_rows(t) == 2
    assert ok_rows(pa.table({"url": ["a", "b"]})) == 2, "a table without statuses yet (the source's input)"
