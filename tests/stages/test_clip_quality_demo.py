"""Issue #14, acceptance 3: on the demo world (with its seeded share of degraded images), the toy CLIP's
threshold and the toy quality head's threshold together remove the mismatched pairs and the degraded images
at >= 95% recall, losing <= 5% of the good pairs.

Real parts: the demo world served on 127.0.0.1, the download stage with the demo workflow's settings
(64 px, border, JPEG q90; no Ray), the clip_score stage with the committed toy CLIP and quality head, then
the clip_filter stage with one combined rule set (``clip_score >= min_score`` and ``quality <= threshold``),
fitted and applied as the executor does (fit_partial, merge, load_state, process), without Ray.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.clip_filter import ClipFilter
from stages.clip_score import ClipScore
from tests.conftest import REPO, run_download

CLIP = REPO / "demo" / "assets" / "toy_clip"
HEAD = REPO / "demo" / "assets" / "quality_head"
MIN_SCORE = json.loads((CLIP / "demo_threshold.json").read_text())["min_score"]
MAX_QUALITY = json.loads((HEAD / "quality.json").read_text())["threshold"]


def test_clip_and_quality_thresholds_remove_mismatched_and_degraded(demo_urls):
    truth = pq.read_table(demo_urls)
    cols = {c: truth.column(c) for c in ("caption", "is_mismatched", "is_degraded")}
    rows = run_download(
        truth.column("url").to_pylist(), extra_cols=cols, image_size=64, resize_mode="border",
        encode_format="jpg", encode_quality=90, timeout=5, allowed_networks=["127.0.0.0/8"],
    )  # fmt: skip
    stage = ClipScore(
        {
            "model": f"local-dir:{CLIP}",
            "device": "cpu",
            "heads": [{"column": "quality", "path": str(HEAD / "quality.safetensors"), "sigmoid": True}],
        }
    )
    out = stage(rows).filter(pc.equal(pc.field("status"), "ok"))  # the downloaded, decodable rows
    assert out.num_rows >= 380
    assert out.column("quality").null_count == 0 and out.column("clip_score").null_count == 0
    rules = [{"column": "clip_score", "min_score": MIN_SCORE}, {"column": "quality", "max_score": MAX_QUALITY}]
    filt = ClipFilter({"rules": rules})
    filt.load_state(filt.merge([filt.fit_partial(out)]))
    judged = filt(out)
    removed = pc.not_equal(judged.column("status"), "ok")
    assert set(judged.filter(removed).column("rule").to_pylist()) <= {"clip_score:min_score", "quality:max_score"}
    bad = pc.or_(out.column("is_mismatched"), out.column("is_degraded"))
    n_bad = pc.sum(bad.cast(pa.int64())).as_py()
    n_good = out.num_rows - n_bad
    assert pc.sum(out.column("is_degraded").cast(pa.int64())).as_py() >= 25, "the world has degraded images"
    recall = pc.sum(pc.and_(removed, bad).cast(pa.int64())).as_py() / n_bad
    lost = pc.sum(pc.and_(removed, pc.invert(bad)).cast(pa.int64())).as_py() / n_good
    print(
        f"min_score {MIN_SCORE}, quality < {MAX_QUALITY}: bad removed {recall:.3f} of {n_bad}, good lost {lost:.3f} of {n_good}"
    )
    assert recall >= 0.95
    assert lost <= 0.05
