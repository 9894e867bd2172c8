"""The ``openai`` engine under Ray (``ray.data.llm``'s ``HttpRequestProcessorConfig``) in a whole run
through the executor (issue #21; README "LLM caption rewriting"): read -> basic_filter -> rewrite ->
write, against ``tests/openai_server.py`` (a real HTTP server on 127.0.0.1 serving the toy LM in place
of ``vllm serve``, which cannot run here). Nothing else is faked.

What the README promises for that path, each checked on the run's output:

* every row comes back once, in its shard's Parquet (the rewrites are gathered back per shard); rows
  that are not ``ok`` travel untouched (no request is sent for them);
* each ``ok`` caption makes ``n_rewrites + spares`` requests (``spares``: extra generations that
  replace rejected ones), whatever the processor batches (``processor_batch_size`` 5 here, so batches
  cut across captions and shards; the batch size itself is not observed);
* a 429 is retried by Ray (with ``http_retries`` and ``http_backoff_s``) and never becomes a reason; a
  500 (which Ray does not retry) is a rejected generation that a spare replaces, and where every
  generation of a caption is refused, the row stays ``ok`` with its caption and the reason;
* the key (``api_key_env``) and extra headers (``header_envs``) reach the endpoint on every request,
  and never the manifest;
* ``mode: chat`` goes to ``/v1/chat/completions``."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.stages.test_rewrite import keeps_concept

REPO = Path(__file__).resolve().parents[2]
TOY_LM = REPO / "demo" / "assets" / "toy_lm"
REFUSED = "a purple circle the endpoint refuses"  # every request for this caption is answered 500
N_OK, N_REWRITES, SPARES, PER_SHARD = 5, 2, 2, 4


def _caption_of(req: dict) -> str:
    if "messages" in req:
        text = req["messages"][-1]["content"]
    else:
        text = req["prompt"]
    return text.rsplit("\n", 1)[-1].removesuffix(" =>").strip()


@pytest.fixture
def server():
    """The toy LM server: a 429 on every 5th POST; a 500 on every request for REFUSED and on the first
    request that reaches it for each other caption (a spare must replace it)."""
    from tests.openai_server import ToyLMServer

    seen: set[str] = set()

    def fail(req):
        caption = _caption_of(req)
        first = caption not in seen
        seen.add(caption)
        return caption == REFUSED or first

    with ToyLMServer(str(TOY_LM), fail_429_every=5, api_key="k-21", fail_500_when=fail,
                     record_headers=("Authorization", "OpenAI-Organization")) as s:  # fmt: skip
        yield s


@pytest.mark.parametrize("mode", ["completion", "chat"])
def test_openai_engine_through_the_executor(ray_session, server, tmp_path, monkeypatch, mode):
    from demo.world import generate
    from pipeline import config, plan
    from pipeline import ray as executor

    monkeypatch.setenv("REWRITE_TEST_KEY", "k-21")
    monkeypatch.setenv("REWRITE_TEST_ORG", "org-21")
    pairs = list({p.caption: p for p in generate(20, seed=5)}.values())[:N_OK]  # distinct captions
    captions = [p.caption for p in pairs[:3]] + ["cat", REFUSED] + [p.caption for p in pairs[3:]] + ["dog"]
    urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(len(captions))]
    pq.write_table(pa.table({"url": urls, "caption": captions}), tmp_path / "pool.parquet")
    engine = {"type": "openai", "model": "toy-lm", "base_url": server.base_url, "api_key_env": "REWRITE_TEST_KEY",
              "header_envs": {"OpenAI-Organization": "REWRITE_TEST_ORG"}, "http_retries": 4,
              "http_backoff_s": 0.01, "spares": SPARES, "processor_batch_size": 5}  # fmt: skip
    basic = {"lang_id": None, "english": False, "min_image_side": None, "max_aspect_ratio": None}
    pipe = config.from_dict(
        {
            "name": "rewrite_http",
            "samples_per_shard": PER_SHARD,
            "ray": {"show_progress": False},
            "stages": [
                {"read": {"path": str(tmp_path / "pool.parquet")}},
                {"basic_filter": basic},  # "cat", "dog": one word, filtered before the rewrite
                {"rewrite": {"engine": engine, "mode": mode, "n_rewrites": N_REWRITES}},
                {"write": {}},
            ],
        },
        output=str(tmp_path / "out"),
    )
    plan.check(pipe)
    manifest = executor.run(pipe)

    shards = sorted((tmp_path / "out").glob("*.parquet"))
    assert len(shards) == 2
    rows: dict[str, dict] = {}
    for i, p in enumerate(shards):  # each shard's rows are back in its own Parquet, in input order
        t = pq.read_table(p)
        assert t.column("url").to_pylist() == urls[i * PER_SHARD : (i + 1) * PER_SHARD]
        rows.update({r["caption"]: r for r in t.to_pylist()})
    assert sorted(rows) == sorted(captions)
    for short in ("cat", "dog"):
        r = rows[short]
        assert (r["status"], r["caption_rewrites"], r["rewrite_reason"]) == ("filtered_basic", None, None)
    refused = rows[REFUSED]
    assert (refused["status"], refused["caption_rewrites"]) == ("ok", [])
    want = f"no valid rewrite: http_error http 500: injected internal error x{N_REWRITES + SPARES}"
    assert refused["rewrite_reason"] == want
    complete = 0
    for p in pairs:  # the first answer for each caption was a 500: the spares make up for it
        r = rows[p.caption]
        rws, reason = r["caption_rewrites"], r["rewrite_reason"]
        assert r["status"] == "ok" and rws and (len(rws) == N_REWRITES) == (reason is None), (rws, reason)
        assert all(keeps_concept(x, p.colour, p.shape) for x in rws), rws
        # the toy LM may repeat itself (a `duplicate` rejection) where the 500 took a spare; never a 429
        assert reason is None or "429" not in reason, reason
        complete += reason is None
    assert complete >= N_OK - 1, [rows[p.caption]["rewrite_reason"] for p in pairs]

    statuses = server.statuses()
    path = "/v1/chat/completions" if mode == "chat" else "/v1/completions"
    assert {p for p, _ in server.log} == {path}
    # one request per generation of each ok caption, no request for the carrier or filtered rows;
    # the 429s come on top (Ray retried each of them)
    assert statuses.get(200, 0) + statuses.get(500, 0) == (N_OK + 1) * (N_REWRITES + SPARES)
    assert statuses.get(500, 0) == N_OK + (N_REWRITES + SPARES) and statuses.get(429, 0) > 0
    assert statuses.get(401, 0) == 0
    assert server.headers_log and all(
        h == {"Authorization": "Bearer k-21", "OpenAI-Organization": "org-21"} for h in server.headers_log
    )
    text = json.dumps(manifest) + (tmp_path / "out" / "manifest.json").read_text()
    assert "k-21" not in text and "org-21" not in text
    assert manifest["status_counts"] == {"ok": N_OK + 1, "filtered_basic": 2}
