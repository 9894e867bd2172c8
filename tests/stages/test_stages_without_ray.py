"""Every stage runs without Ray: build it, call setup(), call it on an Arrow table (issue #2, 5).

Global stages are fitted the same way the executor does it, minus Ray: fit_partial on the table,
merge, load_state. The input rows come from the demo world over a real loopback HTTP server."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import registry
from schemas import OK
from stages.reduce import fit_local
from stages.shuffle import run_local
from tests.conftest import REPO

TOY_CLIP = "local-dir:" + str(REPO / "demo" / "assets" / "toy_clip")
CONFIGS = {
    "download": {"image_size": 64, "resize_mode": "border", "allowed_networks": ["127.0.0.0/8"], "timeout": 5},
    "basic_filter": {"min_image_side": 32},
    "dedup": {},
    "clip_score": {"model": TOY_CLIP, "batch_size": 16, "embeddings": True},
    "near_dedup": {},
    "semdedup": {"n_clusters": 2},
    "decontaminate": {"min_similarity": 0.999},  # eval_path: the first row's embedding (written by the test)
    "clip_filter": {"top_fraction": 0.5},
    "balance": {"metadata": str(REPO / "demo" / "assets" / "shapes_metadata.json"), "t": 5},
    "balance_worldwide": {"language_column": "language", "t": 5},  # metadata: a folder the test makes
    "rewrite": {"engine": {"type": "transformers", "model": str(REPO / "demo" / "assets" / "toy_lm")}, "n_rewrites": 1,
                "max_new_tokens": 24},
    "recaption": {"engine": {"type": "transformers", "model": str(REPO / "demo" / "assets" / "toy_vlm"), "device": "cpu"},
                  "prompt_mode": "altogether"},
    "fuse": {"engine": {"type": "transformers", "model": str(REPO / "demo" / "assets" / "toy_lm")},
             "max_new_tokens": 24},
}
ORDER = ["download", "basic_filter", "dedup", "clip_score", "near_dedup", "semdedup", "decontaminate", "clip_filter",
         "balance", "balance_worldwide", "rewrite", "recaption", "fuse"]  # fmt: skip


@pytest.fixture(scope="module")
def rows(demo_urls, tmp_path_factory) -> pa.Table:
    """The first 40 rows of the demo world as the read stage loads them."""
    from pipeline.runs import RunDir

    read = registry.get("read")(registry.get("read").Config(path=str(demo_urls)))
    read.setup()
    rd = RunDir(str(tmp_path_factory.mktemp("nr")))
    plan = rd.input_plan(read, 40)
    spec = pa.table(
        {
            "shard": pa.array([0], pa.int32()),
            "path": [rd.input_path(0)],
            "rows": [plan.counts[0]],
            "shard_digits": pa.array([plan.shard_digits], pa.int32()),
            "index_digits": pa.array([plan.index_digits], pa.int32()),
        }
    )
    return read.load_specs(spec)


def test_every_registered_stage_is_covered():
    assert set(registry.names()) == set(ORDER) | {"read", "write"}


def test_stages_chain_without_ray(rows, tmp_path):
    t = rows
    assert t.num_rows == 40 and t.column("status").to_pylist() == [OK] * 40
    for name in ORDER:
        cls = registry.get(name)
        cfg = dict(CONFIGS[name])
        if name == "balance_worldwide":  # per-language metadata: the shapes metadata as English
            (tmp_path / "langmeta").mkdir()
            (tmp_path / "langmeta" / "en.json").write_bytes(Path(CONFIGS["balance"]["metadata"]).read_bytes())
            cfg["metadata"] = str(tmp_path / "langmeta")
        if name == "decontaminate":
            ok_rows = t.filter(pc.equal(t.column("status"), OK))
            (tmp_path / "eval").mkdir()
            evalset = tmp_path / "eval" / "eval.parquet"
            pq.write_table(
                pa.table(
                    {"key": ["eval-0"], "image_embedding": ok_rows.column("image_embedding").slice(0, 1)}
                ),
                evalset,
            )
            cfg["eval_path"] = str(evalset)
        stage = cls(cls.Config(**cfg))
        stage.setup()
        if getattr(stage, "shuffle", False):  # partition -> decide -> apply, in one process
            [out] = run_local(stage, [t], 2)
        else:
            if stage.is_global:
                fit_local(stage, [t.select([*stage.fit_columns, "key", "status"])])
            out = stage(t)
        assert out.num_rows == t.num_rows, name
        assert out.column("key").to_pylist() == t.column("key").to_pylist(), f"{name} keeps row order"
        for col in stage.output_columns():
            assert col in out.column_names, f"{name} adds {col}"
        was_bad = pc.not_equal(t.column("status"), OK).to_pylist()
        now = out.column("status").to_pylist()
        assert all(now[i] == t.column("status")[i].as_py() for i, b in enumerate(was_bad) if b), (
            f"{name} passes non-ok rows through"
        )
        t = out
    assert "clip_score" in t.column_names and "caption_rewrites" in t.column_names
    assert "contaminated" in t.column("status").to_pylist(), "the eval item's own row"
    ok = t.filter(pc.equal(t.column("status"), OK))
    assert ok.num_rows > 0

    from stages.roles import SinkContext

    write = registry.get("write")(registry.get("write").Config())
    stats = write.write(t, SinkContext(output=str(tmp_path)))
    assert len(stats) == 1
    assert (Path(tmp_path) / "00000.tar").exists() and (Path(tmp_path) / "00000_stats.json").exists()
