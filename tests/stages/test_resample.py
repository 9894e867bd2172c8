"""The per-epoch re-sampler (issue #16, 4): a real tar written with webdataset's ``TarWriter`` and
read back with a webdataset pipeline; each row kept with probability ``metaclip_p`` over many
epochs, a different subset each epoch, the same subset for the same (epoch, seed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stages.resample import clipcurate_resample, keep

wds = pytest.importorskip("webdataset")

N, EPOCHS = 200, 200


@pytest.fixture(scope="module")
def tar(tmp_path_factory):
    path = tmp_path_factory.mktemp("resample") / "00000.tar"
    ps = np.round(np.linspace(0.02, 1.0, N), 4)
    with wds.TarWriter(str(path)) as sink:
        for i, p in enumerate(ps):
            meta = (
                {"key": f"{i:09d}", "metaclip_p": float(p)} if i % 50 else {"key": f"{i:09d}"}
            )  # some without p
            sink.write({"__key__": f"{i:09d}", "txt": f"caption {i}", "json": json.dumps(meta).encode()})
    return path, {f"{i:09d}": (float(p) if i % 50 else 1.0) for i, p in enumerate(ps)}


def _epoch_keys(path, epoch, seed=0, decode=False) -> list[str]:
    stages = [wds.SimpleShardList([str(path)]), wds.tarfile_to_samples()]
    if decode:
        stages.append(wds.decode())
    stages.append(clipcurate_resample(epoch, seed=seed))
    return [s["__key__"] for s in wds.DataPipeline(*stages)]


def test_resample_keeps_each_row_with_its_p(tar):
    path, p = tar
    counts = dict.fromkeys(p, 0)
    epochs = [_epoch_keys(path, e) for e in range(EPOCHS)]
    for keys in epochs:
        for k in keys:
            counts[k] += 1
    bad = []
    for k, pk in p.items():
        sigma = np.sqrt(EPOCHS * pk * (1 - pk))
        if abs(counts[k] - EPOCHS * pk) > 4 * sigma + 1e-9:
            bad.append((k, pk, counts[k]))
    assert bad == []
    assert counts[f"{0:09d}"] == EPOCHS  # no metaclip_p: always kept
    # epochs differ; the same (epoch, seed) gives the same subset, decoded or not; another seed differs
    assert len({tuple(keys) for keys in epochs[:10]}) == 10
    assert _epoch_keys(path, 7) == epochs[7] == _epoch_keys(path, 7, decode=True)
    assert _epoch_keys(path, 7, seed=1) != epochs[7]


def test_resample_follows_a_shared_epoch(tar):
    """open_clip passes a ``SharedEpoch`` (``get_value()``); the stage reads it at each iteration."""
    path, _ = tar

    class SharedEpoch:
        value = 0

        def get_value(self):
            return self.value

    shared = SharedEpoch()
    pipe = wds.DataPipeline(
        wds.SimpleShardList([str(path)]), wds.tarfile_to_samples(), clipcurate_resample(shared)
    )
    first = [s["__key__"] for s in pipe]
    shared.value = 3
    assert [s["__key__"] for s in pipe] == _epoch_keys(path, 3) != first


def test_keep_is_a_pure_function():
    assert keep("k", None, 0) and keep("k", 1.0, 5) and not keep("k", 0.0, 5)
    assert [keep("k", 0.5, e, 9) for e in range(20)] == [keep("k", 0.5, e, 9) for e in range(20)]
