"""The prefix cache reuses a prompt's cached KV exactly, and only under the same rows.

A request served from the cache must give the same tokens and log-probabilities as with the
cache off (fp32, 1e-5), in every guidance mode, with standalone value models, and on
sliding-window bases (whose windows drop old columns); another preference, mode or merge
method never reaches another's entries; a small budget evicts; the metrics move.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from guidance.engine import Engine, EngineConfig
from guidance.requests import SamplingParams, TokenEvent
from model_store.builder import build_random_store
from model_store.loader import load_store
from model_store.manifest import GUIDANCE_MODES
from server.metrics import Metrics
from tests.common import make_request
from tests.tiny_architectures import write_tiny_base

BLOCK = 4
HISTORY = (
    "How do I bake bread? Mix flour, water, salt and yeast, then wait. "
    "The quick brown fox jumps over the lazy dog."
)
TURN = HISTORY + " Merge and guide: controllable generation with value models."
LONG = " ".join([HISTORY] * 3)  # past the sliding buffers' first growth (> 128 columns)
SHORT = " wait"
"""A turn shorter than the tiny windows, so its tokens attend to the cached columns."""


def _engine(store, budget: int = 64 << 20, observer=None) -> Engine:
    """With the cache on, and prompts prefilled in chunks (so sliding layers drop columns
    while a long prompt is prefilled, and a suffix may take several chunks)."""
    config = EngineConfig(prefix_cache_bytes=budget, prefix_block_tokens=BLOCK, prefill_tokens=48)
    return Engine(store, config, observer)


def _run(engine: Engine, store, prompt: str, **kwargs) -> tuple[list[TokenEvent], dict]:
    events = engine.run_to_completion(make_request(store, prompt, max_new=6, **kwargs))
    assert all(isinstance(event, TokenEvent) for event in events), events[-1]
    return events, events[-1].details


def _assert_same(cached: list[TokenEvent], fresh: list[TokenEvent]) -> None:
    assert [e.id for e in cached] == [e.id for e in fresh]
    torch.testing.assert_close(
        torch.tensor([e.logprob for e in cached]),
        torch.tensor([e.logprob for e in fresh]),
        rtol=0,
        atol=1e-5,
    )


def _check_exact(store, history: str, turn: str, **kwargs) -> int:
    """Serve `history` then `turn` with the cache on; `turn` equals an uncached run. The
    tokens served from the cache."""
    return _exact_engine(store, history, turn, **kwargs)[0]


def _exact_engine(store, history: str, turn: str, **kwargs) -> tuple[int, Engine]:
    engine = _engine(store)
    _run(engine, store, history, **kwargs)
    cached, details = _run(engine, store, turn, **kwargs)
    fresh, fresh_details = _run(Engine(store), store, turn, **kwargs)
    _assert_same(cached, fresh)
    assert fresh_details["cached_tokens"] == 0
    return details["cached_tokens"], engine


@pytest.fixture(scope="module")
def tiny(tiny_store):
    return load_store(tiny_store, "cpu", "float32")


@pytest.fixture(scope="module")
def standalone(standalone_store):
    return load_store(standalone_store, "cpu", "float32")


@pytest.mark.parametrize("mode", GUIDANCE_MODES)
def test_a_cached_prefix_gives_the_tokens_and_logprobs_of_a_fresh_prefill(tiny, mode):
    history = len(tiny.tokenizer(HISTORY, add_special_tokens=False)["input_ids"])
    cached = _check_exact(tiny, HISTORY, TURN, mode=mode, mu=(0.3, 0.7))
    assert cached == history - history % BLOCK > 0


@pytest.mark.parametrize("mode", ["explicit", "explicit-ensemble"])
def test_standalone_value_models_reuse_their_own_lanes(standalone, mode):
    assert _check_exact(standalone, HISTORY, TURN, mode=mode, mu=(0.3, 0.7)) > 0


def test_sampled_requests_with_a_seed_are_unchanged(tiny):
    sampling = SamplingParams(temperature=0.9, top_k=20, seed=7)
    assert _check_exact(tiny, HISTORY, TURN, mode="implicit", sampling=sampling) > 0


@pytest.fixture(scope="module", params=["mistral", "gemma2"])
def sliding(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param) / "store"
    root.mkdir()
    write_tiny_base(root / "base", request.param)
    build_random_store(
        root, {"path": "base"}, ["a", "b"], beta=0.7, alpha=0.3, lora_std=0.3, head_std=0.5
    )
    return load_store(root, "cpu", "float32")


@pytest.mark.parametrize("mode", ["none", "implicit-ensemble", "explicit"])
def test_sliding_window_bases_reuse_only_what_their_windows_hold(sliding, mode):
    assert _check_exact(sliding, HISTORY, HISTORY + SHORT, mode=mode) > 0
    # Long enough for the sliding layers to have dropped the history's first columns: the
    # cache holds blocks without them, and reuses the prefix all the same.
    cached, engine = _exact_engine(sliding, LONG, LONG + SHORT, mode=mode)
    assert cached > 0
    assert any(None in node.kv for node in engine.prefix_cache._lru if node.parent)


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_a_finished_answer_is_cached_for_the_next_turn(tiny, mode):
    engine = _engine(tiny)
    first = make_request(tiny, HISTORY, mode=mode, max_new=6)
    answer = [event.id for event in engine.run_to_completion(first)]
    said = [*first.prompt_ids, *answer]  # the lanes hold all but the last answer token
    more = tiny.tokenizer(" Merge and guide.", add_special_tokens=False)["input_ids"]
    turn = dataclasses.replace(first, prompt_ids=tuple(said + more))
    cached = engine.run_to_completion(turn)
    assert cached[-1].details["cached_tokens"] == (len(said) - 1) // BLOCK * BLOCK
    _assert_same(cached, Engine(tiny).run_to_completion(turn))


def test_the_whole_prompt_is_never_served_from_the_cache(tiny):
    engine = _engine(tiny)
    request = make_request(tiny, TURN, max_new=6)
    whole = len(request.prompt_ids) // BLOCK * BLOCK  # every token in a whole block
    request = dataclasses.replace(request, prompt_ids=request.prompt_ids[:whole])
    engine.run_to_completion(request)
    again = engine.run_to_completion(request)
    assert again[-1].details["cached_tokens"] == whole - BLOCK  # the last token is recomputed
    _assert_same(again, Engine(tiny).run_to_completion(request))


@pytest.mark.parametrize(
    "other",
    [
        {"mu": (0.7, 0.3)},
        {"mu": (0.300001, 0.699999)},
        {"mode": "explicit"},
        {"method": "rewarded-soup"},
    ],
)
def test_another_preference_mode_or_merge_never_hits(tiny, other):
    engine = _engine(tiny)
    _run(engine, tiny, HISTORY, mu=(0.3, 0.7), mode="implicit")
    request = {"mu": (0.3, 0.7), "mode": "implicit", **other}
    served, details = _run(engine, tiny, TURN, **request)
    assert details["cached_tokens"] == 0
    _assert_same(served, _run(Engine(tiny), tiny, TURN, **request)[0])
    _, details = _run(engine, tiny, TURN, mu=(0.3, 0.7), mode="implicit")
    assert details["cached_tokens"] > 0


def test_prompt_logprobs_are_computed_not_cached(tiny):
    engine = _engine(tiny)
    _run(engine, tiny, HISTORY)
    request = make_request(tiny, TURN, max_new=2)
    request = type(request)(**{**request.__dict__, "prompt_logprobs": True})
    details = engine.run_to_completion(request)[-1].details
    assert details["cached_tokens"] == 0
    assert len(details["prefill"]) == len(request.prompt_ids)


def test_a_small_budget_evicts_least_recently_used_blocks_and_metrics_move(tiny):
    metrics = Metrics()
    probe = _engine(tiny)
    _run(probe, tiny, HISTORY)
    one_prompt = probe.prefix_cache.used_bytes
    engine = _engine(tiny, budget=one_prompt + one_prompt // 2, observer=metrics)
    metrics.watch(engine)
    other = "Héllo wörld, naïve café — ünïcödé 東京 ありがとう, the lazy dog jumps."
    _run(engine, tiny, HISTORY)
    _run(engine, tiny, other)  # over budget: the history's last blocks go first
    assert engine.prefix_cache.used_bytes <= one_prompt + one_prompt // 2
    value = metrics.registry.get_sample_value
    assert value("mage_prefix_cache_evictions_total") > 0
    assert value("mage_prefix_cache_hits_total") == 0
    _, details = _run(engine, tiny, other + " More.")  # the most recent: kept whole
    assert details["cached_tokens"] > 0
    assert value("mage_prefix_cache_hit_tokens_total") == details["cached_tokens"]
    _, details = _run(engine, tiny, TURN)
    history = len(tiny.tokenizer(HISTORY, add_special_tokens=False)["input_ids"])
    assert details["cached_tokens"] < history - history % BLOCK
    assert value("mage_prefix_cache_queries_total") == 4
    assert value("mage_prefix_cache_hits_total") == 1 + (details["cached_tokens"] > 0)
    assert value("mage_prefix_cache_query_tokens_total") > value(
        "mage_prefix_cache_hit_tokens_total"
    )
    assert value("mage_prefix_cache_bytes") == engine.prefix_cache.used_bytes > 0


def test_the_cache_is_off_by_default_offline(tiny):
    engine = Engine(tiny)
    assert engine.prefix_cache is None
    _run(engine, tiny, HISTORY)
    assert _run(engine, tiny, TURN)[1]["cached_tokens"] == 0


def test_cached_tokens_reach_openai_usage_tgi_details_and_metrics(tiny_store):
    import httpx
    import openai

    from tests.http_server import running_server

    loaded = load_store(tiny_store, "cpu", "float32")
    first = [{"role": "user", "content": HISTORY}]
    turn = [*first, {"role": "assistant", "content": "Bread."}, {"role": "user", "content": "?"}]
    with running_server(loaded, max_new_tokens=16) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answers = [
            client.chat.completions.create(model="m", messages=messages, max_tokens=2)
            for messages in (first, turn)
        ]
        usage = [answer.usage.prompt_tokens_details.cached_tokens for answer in answers]
        assert usage[0] == 0 and 0 < usage[1] < answers[1].usage.prompt_tokens
        body = {"messages": turn, "parameters": {"max_new_tokens": 2}}
        details = httpx.post(f"{url}/generate", json=body, timeout=60).json()["details"]
        assert details["cached_tokens"] >= usage[1]
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    hits = [line for line in metrics.splitlines() if line.startswith("mage_prefix_cache_hits_t")]
    assert hits == ["mage_prefix_cache_hits_total 2.0"]
