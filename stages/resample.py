"""Per-epoch MetaCLIP re-sampling in a trainer's ``webdataset`` loader (MetaCLIP 2's online curation).

Run ``balance_worldwide`` with ``sample: false``: the tars then hold every matched row, each with its
keep probability ``metaclip_p`` in the sample's ``.json``. In the loader, this stage keeps each
sample with probability ``metaclip_p``, drawing ``u = blake2b(f"{seed}:{epoch}:{key}")`` in [0, 1):
a fresh balanced subset each epoch, the same one for the same (epoch, seed) on every worker and
rank, with no state to share. A sample without ``metaclip_p`` is kept (p = 1).

Plain Python (no Ray, no torch): ``from stages.resample import clipcurate_resample``.

    import webdataset as wds
    from stages.resample import clipcurate_resample

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        clipcurate_resample(epoch, seed=0),  # before decoding: reads only the .json member
        wds.decode("pilrgb"),
        wds.to_tuple("jpg", "txt"),
    )

``epoch`` is an int or an object with ``get_value()`` (open_clip's ``SharedEpoch``), read each time
the pipeline is iterated, so one pipeline follows ``set_epoch``. open_clip's
``training/data.py:get_wds_dataset`` builds ``pipeline = [wds.SimpleShardList(...)]`` and then
``pipeline.extend([tarfile_to_samples_nothrow, wds.shuffle(...)])``; insert
``clipcurate_resample(shared_epoch, seed=args.seed)`` right after ``tarfile_to_samples_nothrow``. Its
``num_samples`` (steps per epoch) should be the expected kept count, ``sum(metaclip_p)`` over the
output (read it from the Parquet files).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

P_FIELD = "metaclip_p"


def draw(key: str, epoch: int, seed: int = 0) -> float:
    """The uniform draw in [0, 1) of ``key`` for ``(epoch, seed)`` (53-bit, from blake2b)."""
    h = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(h, "little") >> 11) * (1.0 / (1 << 53))


def keep(key: str, p: float | None, epoch: int, seed: int = 0) -> bool:
    """Whether a sample with keep probability ``p`` (None: 1) is in epoch ``epoch``'s subset."""
    if p is None or p >= 1.0:
        return True
    return draw(key, epoch, seed) < p


def sample_p(sample: dict[str, Any], p_field: str = P_FIELD) -> float | None:
    """``metaclip_p`` of a webdataset sample: from its ``json`` member, raw bytes or decoded."""
    meta = sample.get("json")
    if isinstance(meta, bytes | bytearray | memoryview):
        meta = json.loads(bytes(meta))
    elif isinstance(meta, str):
        meta = json.loads(meta)
    if not isinstance(meta, dict):
        return None
    p = meta.get(p_field)
    return None if p is None else float(p)


def _epoch_value(epoch: Any) -> int:
    return int(epoch.get_value() if hasattr(epoch, "get_value") else epoch)


def clipcurate_resample(
    epoch: Any, seed: int = 0, p_field: str = P_FIELD
) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """A webdataset pipeline stage (iterator of samples -> the kept ones) for ``epoch``; the sample
    key is its ``__key__`` (the row's key, the tar member's stem)."""

    def stage(samples: Iterable[dict]) -> Iterator[dict]:
        e = _epoch_value(epoch)
        for sample in samples:
            if keep(str(sample["__key__"]), sample_p(sample, p_field), e, seed):
                yield sample

    return stage
