"""The ``rewrite`` stage (LaCLIP caption rewriting), issue 6.

* Acceptance 1: the ``transformers`` engine with the committed toy LM on a generated demo world.
* Acceptance 2: the ``openai`` engine against ``tests/openai_server.py``, a real HTTP server on
  127.0.0.1 that stands in for vLLM's OpenAI-compatible server (vLLM cannot run here), serving the
  same toy LM, with injected 500 and 429 answers that the stage must retry.
* Acceptance 3: the ``vllm`` engine's ``ray.data.llm`` description (processor kwargs, and the
  explode/pre/post/collect row functions) without vLLM; the rows that vLLM would return are built by
  hand from the documented output fields (``generated_text``, ``__inference_error__``).

The same row functions also run through Ray's real processors: ``test_ray_data_llm_end_to_end_with_
the_http_processor`` here, ``tests/stages/test_rewrite_http_ray.py`` (the openai engine in whole runs)
and ``tests/stages/test_rewrite_vllm_ray.py`` (Ray's own vLLM processor, only the vLLM engine replaced).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pyarrow as pa
import pytest

from stages.rewrite import (
    CARRY,
    DEFAULT_BANK,
    INSTRUCTION,
    RAY_ERROR,
    SLOT,
    Rewrite,
    RewriteConfig,
    clean_output,
    completion_prompt,
    draw_examples,
    load_bank,
)
from tests.conftest import require_module

REPO = Path(__file__).resolve().parents[2]
# aiohttp is a dependency (pyproject): under CI=true its absence fails the test, elsewhere it skips
LLM_MISSING = "ray.data.llm cannot be imported (it needs aiohttp, a dependency: pip install -e .)"
TOY_LM = REPO / "demo" / "assets" / "toy_lm"
N_ROWS = 24
TOY = {"type": "transformers", "model": "demo/assets/toy_lm"}  # the engine most tests use


def make_config(engine: dict | None = None, **keys) -> dict:
    """A rewrite config: ``engine`` (default: the toy LM with transformers) plus top-level keys."""
    return {"engine": engine or TOY, **keys}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def keeps_concept(rewrite: str, colour: str, shape: str) -> bool:
    """The rewrite names the caption's colour (one or two words) and its shape."""
    words = _words(rewrite)
    colour_words = colour.split()
    has_colour = any(words[i : i + len(colour_words)] == colour_words for i in range(len(words)))
    return has_colour and shape in words


@pytest.fixture(scope="module")
def world_table() -> tuple[pa.Table, list]:
    """A demo world's captions as stage input: N_ROWS ok rows plus two rows that are not ok."""
    from demo.world import generate

    pairs = list(generate(N_ROWS, seed=3))
    keys = [f"{i:09d}" for i in range(N_ROWS + 2)]
    captions = [p.caption for p in pairs] + ["a red circle", "a blue star"]
    status = ["ok"] * N_ROWS + ["download_failed", "filtered_clip"]
    return pa.table({"key": keys, "caption": captions, "status": status}), pairs


def check_world_rewrites(out: pa.Table, pairs: list, n_rewrites: int) -> None:
    assert out.num_rows == N_ROWS + 2
    assert out.column("status").to_pylist() == ["ok"] * N_ROWS + ["download_failed", "filtered_clip"]
    rewrites = out.column("caption_rewrites").to_pylist()
    reasons = out.column("rewrite_reason").to_pylist()
    assert rewrites[N_ROWS:] == [None, None] and reasons[N_ROWS:] == [None, None]  # not-ok rows untouched
    with_rewrites = [i for i in range(N_ROWS) if rewrites[i]]
    assert len(with_rewrites) >= 0.9 * N_ROWS, reasons
    for i in range(N_ROWS):
        p, rws = pairs[i], rewrites[i]
        assert len(rws) <= n_rewrites
        assert (len(rws) == n_rewrites) == (reasons[i] is None), (rws, reasons[i])
        for r in rws:
            assert r.strip().lower().rstrip(".") != p.caption.lower(), r
            assert "\n" not in r and "=>" not in r
            assert keeps_concept(r, p.colour, p.shape), (p.caption, r)
        assert len({r.lower() for r in rws}) == len(rws)
    assert out.column("caption").to_pylist()[:N_ROWS] == [p.caption for p in pairs]


# ---- bank, prompt, validation ------------------------------------------------------------------


def test_default_bank_is_shipped_and_clean():
    bank = load_bank()
    assert len(bank) >= 40
    assert len({s for s, _ in bank}) == len(bank)
    for s, t in bank:
        assert s != t and "=>" not in s + t and "\n" not in s + t
    assert load_bank(DEFAULT_BANK) == bank


def test_bank_errors(tmp_path):
    bad = tmp_path / "bank.jsonl"
    bad.write_text('{"source": "a dog"}\n')
    with pytest.raises(ValueError, match="bank.jsonl:1"):
        load_bank(bad)
    bad.write_text('{"source": "a dog", "target": "A dog."}\n')
    with pytest.raises(ValueError, match="k=3 but the bank has only 1 pairs"):
        RewriteConfig(**make_config(bank=str(bad)))
    ok = RewriteConfig(**make_config(bank=str(bad), k=1))
    assert Rewrite(ok).bank == [("a dog", "A dog.")]


def test_prompt_is_the_laclip_format():
    bank = [("s1", "t1"), ("s2", "t2"), ("s3", "t3")]
    assert completion_prompt(bank, "a red circle") == (
        "write image captions differently,\n\ns1 => t1\n\ns2 => t2\n\ns3 => t3\n\na red circle =>"
    )
    stage = Rewrite(make_config())
    ex = stage._examples("000000001", 0, 0)
    prompt = stage.build_prompt("a red circle", ex)
    assert prompt.startswith(INSTRUCTION + "\n\n") and prompt.endswith("\n\na red circle =>")
    for i in ex:
        assert f"{stage.bank[i][0]} => {stage.bank[i][1]}" in prompt


def test_example_draw_is_seeded_per_row_and_attempt():
    a = draw_examples(50, 3, 0, "000000001", 0, 0)
    assert a == draw_examples(50, 3, 0, "000000001", 0, 0)
    assert len(set(a)) == 3 and all(0 <= i < 50 for i in a)
    others = {
        tuple(draw_examples(50, 3, 0, f"{k:09d}", s, t)) for k in range(5) for s in range(4) for t in range(2)
    }
    assert len(others) > 30  # different rows, rewrites and attempts see different examples
    assert draw_examples(50, 3, 1, "000000001", 0, 0) != a or draw_examples(50, 3, 2, "000000001", 0, 0) != a


def test_clean_output_cuts_like_laclip():
    assert clean_output(" A red circle on white.\n\nblue star => A blue star.") == "A red circle on white."
    assert clean_output(" A red  circle\t here => more") == "A red circle here"
    assert clean_output('\n  "A quoted answer."  \nnext') == "A quoted answer."
    assert clean_output(None) == ""


@pytest.mark.parametrize(
    "text,reason",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("A red circle on a white background.", "echo"),
        ("write image captions differently, a red circle", "echo"),
        ("x" * 301, "too_long"),
        ("A black cat curled up asleep on a sofa cushion.", "copied_example"),
        ("A red circle set against a white backdrop.", None),
    ],
)
def test_validation_rules(text, reason):
    from stages.rewrite import RowRewrites as _RowRewrites

    stage = Rewrite(make_config())
    cat = next(i for i, (s, _) in enumerate(stage.bank) if s == "black cat sleeping on a sofa")
    row = _RowRewrites("a red circle on a white background", stage.config, stage.bank)
    assert row.offer(0, text, [cat, 0, 1]) == reason
    if reason is None:
        assert row.offer(1, " " + text.upper(), [0, 1, 2]) == "duplicate"


def test_config_rejects_secrets_and_bad_keys():
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        RewriteConfig(**make_config({"type": "openai", "model": "m", "api_key_env": "sk-live-1234"}))
    with pytest.raises(ValueError, match="environment variable"):
        RewriteConfig(**make_config({"type": "openai", "model": "m", "header_envs": {"X-Org": "org 123"}}))
    with pytest.raises(ValueError, match="base_url"):
        RewriteConfig(**make_config({"type": "openai", "model": "m", "base_url": "ftp://x"}))
    with pytest.raises(ValueError, match="user_template"):
        RewriteConfig(**make_config(mode="chat", user_template="{nope}"))
    with pytest.raises(ValueError, match="Extra inputs"):
        RewriteConfig(**make_config(temprature=0.5))


def test_config_error_names_the_stage_and_key():
    from pipeline.config import ConfigError, from_dict

    raw = {"stages": [{"read": {"path": "x.parquet"}}, {"rewrite": {"engine": "gpt"}}, {"write": {}}]}
    with pytest.raises(ConfigError, match=r"stages\[1\] \(rewrite\).*engine"):
        from_dict(raw, source="w.yaml")


@pytest.mark.parametrize(
    "engine,expected",
    [
        ({"type": "vllm", "model": "m", "base_url": "http://x/v1"}, "unknown key 'engine.vllm.base_url'"),
        ({"type": "transformers", "model": "m", "qps": 2}, "unknown key 'engine.transformers.qps'"),
        ({"type": "openai", "model": "m", "engine_kwargs": {}}, "unknown key 'engine.openai.engine_kwargs'"),
        ({"type": "vllm"}, "missing required key 'engine.vllm.model'"),
        ({"type": "transformers"}, "missing required key 'engine.transformers.model'"),
        ({"type": "gpt", "model": "m"}, "key 'engine': expected a mapping with 'type': one of transformers, openai, vllm"),
        ({"model": "m"}, "key 'engine': expected a mapping with 'type'"),
        (None, "missing required key 'engine'"),
    ],
)
def test_engine_union_errors_are_one_line(engine, expected):
    """A key of another engine, a missing model or engine, an unknown type: one line naming file, stage, key."""
    from pipeline.config import ConfigError, from_dict

    body = {"n_rewrites": 2} if engine is None else {"engine": engine}
    raw = {"stages": [{"read": {"path": "x.parquet"}}, {"rewrite": body}, {"write": {}}]}
    with pytest.raises(ConfigError) as e:
        from_dict(raw, source="w.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("w.yaml: stages[1] (rewrite): ") and expected in msg, msg
    if "unknown key" in msg:  # the allowed keys are the engine's own
        assert "allowed keys:" in msg and "model" in msg and "n_rewrites" not in msg


def test_model_has_no_default():
    with pytest.raises(ValueError, match="model"):
        RewriteConfig(engine={"type": "transformers"})
    with pytest.raises(ValueError, match="engine"):
        RewriteConfig()


def test_every_engine_key_is_described():
    from stages.rewrite.config import OpenAIEngineConfig, TransformersEngineConfig, VLLMEngineConfig

    for cls in (RewriteConfig, TransformersEngineConfig, OpenAIEngineConfig, VLLMEngineConfig):
        assert cls.model_config.get("extra") == "forbid"
        for key, f in cls.model_fields.items():
            assert f.description, f"{cls.__name__}.{key} has no description"


def test_dataset_hook_per_engine(monkeypatch):
    """transformers: no hook (the row map); openai: HttpRequestProcessorConfig with the headers only in
    secret_kwargs; vllm: vLLMEngineProcessorConfig. The processor batch is its own key, not batch_size."""
    monkeypatch.setenv("REWRITE_TEST_API_KEY", "sk-secret-42")
    assert Rewrite(make_config()).dataset_hook() is None
    http = Rewrite(make_config({"type": "openai", "model": "m", "api_key_env": "REWRITE_TEST_API_KEY",
                                "processor_batch_size": 32}, batch_size=8)).dataset_hook()  # fmt: skip
    assert http.config_class == "HttpRequestProcessorConfig"
    assert http.secret_kwargs == {"headers": {"Authorization": "Bearer sk-secret-42"}}
    assert "headers" not in http.config_kwargs and "sk-secret-42" not in repr(http)
    assert "sk-secret-42" not in json.dumps({k: v for k, v in http.config_kwargs.items() if k != "session_factory"})
    assert http.config_kwargs["batch_size"] == 32
    assert Rewrite(make_config({"type": "openai", "model": "m"})).dataset_hook().secret_kwargs == {"headers": None}
    vllm = Rewrite(make_config({"type": "vllm", "model": "m", "processor_batch_size": 16}, batch_size=8))
    hook = vllm.dataset_hook()
    assert hook.config_class == "vLLMEngineProcessorConfig" and hook.secret_kwargs == {}
    assert hook.config_kwargs["batch_size"] == 16 and hook.config_kwargs["model_source"] == "m"
    assert vllm.resources().batch_size == 8
    llm = require_module("ray.data.llm", LLM_MISSING)
    assert isinstance(getattr(llm, http.config_class)(**http.config_kwargs, **http.secret_kwargs),
                      llm.HttpRequestProcessorConfig)  # fmt: skip
    assert getattr(llm, hook.config_class)(**hook.config_kwargs).model_source == "m"


def test_generate_batch_size_is_the_forward_batch(world_table, monkeypatch):
    """``batch_size`` rows per process call; ``generate_batch_size`` prompts per generate() call."""
    from stages.rewrite.engines.transformers_engine import TransformersEngine

    sizes = []
    real = TransformersEngine.generate

    def spy(self, reqs, round_seed):
        sizes.append(len(reqs))
        return real(self, reqs, round_seed)

    monkeypatch.setattr(TransformersEngine, "generate", spy)
    table, _ = world_table
    stage = Rewrite(make_config({**TOY, "generate_batch_size": 3, "max_retries": 0}, batch_size=5, n_rewrites=1,
                                max_new_tokens=8))  # fmt: skip
    calls = []
    model_generate = None

    def count_generate(*a, **kw):
        calls.append(kw["input_ids"].shape[0])
        return model_generate(*a, **kw)

    stage.setup()
    model_generate = stage.engine._model.generate
    monkeypatch.setattr(stage.engine._model, "generate", count_generate)
    stage(table.slice(0, 7))
    assert sizes == [5, 2]  # two process calls: 5 rows, then 2 (one rewrite each, no retries)
    assert calls == [3, 2, 2]  # forward batches of at most 3 prompts


def test_teardown_closes_the_openai_client():
    stage = Rewrite(make_config({"type": "openai", "model": "m"}))
    stage.setup()
    pool, session = stage.engine._pool, stage.engine._session
    closed = []
    session.close = lambda: closed.append(True)
    stage.teardown()
    assert closed == [True] and pool._shutdown


def test_model_info_records_model_prompt_and_sampling(monkeypatch):
    monkeypatch.setenv("TEST_REWRITE_KEY", "secret-value-123")
    stage = Rewrite(make_config({"type": "openai", "model": "m", "api_key_env": "TEST_REWRITE_KEY"}, mode="chat"))
    info = stage.model_info()
    assert info["model"] == "m" and info["engine"] == "openai" and info["mode"] == "chat"
    assert info["sampling"] == {
        "temperature": 0.9,
        "top_p": 0.95,
        "max_new_tokens": 77,
        "seed": 0,
        "stop": ["\n"],
    }
    assert info["prompt"]["instruction"] == INSTRUCTION and info["prompt"]["k"] == 3
    assert info["prompt"]["example"].endswith("{caption} =>") and "system_prompt" in info["prompt"]
    json.dumps(info)
    assert "secret-value-123" not in json.dumps(info)


# ---- Acceptance 1: transformers engine with the toy LM --------------------------------------------


def test_toy_lm_is_an_ordinary_hf_model_dir():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (TOY_LM / name).is_file(), name
    assert (TOY_LM / "model.safetensors").stat().st_size < 8 * 2**20
    assert json.loads((TOY_LM / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    tok = AutoTokenizer.from_pretrained(TOY_LM)
    model = AutoModelForCausalLM.from_pretrained(TOY_LM)
    assert model.config.vocab_size == len(tok)
    chat = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U =>"}],
                                   tokenize=False, add_generation_prompt=True)  # fmt: skip
    assert chat == "U =>"


def test_transformers_engine_rewrites_the_demo_world(world_table):
    table, pairs = world_table
    stage = Rewrite(make_config({"type": "transformers", "model": "demo/assets/toy_lm"}, batch_size=16))
    out = stage(table)
    check_world_rewrites(out, pairs, 4)
    # Same seed, same rows: same rewrites.
    again = Rewrite(make_config(batch_size=16))(table.slice(0, 16))
    assert again.column("caption_rewrites").to_pylist() == out.column("caption_rewrites").to_pylist()[:16]


def test_failed_rewrites_keep_the_row(world_table):
    table, _ = world_table
    stage = Rewrite(make_config({**TOY, "max_retries": 1}, max_chars=8, n_rewrites=2))
    out = stage(table.slice(0, 3))
    assert out.column("status").to_pylist() == ["ok"] * 3
    assert out.column("caption").to_pylist() == table.column("caption").to_pylist()[:3]
    assert out.column("caption_rewrites").to_pylist() == [[], [], []]
    for reason in out.column("rewrite_reason").to_pylist():
        assert reason == "no valid rewrite: too_long x4"


def test_chat_mode_with_transformers(world_table):
    table, pairs = world_table
    stage = Rewrite(make_config(mode="chat", n_rewrites=2))
    out = stage(table.slice(0, 6))
    rewrites = out.column("caption_rewrites").to_pylist()
    assert sum(bool(r) for r in rewrites) >= 5
    for p, rws in zip(pairs[:6], rewrites):
        assert all(keeps_concept(r, p.colour, p.shape) for r in rws)


# ---- Acceptance 2: openai engine through a local OpenAI-compatible server -----------------------


@pytest.fixture(scope="module")
def flaky_server():
    from tests.openai_server import ToyLMServer

    with ToyLMServer(str(TOY_LM), fail_500_every=4, fail_429_every=7, api_key="test-key-1") as server:
        yield server


def test_openai_engine_with_retries(world_table, flaky_server, monkeypatch):
    monkeypatch.setenv("REWRITE_TEST_API_KEY", "test-key-1")
    table, pairs = world_table
    stage = Rewrite(make_config({"type": "openai", "model": "toy-lm", "base_url": flaky_server.base_url,
                         "api_key_env": "REWRITE_TEST_API_KEY", "http_backoff_s": 0.01, "request_concurrency": 4,
                         # every 4th POST fails, shared by 4 threads: under load one request can land on
                         # several multiples of 4 in a row, so give it more attempts than the default 5
                         "http_retries": 20}))  # fmt: skip
    before = dict(flaky_server.statuses())
    out = stage(table)
    check_world_rewrites(out, pairs, 4)
    after = flaky_server.statuses()
    assert after.get(500, 0) > before.get(500, 0) and after.get(429, 0) > before.get(429, 0)
    assert after.get(401, 0) == before.get(401, 0)  # the key from the environment was sent
    # No rewrite slot was lost to the injected failures: they were all retried.
    assert "http_error" not in json.dumps(out.column("rewrite_reason").to_pylist())


def test_openai_engine_chat_mode(world_table, flaky_server, monkeypatch):
    monkeypatch.setenv("REWRITE_TEST_API_KEY", "test-key-1")
    table, pairs = world_table
    stage = Rewrite(make_config({"type": "openai", "model": "toy-lm", "base_url": flaky_server.base_url,
                         "api_key_env": "REWRITE_TEST_API_KEY", "http_backoff_s": 0.01}, mode="chat", n_rewrites=2))  # fmt: skip
    out = stage(table.slice(0, 6))
    rewrites = out.column("caption_rewrites").to_pylist()
    assert sum(bool(r) for r in rewrites) >= 5
    for p, rws in zip(pairs[:6], rewrites):
        assert all(keeps_concept(r, p.colour, p.shape) for r in rws)


def test_openai_engine_unreachable_endpoint_keeps_rows(world_table):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    table, _ = world_table
    stage = Rewrite(make_config({"type": "openai", "model": "toy-lm", "base_url": f"http://127.0.0.1:{port}/v1",
                         "http_retries": 1, "http_backoff_s": 0.0, "max_retries": 0}, n_rewrites=1))  # fmt: skip
    out = stage(table.slice(0, 1))  # one row: that row keeps its caption, with the reason
    assert out.column("status").to_pylist() == ["ok"]
    assert out.column("caption_rewrites").to_pylist() == [[]]
    assert all(r.startswith("no valid rewrite: http_error") for r in out.column("rewrite_reason").to_pylist())
    # a batch where not one request was answered is the stage's failure (issue 12), not the rows'
    from stages.base import StageFailed

    with pytest.raises(StageFailed, match="stage rewrite: no generation for any of 2 rows: http_error"):
        stage(table.slice(0, 2))


def test_openai_engine_missing_key_env_fails_setup(monkeypatch):
    monkeypatch.delenv("REWRITE_TEST_MISSING", raising=False)
    stage = Rewrite(make_config({"type": "openai", "model": "toy-lm", "api_key_env": "REWRITE_TEST_MISSING"}))
    with pytest.raises(RuntimeError, match="REWRITE_TEST_MISSING"):
        stage.setup()


# ---- Acceptance 3: the ray.data.llm description (vllm, http) ----------------------------------------


def _run_spec_by_hand(spec, table: pa.Table, engine_output) -> pa.Table:
    """What ``pipeline.ray.hooks.apply_processor`` does, modelled here without Ray: explode,
    preprocess, the engine, postprocess, collect.

    Faked, and why: Ray's processor loop is this function's model of it (rows marked with
    ``__inference_error__`` skip the engine and the postprocess; Ray fills keys a row lacks with
    nulls), and ``engine_output`` stands in for the engine's output fields. It lets the tests below
    place an echo, an engine error or a 500 on one chosen generation slot, which a real engine cannot
    be made to do, at unit speed. The model is checked against Ray itself by
    ``tests/stages/test_rewrite_vllm_ray.py`` (Ray's vLLM processor, only vLLM replaced) and the
    HTTP-processor tests (``test_ray_data_llm_end_to_end_with_the_http_processor``,
    ``tests/stages/test_rewrite_http_ray.py``)."""
    processed = []
    for r in spec.explode(table).to_pylist():
        data = {**r, **spec.preprocess(r)}
        if data.get(RAY_ERROR):
            processed.append(data)
            continue
        data.update(engine_output(data))
        processed.append(data if data.get(RAY_ERROR) else spec.postprocess(data))
    names = list(dict.fromkeys(k for r in processed for k in r))  # Ray fills missing keys with nulls
    return spec.collect(pa.Table.from_pylist([{k: r.get(k) for k in names} for r in processed]))


def test_vllm_spec_processor_kwargs():
    stage = Rewrite(make_config({"type": "vllm", "model": "meta-llama/Meta-Llama-3.1-8B-Instruct",
                                 "processor_batch_size": 128, "accelerator_type": "H100",
                                 "engine_kwargs": {"max_model_len": 4096, "enable_prefix_caching": True}},
                                mode="chat", concurrency=4, num_gpus=2))  # fmt: skip
    spec = stage.dataset_hook()
    assert spec.config_class == "vLLMEngineProcessorConfig" and spec.secret_kwargs == {}
    kw = spec.config_kwargs
    assert kw["model_source"] == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert kw["engine_kwargs"] == {
        "max_model_len": 4096,
        "enable_prefix_caching": True,
        "tensor_parallel_size": 2,
    }
    assert (kw["concurrency"], kw["batch_size"], kw["accelerator_type"]) == (4, 128, "H100")
    assert (
        kw["chat_template_stage"] is True
        and kw["detokenize_stage"] is False
        and kw["should_continue_on_error"]
    )
    vllm_default = Rewrite(make_config({"type": "vllm", "model": "some/model"}))
    assert vllm_default.dataset_hook().config_kwargs["chat_template_stage"] is False
    llm = require_module("ray.data.llm", LLM_MISSING)
    cfg = llm.vLLMEngineProcessorConfig(**kw)  # the kwargs are the real config's fields
    assert cfg.model_source == kw["model_source"] and cfg.accelerator_type == "H100"
    assert cfg.engine_kwargs["tensor_parallel_size"] == 2


def test_vllm_spec_row_functions(world_table):
    table, pairs = world_table
    stage = Rewrite(make_config({"type": "vllm", "model": "some/model", "spares": 2}))
    spec = stage.dataset_hook()
    rows = pa.concat_tables([table.slice(0, 3), table.slice(N_ROWS, 1)])  # 3 ok rows + 1 not ok
    # not a base column (conform would cast a base one anyway): only the carrier's schema restores it
    rows = rows.append_column("faces", pa.array([64, 32, 16, 8], pa.int16()))
    rows = rows.append_column(
        "image", pa.array([b"\xff\xd8\xff" + bytes([i]) for i in range(4)], pa.binary())
    )
    exploded = spec.explode(rows).to_pylist()
    carriers = [r for r in exploded if r[SLOT] == -1]
    assert [r["key"] for r in carriers] == rows.column("key").to_pylist()
    assert all(r[RAY_ERROR] == CARRY and r["image"] for r in carriers)
    requests_ = [r for r in exploded if r[SLOT] >= 0]
    assert len(requests_) == 3 * (4 + 2)  # the row that is not ok only travels as its carrier
    assert [r[SLOT] for r in requests_[:6]] == list(range(6)) and all(r[RAY_ERROR] == "" for r in requests_)
    assert all(r["image"] is None for r in requests_)  # request rows stay light; the carrier holds the row
    exploded = [carriers[0], *requests_]
    req = spec.preprocess(exploded[1])
    assert req["prompt"] == stage.build_prompt(pairs[0].caption, req["_rw_examples"])
    sp = req["sampling_params"]
    assert (sp["temperature"], sp["top_p"], sp["max_tokens"], sp["stop"]) == (0.9, 0.95, 77, ["\n"])
    assert spec.preprocess(exploded[1])["sampling_params"]["seed"] == sp["seed"]
    assert spec.preprocess(exploded[2])["sampling_params"]["seed"] != sp["seed"]
    carrier_req = spec.preprocess(exploded[0])  # never sent (the carrier bypasses vLLM), same shape
    assert set(carrier_req) == set(req) and set(carrier_req["sampling_params"]) == set(sp)

    def vllm_output(data):  # the fields vLLM's stage adds; slot 1 echoes, slot 3 fails in the engine
        slot = data[SLOT]
        if slot == 3:
            return {RAY_ERROR: "ValueError: prompt too long"}
        text = data["_rw_caption"] if slot == 1 else f"A rewrite number {slot} of the caption."
        return {"generated_text": f" {text}\nnext line => x", "num_generated_tokens": 9}

    out = _run_spec_by_hand(spec, rows, vllm_output)
    for name in ("key", "caption", "status", "faces", "image"):
        assert out.column(name).to_pylist() == rows.column(name).to_pylist()
        assert out.schema.field(name).type == rows.schema.field(name).type  # int16 stays int16
    rw = out.column("caption_rewrites").to_pylist()
    assert rw[:3] == [[f"A rewrite number {s} of the caption." for s in (0, 2, 4, 5)]] * 3
    assert rw[3] is None and out.column("rewrite_reason").to_pylist()[3] is None
    assert out.column("rewrite_reason").to_pylist()[:3] == [None] * 3  # spares replaced the two failures
    assert not [c for c in out.column_names if c.startswith("_rw") or c == RAY_ERROR]
    assert out.schema.field("caption_rewrites").type == pa.list_(pa.string())


def test_http_spec_kwargs_and_row_functions(world_table, monkeypatch):
    monkeypatch.setenv("REWRITE_TEST_API_KEY", "k-1")
    monkeypatch.setenv("REWRITE_TEST_ORG", "org-7")
    table, _ = world_table
    stage = Rewrite(make_config({"type": "openai", "model": "toy-lm", "base_url": "http://127.0.0.1:9/v1", "qps": 2.5,
                                 "api_key_env": "REWRITE_TEST_API_KEY", "header_envs": {"OpenAI-Organization": "REWRITE_TEST_ORG"},
                                 "http_retries": 3, "http_backoff_s": 0.5, "spares": 0}, n_rewrites=2))  # fmt: skip
    spec = stage.dataset_hook()
    assert spec.config_class == "HttpRequestProcessorConfig"
    assert callable(spec.config_kwargs.pop("session_factory"))
    assert spec.config_kwargs == {"batch_size": 64, "concurrency": 1, "url": "http://127.0.0.1:9/v1/completions",
                                     "qps": 2, "max_retries": 3, "base_retry_wait_time_in_s": 0.5}  # fmt: skip
    assert spec.secret_kwargs == {"headers": {"Authorization": "Bearer k-1", "OpenAI-Organization": "org-7"}}
    assert "k-1" not in repr(spec)
    llm = require_module("ray.data.llm", LLM_MISSING)
    cfg = llm.HttpRequestProcessorConfig(**spec.config_kwargs, **spec.secret_kwargs)
    assert cfg.url.endswith("/v1/completions") and cfg.max_retries == 3
    one = table.slice(0, 1)
    row = one.to_pylist()[0]
    payload = spec.preprocess(spec.explode(one).to_pylist()[1])["payload"]
    assert payload["model"] == "toy-lm" and payload["prompt"].endswith(f"{row['caption']} =>")
    assert (payload["max_tokens"], payload["stop"], payload["n"]) == (77, ["\n"], 1)

    def http_output(data):  # slot 0: a 500 body (Ray does not retry 500); slot 1: a completion
        if data[SLOT] == 0:
            return {"http_response": {"error": {"message": "boom", "code": 500}}}
        return {"http_response": {"choices": [{"index": 0, "text": " A fine rewrite.\n"}]}}

    out = _run_spec_by_hand(spec, one, http_output)
    assert out.column("caption_rewrites").to_pylist() == [["A fine rewrite."]]
    assert out.column("rewrite_reason").to_pylist() == ["1/2 rewrites; rejected: http_error boom x1"]

    def compact_output(data):  # the same through http_session's compact responses
        if data[SLOT] == 0:
            return {"http_response": {"text": None, "error": "http 500: boom"}}
        return {"http_response": {"text": " A fine rewrite.\n", "error": None}}

    out = _run_spec_by_hand(spec, one, compact_output)
    assert out.column("caption_rewrites").to_pylist() == [["A fine rewrite."]]
    assert out.column("rewrite_reason").to_pylist() == [
        "1/2 rewrites; rejected: http_error http 500: boom x1"
    ]


def test_http_session_compacts_responses(flaky_server):
    """The session factory given to ray.data.llm, on real requests: success and 500 alike become
    ``{"text", "error"}``."""
    import asyncio

    from stages.rewrite import http_session

    async def post_many(n):
        out = []
        async with http_session("completion", 30.0) as session:
            for i in range(n):
                body = {"model": "toy-lm", "prompt": "write image captions differently,\n\na red star =>",
                        "max_tokens": 20, "stop": ["\n"], "seed": i}  # fmt: skip
                headers = {"Authorization": "Bearer test-key-1"}
                async with session.post(
                    flaky_server.base_url + "/completions", json=body, headers=headers
                ) as r:
                    out.append((r.status, await r.json()))
        return out

    results = asyncio.run(post_many(8))
    assert {status for status, _ in results} >= {200, 500}
    for status, resp in results:
        assert set(resp) == {"text", "error"}
        if status == 200:
            assert isinstance(resp["text"], str) and resp["error"] is None
        elif status == 500:
            assert resp["text"] is None and resp["error"] == "http 500: injected internal error"


def test_vllm_engine_without_ray_says_how_to_run():
    stage = Rewrite(make_config({"type": "vllm", "model": "some/model"}))
    out = stage(pa.table({"key": ["1"], "caption": ["a red circle"], "status": ["ok"]}))
    assert out.column("status").to_pylist() == ["stage_error"]
    assert "ray.data.llm" in out.column("reason").to_pylist()[0]


def test_ray_data_llm_end_to_end_with_the_http_processor(ray_session, world_table, flaky_server, monkeypatch):
    """The openai engine through ray.data.llm's HttpRequestProcessorConfig on a local Ray, against the
    local server (Ray retries the injected 429s; an injected 500 becomes a rejected generation that
    a spare replaces)."""
    import ray

    from pipeline.ray.hooks import apply_processor

    monkeypatch.setenv("REWRITE_TEST_API_KEY", "test-key-1")
    table, pairs = world_table
    stage = Rewrite(make_config({"type": "openai", "model": "toy-lm", "base_url": flaky_server.base_url,
                                 "api_key_env": "REWRITE_TEST_API_KEY", "http_backoff_s": 0.05, "spares": 4,
                                 "processor_batch_size": 16}))  # fmt: skip
    small = table.slice(0, 8)
    before = dict(flaky_server.statuses())
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = apply_processor(ray.data.from_arrow(small), stage.dataset_hook(), group_by="key")
        out = pa.Table.from_pylist(ds.take_all())
    finally:
        if started:
            ray.shutdown()
    after = flaky_server.statuses()
    assert after.get(500, 0) > before.get(500, 0) and after.get(429, 0) > before.get(429, 0)
    out = out.sort_by("key")
    assert out.column("key").to_pylist() == small.column("key").to_pylist()
    assert out.column("status").to_pylist() == ["ok"] * 8
    rewrites = out.column("caption_rewrites").to_pylist()
    assert all(rewrites) and sum(len(r) == 4 for r in rewrites) >= 4, out.column("rewrite_reason").to_pylist()
    for reason in out.column("rewrite_reason").to_pylist():  # 429s were retried by Ray: never a reason
        assert reason is None or "429" not in reason
    for p, rws in zip(pairs, rewrites):
        assert all(keeps_concept(r, p.colour, p.shape) for r in rws)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_fails_the_run_in_one_line(tmp_path, capsys):
    """`clipcurate run` with the vllm engine and no vLLM: exit 2 before Ray starts and before anything is
    written, one line naming the stage, the key and the package; `validate` still passes (a GPU
    workflow can be checked on a laptop)."""
    from pipeline import cli

    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1/a.jpg,a red circle\n")
    wf = tmp_path / "wf.yaml"
    wf.write_text(
        "name: gpu\nstages:\n"
        f"  - read: {{path: {urls}}}\n"
        "  - rewrite: {engine: {type: vllm, model: some/model}}\n"
        "  - write: {}\n"
    )
    out = tmp_path / "out"
    assert cli.main(["validate", str(wf)]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(wf), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"error: {wf}: stages[1] (rewrite): key 'engine.type': needs the Python package 'vllm'")
    assert "pip install vllm==" in err and not out.exists()
