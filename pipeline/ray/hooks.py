"""Dataset-level operations that stages describe without Ray (``stages.base.ProcessorHook``)."""

from __future__ import annotations

from schemas.row import SHARD_COL
from stages.base import ProcessorHook


def apply_processor(ds, hook: ProcessorHook, group_by: str = SHARD_COL):
    """Run ``ds`` through the ``ray.data.llm`` processor that ``hook`` describes.

    ``ray.data.llm`` engines return one generation per row, so each row is exploded by the stage into
    carrier and request rows, run through the processor, and gathered back per ``group_by`` group;
    grouped by the shard column, each shard comes back whole inside one block (the sink needs that)."""
    import ray.data.llm as llm

    config_cls = getattr(llm, hook.config_class, None)
    if config_cls is None:
        raise ValueError(f"ray.data.llm has no processor config {hook.config_class!r}")
    config = config_cls(**hook.config_kwargs, **hook.secret_kwargs)
    processor = llm.build_processor(config, preprocess=hook.preprocess, postprocess=hook.postprocess)
    ds = ds.map_batches(hook.explode, batch_format="pyarrow")
    ds = processor(ds)
    return ds.groupby(group_by).map_groups(hook.collect, batch_format="pyarrow")


def apply(ds, hook, group_by: str = SHARD_COL):
    if isinstance(hook, ProcessorHook):
        return apply_processor(ds, hook, group_by)
    raise TypeError(f"unknown dataset hook {type(hook).__name__}")
