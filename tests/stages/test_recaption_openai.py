"""Acceptance 3: the recaption stage's ``openai`` engine end to end against the OpenAI-compatible test
server (tests/openai_server.py, a real HTTP server on 127.0.0.1 that stands in for ``vllm serve``)
serving the toy VLM, with the images sent as ``image_url`` data URIs, including injected 429 and 500
answers: retried, then a reason, and no row lost."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from tests.openai_server import ToyLMServer

VLM = str(REPO / "demo" / "assets" / "toy_vlm")
LM = str(REPO / "demo" / "assets" / "toy_lm")


@pytest.fixture(scope="module")
def table():
    from demo.train_clip import pipeline_resizer
    from demo.world import generate
    from stages.recaption.eval import recaption_table

    pairs = [p for p in generate(60, 0, 0.3, 0)][:24]
    return pairs, recaption_table(pairs, pipeline_resizer())


def _run(server, table, **engine):
    from stages.recaption import Recaption

    cfg = {"type": "openai", "model": "toy-vlm", "base_url": server.base_url, "http_backoff_s": 0.0,
           "request_concurrency": 4, **engine}  # fmt: skip
    stage = Recaption({"engine": cfg})
    stage.setup()
    try:
        return stage.process(table)
    finally:
        stage.teardown()


def test_openai_engine_with_images_and_injected_errors(table):
    from stages.recaption.eval import names

    pairs, t = table
    with ToyLMServer(LM, vlm_dir=VLM, fail_500_every=5, fail_429_every=7) as server:
        out = _run(server, t, http_retries=4)
        statuses = server.statuses()
    assert statuses.get(500, 0) > 0 and statuses.get(429, 0) > 0 and statuses[200] == t.num_rows
    recaps = out.column("caption_recap").to_pylist()
    assert out.num_rows == t.num_rows and out.column("recap_reason").null_count == t.num_rows
    ok = [names(r, p.true_colour, p.true_shape) for r, p in zip(recaps, pairs)]
    assert sum(ok) >= 0.9 * len(ok), list(zip(recaps, [p.caption for p in pairs]))
    # The same captions as the in-stage transformers engine: the server runs the same model, greedy.
    from stages.recaption import Recaption

    local = Recaption({"engine": {"type": "transformers", "model": VLM}})
    local.setup()
    assert local.process(t).column("caption_recap").to_pylist() == recaps


def test_without_retries_failed_requests_get_a_reason_and_no_row_is_lost(table):
    _, t = table
    with ToyLMServer(LM, vlm_dir=VLM, fail_500_every=3, fail_429_every=4) as server:
        out = _run(server, t, http_retries=0)
    why = out.column("recap_reason").to_pylist()
    recaps = out.column("caption_recap").to_pylist()
    assert out.num_rows == t.num_rows and out.column("key").equals(t.column("key"))
    failed = [w for w in why if w]
    assert failed and all(w in ("http_error 500", "http_error 429") for w in failed)
    assert all((r is None) == bool(w) for r, w in zip(recaps, why))
    assert out.column("caption").equals(t.column("caption")), "failed rows keep their alt-text"
    assert set(out.column("status").to_pylist()) == {"ok"}
