"""Shuffle stages: global stages that compare rows with each other (exact, perceptual and semantic
dedup), at pool scale without any process holding state that grows with the pool.

A shuffle stage decides in three steps, the way datatrove's sharded dedup (signature -> find ->
filter) and NeMo Curator's (partition -> identify -> remove) do:

1. **Partition** (per block, parallel): ``partition_rows(block)`` turns the ``ok`` rows of a block
   into *partition rows*: a ``part`` (uint64: the hashed value rows are compared on; rows that may be
   duplicates of each other must share at least one ``part``), the row's ``key`` and whatever
   ``decide`` needs. It may emit several partition rows per input row (banding: a perceptual hash
   split in bands, so near hashes share a band) or none. The runner adds the row's shard (``SHARD_COL``).
2. **Decide** (per partition, parallel): the runner routes partition rows by ``part`` (every row of one
   ``part`` value reaches the same ``decide`` call; one call may hold several ``part`` values) and
   ``decide(group)`` returns the decisions for the rows it rejects (``DECISIONS`` schema; build them
   with ``decisions(group, index, ...)``).
3. **Apply** (per shard, parallel): the decisions of one shard are merged per key (the smallest
   ``rank`` wins, then the smallest reason text, so the result does not depend on the partitioning)
   and installed with ``load_decisions``; ``process`` then sets the status, reason and rule of the
   rejected rows.

A shuffle stage may also have a *reduce* step before the partition step (SemDeDup's k-means on a
sample): ``fit_partial``/``merge``/``load_state`` as for any global stage (``has_fit = True``).

``run_local`` runs the three steps in one process (tests, small pools); ``pipeline/ray`` runs them on
Ray with the same methods.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from schemas import OK, Status
from schemas.row import SHARD_COL
from stages.base import Stage, set_status

PART = "part"
DECISIONS = pa.schema(
    [
        ("key", pa.string()),
        (SHARD_COL, pa.int64()),
        ("rank", pa.int64()),  # when several decisions name one key, the smallest rank wins
        ("status", pa.string()),
        ("reason", pa.string()),
        ("rule", pa.string()),
    ]
)


def decisions(
    group: pa.Table,
    index: Iterable[int],
    reasons: list[str],
    rules: list[str] | str,
    ranks=0,
    status=Status.DUPLICATE,
) -> pa.Table:
    """Decisions for rows ``index`` of partition rows ``group`` (their key and shard come from there)."""
    index = list(index)
    n = len(index)
    idx = pa.array(index, pa.int64())
    per = lambda v: [v] * n if isinstance(v, str | int) else list(v)  # noqa: E731
    return pa.table(
        {
            "key": group.column("key").take(idx).cast(pa.string()),
            SHARD_COL: group.column(SHARD_COL).take(idx).cast(pa.int64()),
            "rank": pa.array(per(ranks), pa.int64()),
            "status": pa.array([str(status)] * n, pa.string()),
            "reason": pa.array(list(reasons), pa.string()),
            "rule": pa.array(per(rules), pa.string()),
        },
        schema=DECISIONS,
    )


def merge_decisions(tables: list[pa.Table]) -> pa.Table:
    """One decision per key: the smallest ``rank``, then the smallest reason text."""
    tables = [t.select(DECISIONS.names).cast(DECISIONS) for t in tables if t is not None and t.num_rows]
    if not tables:
        return DECISIONS.empty_table()
    t = pa.concat_tables(tables).sort_by(
        [("key", "ascending"), ("rank", "ascending"), ("reason", "ascending")]
    )
    keys = t.column("key")
    if len(keys) <= 1:
        return t
    first = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))
    keep = pa.concat_arrays([pa.array([True]), first.combine_chunks()])
    return t.filter(keep)


class ShuffleStage(Stage):
    """Base class of shuffle stages (see the module docstring)."""

    is_global = True
    shuffle: ClassVar[bool] = True
    has_fit: ClassVar[bool] = False  # True: a reduce step (fit_partial/merge/load_state) comes first
    partition_columns: ClassVar[tuple[str, ...]] = ()  # columns partition_rows reads (besides key, status)

    def partition_rows(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError

    def decide(self, group: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_decisions(self, table: pa.Table) -> None:
        """Install the merged decisions (``merge_decisions``) of the shard(s) about to be processed."""
        self._decisions = {
            k: (s, r, ru)
            for k, s, r, ru in zip(
                *(table.column(c).to_pylist() for c in ("key", "status", "reason", "rule"))
            )
        }

    def decision_summary(self, table: pa.Table) -> dict[str, Any]:
        """Small per-shard statistics of the decisions, summed over shards into the manifest."""
        return {"flagged": table.num_rows}

    def group_summary(self, group: pa.Table, decided: pa.Table) -> dict[str, Any]:
        """Small statistics of one ``decide`` call (its partition rows and decisions), summed over
        partitions into the manifest (numbers add; dicts of numbers add per key, e.g. a histogram)."""
        return {}

    def process(self, batch: pa.Table) -> pa.Table:
        found = getattr(self, "_decisions", None)
        if found is None:
            raise RuntimeError(
                f"{self.name}: no decisions; call load_decisions(...) first (see stages.shuffle)"
            )
        hits = [found.get(k) for k in batch.column("key").to_pylist()]
        if not any(hits):
            return batch
        for status in sorted({h[0] for h in hits if h}):
            mask = [h is not None and h[0] == status for h in hits]
            reasons = [h[1] if h and h[0] == status else None for h in hits]
            rules = [h[2] if h and h[0] == status else None for h in hits]
            batch = set_status(batch, mask, status, reasons, rule=rules)
        return batch


def add_summary(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Add summary ``part`` into ``total``: numbers add, dicts add per key, other values replace."""
    for k, v in part.items():
        if isinstance(v, dict):
            add_summary(total.setdefault(k, {}), v)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            total[k] = total.get(k, 0) + v
        else:
            total[k] = v
    return total


def partition_block(stage: ShuffleStage, block: pa.Table, shard: int) -> pa.Table:
    """``partition_rows`` of the ``ok`` rows of one block, with its shard added."""
    ok = block.filter(pc.equal(block.column("status"), OK).fill_null(False))
    rows = stage.partition_rows(ok)
    return rows.append_column(SHARD_COL, pa.array([shard] * rows.num_rows, pa.int64()))


def run_local(stage: ShuffleStage, blocks: list[pa.Table], n_partitions: int = 4) -> list[pa.Table]:
    """Run a shuffle stage over ``blocks`` (block i is shard i) in one process; the processed blocks.
    The decisions do not depend on ``n_partitions`` (tests vary it). ``stage.summary`` is then what
    the manifest would show (``group_summary`` and ``decision_summary`` summed)."""
    if stage.has_fit:
        from stages.reduce import fit_local

        cols = [c for c in dict.fromkeys([*stage.fit_columns, "key", "status"])]
        fit_local(stage, [b.select([c for c in cols if c in b.column_names]) for b in blocks])
    parts = [partition_block(stage, b, s) for s, b in enumerate(blocks)]
    allp = pa.concat_tables([p for p in parts if p.num_rows]) if any(p.num_rows for p in parts) else None
    found = []
    stage.summary = {}
    if allp is not None:
        bucket = pc.bit_wise_and(allp.column(PART).cast(pa.uint64()), pa.scalar(2**63 - 1, pa.uint64()))
        bucket = pc.cast(bucket, pa.int64()).to_numpy() % n_partitions
        for b in range(n_partitions):
            group = allp.filter(pa.array(bucket == b))
            if group.num_rows:
                found.append(stage.decide(group))
                add_summary(stage.summary, stage.group_summary(group, found[-1]))
    merged = merge_decisions(found)
    out = []
    for s, b in enumerate(blocks):
        mine = merged.filter(pc.equal(merged.column(SHARD_COL), s))
        add_summary(stage.summary, stage.decision_summary(mine))
        stage.load_decisions(mine)
        out.append(stage(b))
    return out
