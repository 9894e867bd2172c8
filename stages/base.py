"""The stage contract.

A stage is a plain class: Arrow table in, Arrow table out, no Ray.

    stage = ClipScore(ClipScoreConfig(...))
    stage.setup()                # once per worker: load models, open sessions
    out = stage(table)           # any number of times

Rules every stage follows (enforced here, so stage code stays small):

* ``__call__`` hands only the ``ok`` rows to ``process``; other rows pass through untouched
  (their ``produces`` columns are null) and the output keeps the input's row order.
* ``process`` may change ``status``/``reason`` of rows it rejects, and should give each a stable
  ``rule`` tag (``set_status(..., rule=...)``; the status itself when it gives none); the base class
  keeps a small ``thumbnail`` of a bounded sample of them (``stages.thumbnails``) and nulls the heavy
  columns (``image``, embeddings) of rows that stopped being ``ok``.
* ``process`` receives at most ``batch_size`` rows at a time (the stage's micro-batch); the
  executor may hand a whole shard to ``__call__``.
* If ``process`` raises on a micro-batch, the batch is retried row by row and each row that
  still raises becomes ``stage_error`` with the exception as its reason. Bad rows never kill
  a run.

Global stages (``is_global = True``) need the whole pool before they can decide about a row. They
are of two kinds:

* *Reduce* stages (``balance``, ``clip_filter``) keep a small mergeable state:

  * ``fit_columns``: the columns ``fit_partial`` reads (the executor reads only those).
  * ``fit_partial(table) -> state``: small picklable state for one batch (counts, a histogram...).
  * ``merge(states) -> state``: combine partial states; must be associative and order-free.
  * ``load_state(state)``: install the merged state before ``__call__``.
  * optional ``combine(partials) -> partial`` (the executor folds partials as they arrive, so the
    driver holds one, not one per shard) and ``fit_rounds`` (> 1: each later round of
    ``fit_partial``/``merge`` runs on a stage that loaded the previous round's state; ``clip_filter``
    refines its cut that way). ``stages.reduce.fit_local`` fits one in one process.

  The executor computes the state with Ray before the apply pass and persists it as JSON in the
  run directory, so a resumed run reuses it.
* *Shuffle* stages (``dedup``; ``stages.shuffle.ShuffleStage``) compare rows with each other: rows
  are hash-partitioned by the key they are compared on, each partition decides, and each shard gets
  its own decision list (``partition_rows``, ``decide``, ``load_decisions``); no process holds state
  that grows with the pool. ``stages.shuffle.run_local`` runs one in one process.

What a stage declares (the executor and the planner read only these; ``pipeline/`` never names a
stage):

* ``requires`` / ``required_columns()``: columns it reads (the latter adds config-dependent ones,
  such as a ``bbox_col``); ``produces`` / ``output_columns()``: columns it adds; ``fills`` /
  ``filled_columns()``: base columns (``schemas.row.FILLED_LATER``, e.g. ``image``) it fills with data.
* ``resources()``: how it runs (a task or an actor pool, CPUs, GPUs, concurrency, batch size).
* ``dataset_hook()``: where a row map is not enough, a Ray-free description of a dataset-level
  operation (``ProcessorHook``: rows through a ``ray.data.llm`` processor) that ``pipeline/ray``
  applies instead of the row map.
* ``setup()`` / ``teardown()``: once per worker, before the first call and when the worker ends.

Errors: a row that makes ``process`` raise becomes ``stage_error`` (its reason names the stage and
the exception). An error that is not a row's fails the run with ``StageFailed``: ``setup()`` raising
(a model that does not load), or every row of a micro-batch of two or more raising on its own (a
wrong template, CUDA out of memory, a bug). ``max_error_fraction`` (every stage's config) bounds the
share of rows that may end in ``stage_error`` before the run fails.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from schemas import OK, STAGE_FIELDS, Status, conform, field_type, null_heavy
from stages.tables import _add_missing, _align_columns, replace_column, set_status
from stages.thumbnails import Budget

log = logging.getLogger(__name__)


DEFAULT_MAX_ERROR_FRACTION = 0.1

# A config key that names a local file or folder carries ``json_schema_extra={"path": ...}``
# (``path_field``). Config loading (``pipeline.paths``) resolves its relative values against the
# workflow file's folder, then the working directory; stages read the value as given.
PATH_MARK = "path"
PATH_ANY = "any"  # a plain value is a path when it exists (``local-dir:`` resolved, ``hf-hub:``/URLs kept)
PATH_PREFIXED = "local-dir"  # only ``local-dir:PATH`` values are paths (plain values are model names)
# ``json_schema_extra`` key of a path key whose plain value is always a path (never a model name or a
# tag): ``clipcurate validate`` and a local run check that it exists (``pipeline.paths.missing_paths``).
PATH_ALWAYS = "path_always"


def path_field(
    default: Any = ..., *, description: str, prefixed: bool = False, always: bool = False, **kwargs: Any
) -> Any:
    """``Field(...)`` of a config key that names a local path (see ``PATH_MARK``). ``always``: its
    plain value is always a path (a file, folder or glob), never a name (see ``PATH_ALWAYS``)."""
    extra: dict[str, Any] = {PATH_MARK: PATH_PREFIXED if prefixed else PATH_ANY}
    if always:
        extra[PATH_ALWAYS] = True
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


class RoleConfig(BaseModel):
    """Base of every config of a pipeline role (source, stage, sink). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), ser_json_inf_nan="constants")


class StageConfig(RoleConfig):
    """Base of every stage's config."""

    max_error_fraction: float = Field(
        DEFAULT_MAX_ERROR_FRACTION,
        ge=0.0,
        le=1.0,
        description="The run fails (exit 1, output kept for resume) when more than this share of the rows "
        "that reached this stage end in `stage_error` (an exception on that row). 1.0 never fails.",
    )


class ComputeConfig(StageConfig):
    """Keys shared by stages that run as actor pools (model-bearing stages)."""

    batch_size: int = Field(64, ge=1, description="Rows per `process` call (the stage's micro-batch).")
    concurrency: int = Field(1, ge=1, description="Actors in the pool; each loads the model once.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per actor (fractions allowed).")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs per actor; fractions share a GPU between actors (e.g. 0.5)."
    )


def make_config(cls: type[RoleConfig], config: RoleConfig | dict | None) -> RoleConfig:
    """``config`` as an instance of ``cls`` (None: the defaults; a dict: validated)."""
    if config is None:
        return cls()
    return cls(**config) if isinstance(config, dict) else config


class StageFailed(RuntimeError):
    """An error that is not a row's: the run fails, with this one-line message naming the stage."""

    def __init__(self, stage: str, message: str):
        self.stage, self.message = stage, message
        super().__init__(f"stage {stage}: {message}")

    def __reduce__(self):  # crosses process boundaries (Ray) intact
        return (type(self), (self.stage, self.message))


@dataclass(frozen=True)
class ProcessorHook:
    """Run a stage's rows through a ``ray.data.llm`` processor instead of a row map (Ray-free).

    ``pipeline/ray`` builds ``ray.data.llm.<config_class>(**config_kwargs, **secret_kwargs)`` and
    ``build_processor(config, preprocess=..., postprocess=...)``, then runs: ``explode`` (table -> table,
    ``map_batches``) -> the processor -> ``collect`` per group of rows sharing the shard column
    (``map_groups``; it returns the group's rows in key order). Rows in == rows out.
    """

    config_class: str
    config_kwargs: dict[str, Any]
    preprocess: Callable[[dict], dict]
    postprocess: Callable[[dict], dict]
    explode: Callable[[pa.Table], pa.Table]
    collect: Callable[[pa.Table], pa.Table]
    secret_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)  # never logged or persisted


@dataclass(frozen=True)
class Resources:
    """How the executor should schedule a stage.

    ``actor`` is true for stages that hold state from ``setup`` (models, sessions): they run as
    an actor pool of ``concurrency`` actors. Stateless stages run as tasks.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    concurrency: int | None = None
    batch_size: int | None = None
    actor: bool = False


def _max_rows(n: int) -> int:
    return max(1, n)


class Declared:
    """What every entry of a pipeline declares, stages, sources and sinks alike: the planner and the
    executor read only these."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[RoleConfig]] = RoleConfig
    requires: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()
    fills: ClassVar[tuple[str, ...]] = ()  # base columns (schemas.row.FILLED_LATER) this entry fills
    is_global: ClassVar[bool] = False

    def __init__(self, config: RoleConfig | dict | None = None):
        self.config = make_config(self.Config, config)
        self._setup_done = False

    def required_columns(self) -> tuple[str, ...]:
        """Columns this configured stage reads: ``requires`` plus config-dependent ones."""
        return tuple(self.requires)

    def filled_columns(self) -> tuple[str, ...]:
        """Base columns this configured stage fills with data (``fills``)."""
        return tuple(self.fills)

    def dataset_hook(self) -> ProcessorHook | None:
        """A dataset-level operation that replaces the row map (None: the row map)."""
        return None

    def extra_produces(self) -> dict[str, pa.DataType]:
        """Columns this configured stage adds beyond ``produces`` (for example user columns
        kept by ``save_additional_columns``). Name -> Arrow type."""
        return {}

    def output_columns(self) -> dict[str, pa.DataType]:
        cols = {c: STAGE_FIELDS.get(c) or field_type(c) for c in self.produces}
        cols.update(self.extra_produces())
        return cols

    def model_info(self) -> dict[str, Any]:
        """Names and tags of models (and prompts) this stage uses, for the manifest."""
        return {}

    def packages(self) -> list[tuple[str, str, str]]:
        """Python packages this configured entry needs beyond the project's dependencies: (import name,
        the config key that asks for it, how to install it). ``clipcurate run`` checks them first."""
        return []

    def teardown(self) -> None:
        """Release what ``setup`` opened (sessions, pools). Called once when the worker ends."""


class Stage(Declared):
    Config: ClassVar[type[StageConfig]] = StageConfig
    fit_columns: ClassVar[tuple[str, ...]] = ()
    fit_rounds: ClassVar[int] = 1  # reduce stages: rounds of fit_partial/merge (see the module doc)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Make every subclass's setup() idempotent: calling it by hand and then calling the stage
        # (which also ensures setup) loads the model once.
        if "setup" in cls.__dict__:
            inner = cls.__dict__["setup"]

            def setup(self, _inner=inner):
                if getattr(self, "_setup_done", False):
                    return
                _inner(self)
                self._setup_done = True

            setup.__doc__ = inner.__doc__
            cls.setup = setup

    def resources(self) -> Resources:
        return Resources()

    @property
    def batch_size(self) -> int | None:
        return getattr(self.config, "batch_size", None)

    # ---- lifecycle -------------------------------------------------------------------------
    def setup(self) -> None:
        """Load heavy state once per worker. Default: nothing to load."""

    def _ensure_setup(self) -> None:
        if not self._setup_done:
            try:
                self.setup()
            except StageFailed:
                raise
            except Exception as e:  # noqa: BLE001 - a setup failure is the run's, not a row's
                raise StageFailed(self.name, f"setup failed: {one_line(e)}") from e
            self._setup_done = True  # for stages without their own setup()

    def __enter__(self):
        self._ensure_setup()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def process(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- global stages -----------------------------------------------------------------
    def fit_partial(self, batch: pa.Table) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def merge(self, states: list[Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_state(self, state: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_summary(self, state: Any) -> dict[str, Any]:
        """A small summary of the fitted state for the manifest and the report."""
        return {}

    # ---- the call -------------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        self._ensure_setup()
        self._thumbs = Budget()  # thumbnails of rejected rows, per (status, rule) of this call
        batch = conform(batch)
        out_cols = self.output_columns()
        if batch.num_rows == 0:
            return _add_missing(batch, out_cols)
        ok_mask = pc.equal(batch.column("status").combine_chunks(), OK).fill_null(False)
        n_ok = pc.sum(ok_mask.cast(pa.int64())).as_py() or 0
        if n_ok == batch.num_rows:
            return self._run_chunks(batch, out_cols)
        if n_ok == 0:
            return _add_missing(batch, out_cols)
        # Split ok / not-ok, process ok rows, and put rows back in input order.
        import numpy as np

        idx = pa.array(np.arange(batch.num_rows, dtype=np.int64))
        ok_idx = pc.filter(idx, ok_mask)
        rest_idx = pc.filter(idx, pc.invert(ok_mask))
        done = self._run_chunks(batch.take(ok_idx), out_cols)
        rest = _add_missing(batch.take(rest_idx), out_cols)
        rest = _align_columns(rest, done)
        merged = pa.concat_tables([done, rest], promote_options="permissive")
        order = pc.sort_indices(pa.concat_arrays([ok_idx, rest_idx]))
        return merged.take(order)

    def _run_chunks(self, batch: pa.Table, out_cols: dict[str, pa.DataType]) -> pa.Table:
        size = self.batch_size or batch.num_rows
        pieces = []
        for start in range(0, batch.num_rows, _max_rows(size)):
            chunk = batch.slice(start, size)
            pieces.append(self._safe_process(chunk, out_cols))
        if len(pieces) == 1:
            return pieces[0]
        pieces = [_align_columns(p, pieces[0]) for p in pieces]
        return pa.concat_tables(pieces, promote_options="permissive").combine_chunks()

    def _safe_process(self, chunk: pa.Table, out_cols: dict[str, pa.DataType]) -> pa.Table:
        try:
            out = self._finish(chunk, self.process(chunk), out_cols)
        except StageFailed:
            raise
        except Exception:
            if chunk.num_rows == 1:
                return self._error_row(chunk, out_cols)
            log.warning("stage %s raised on a batch of %d rows; retrying row by row", self.name, chunk.num_rows)
            rows, failed, last = [], 0, None
            for i in range(chunk.num_rows):
                one = chunk.slice(i, 1)
                try:
                    rows.append(self._finish(one, self.process(one), out_cols))
                except StageFailed:
                    raise
                except Exception as e:
                    failed, last = failed + 1, e
                    rows.append(self._error_row(one, out_cols))
            if failed == chunk.num_rows:
                # Every row raises on its own: the stage is broken, not the rows.
                raise StageFailed(
                    self.name, f"every row of a batch of {failed} raised: {one_line(last)}"
                ) from last
            rows = [_align_columns(r, rows[0]) for r in rows]
            return pa.concat_tables(rows, promote_options="permissive")
        return out

    def _finish(self, inp: pa.Table, out: pa.Table, out_cols: dict[str, pa.DataType]) -> pa.Table:
        if out.num_rows != inp.num_rows:
            raise RuntimeError(
                f"stage {self.name!r} returned {out.num_rows} rows for {inp.num_rows}: stages must not drop rows"
            )
        out = _add_missing(conform(out, out_cols), out_cols)
        rejected = pc.not_equal(out.column("status"), OK).fill_null(True)
        was_ok = pc.equal(inp.column("status"), OK).fill_null(False)
        newly = pc.and_(rejected, was_ok)
        by = pc.if_else(newly, pa.array([self.name] * out.num_rows, pa.string()), out.column("rejected_by"))
        out = out.set_column(out.column_names.index("rejected_by"), "rejected_by", by)
        # every rejected row has a rule: the stage's tag, else its status
        untagged = pc.and_(newly, pc.is_null(out.column("rule")))
        rule = pc.if_else(untagged, out.column("status"), out.column("rule"))
        out = out.set_column(out.column_names.index("rule"), "rule", rule)
        out = self._budget().fill(out, newly)
        return null_heavy(out, rejected)

    def _budget(self) -> Budget:
        if getattr(self, "_thumbs", None) is None:  # process() called without __call__
            self._thumbs = Budget()
        return self._thumbs

    def _error_row(self, row: pa.Table, out_cols: dict[str, pa.DataType]) -> pa.Table:
        exc = traceback.format_exc(limit=1).strip().splitlines()[-1]
        log.warning("stage %s failed on key %s: %s", self.name, row.column("key")[0].as_py(), exc)
        why = f"{self.name}: {exc}"[:300]
        row = set_status(row, pa.array([True]), Status.STAGE_ERROR, why, rule="stage_error")
        row = replace_column(row, "rejected_by", [self.name])
        row = self._budget().fill(row, pa.array([True]))
        return null_heavy(_add_missing(row, out_cols), pa.array([True]))


# ---- helpers shared by stages --------------------------------------------------------------


def one_line(e: BaseException | None) -> str:
    """An exception as one short line: ``Type: message``."""
    if e is None:
        return "unknown error"
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:300]
