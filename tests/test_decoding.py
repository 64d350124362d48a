"""Guided decoding: equivalences the paper's modes must satisfy, sampling, stopping, cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from guidance.detokenize import IncrementalDetokenizer
from guidance.engine import Engine, EngineConfig
from guidance.requests import (
    ErrorEvent,
    SamplingParams,
    TokenEvent,
)
from model_store.loader import load_store
from tests.common import make_request, tiny_tokenizer

MODES = ("none", "explicit", "explicit-ensemble", "implicit", "implicit-ensemble")
PROMPT = "How do I bake bread?"


def generate(
    engine: Engine,
    mu,
    mode="none",
    gamma=1.0,
    max_new=12,
    sampling=None,
    stop=(),
    method="bone-soup",
) -> tuple[list[TokenEvent], TokenEvent | ErrorEvent]:
    request = make_request(
        engine.store, PROMPT, mu, mode, max_new, sampling, method, gamma, tuple(stop)
    )
    events = engine.run_to_completion(request)
    assert len(events) <= max_new
    return events[:-1], events[-1]


def token_ids(engine, *args, **kwargs) -> list[int]:
    tokens, final = generate(engine, *args, **kwargs)
    assert isinstance(final, TokenEvent), final
    return [t.id for t in tokens] + [final.id]


@pytest.fixture(scope="module")
def soup_engine(soup_store):
    return Engine(load_store(soup_store, "cpu", "float32"))


@pytest.fixture(scope="module")
def bone_engine(tiny_store):
    return Engine(load_store(tiny_store, "cpu", "float32"))


@pytest.mark.parametrize("objective", [0, 1])
def test_none_one_hot_equals_transformers_generate_with_merged_adapter(
    soup_store, soup_engine, objective
):
    name = soup_engine.store.objectives[objective]
    base = AutoModelForCausalLM.from_pretrained(str(soup_store / "base"), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(soup_store / f"backbones/{name}"))
    merged = merged.merge_and_unload().eval()
    ids = soup_engine.store.tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")
    expected = merged.generate(
        **ids,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=soup_engine.store.tokenizer.eos_token_id,
    )
    expected = expected[0, ids["input_ids"].shape[1] :].tolist()
    mu = [1.0 if i == objective else 0.0 for i in range(2)]
    assert token_ids(soup_engine, mu, "none") == expected


@pytest.mark.parametrize("mu", [[1.0, 0.0], [0.0, 1.0]])
def test_explicit_ensemble_equals_merged_for_one_hot(bone_engine, mu):
    a, final_a = generate(bone_engine, mu, "explicit", gamma=3.0)
    b, final_b = generate(bone_engine, mu, "explicit-ensemble", gamma=3.0)
    assert [t.id for t in a] == [t.id for t in b]
    assert [t.logprob for t in a] == pytest.approx([t.logprob for t in b], abs=1e-4)


@pytest.mark.parametrize("mu", [[1.0, 0.0], [0.0, 1.0]])
def test_implicit_ensemble_equals_merged_on_soup_store(soup_engine, mu):
    assert token_ids(soup_engine, mu, "implicit", gamma=2.0) == token_ids(
        soup_engine, mu, "implicit-ensemble", gamma=2.0
    )


@pytest.mark.parametrize("mode", MODES[1:])
def test_gamma_zero_equals_none(bone_engine, mode):
    mu = [0.3, 0.7]
    reference, _ = generate(bone_engine, mu, "none")
    guided, _ = generate(bone_engine, mu, mode, gamma=0.0)
    assert [t.id for t in guided] == [t.id for t in reference]
    assert [t.logprob for t in guided] == pytest.approx([t.logprob for t in reference], abs=1e-4)


@pytest.mark.parametrize("mode", MODES[1:])
def test_guidance_changes_the_output(bone_engine, mode):
    """Every guidance mode moves the output at a large gamma: one mode whose V never reached
    the score would fail here alone."""
    mu = [0.5, 0.5]
    plain = token_ids(bone_engine, mu, "none", max_new=8)
    assert token_ids(bone_engine, mu, mode, gamma=8.0, max_new=8) != plain


def test_preference_changes_the_policy(bone_engine):
    assert token_ids(bone_engine, [1.0, 0.0]) != token_ids(bone_engine, [0.0, 1.0])


def test_standalone_value_models(standalone_store):
    engine = Engine(load_store(standalone_store, "cpu", "float32"))
    for mu in ([1.0, 0.0], [0.0, 1.0]):
        assert token_ids(engine, mu, "explicit", 4.0) == token_ids(
            engine, mu, "explicit-ensemble", 4.0
        )
    mu = [0.4, 0.6]
    assert token_ids(engine, mu, "explicit", 0.0) == token_ids(engine, mu, "none")
    assert token_ids(engine, mu, "explicit", 8.0) != token_ids(engine, mu, "none")


def test_details_report_lambda_and_cache_hits(bone_engine):
    mu = [0.123, 0.877]
    _, first = generate(bone_engine, mu, "explicit", max_new=2)
    _, second = generate(bone_engine, mu, "explicit", max_new=2)
    assert first.details["merge_cache_hit"] is False
    assert second.details["merge_cache_hit"] is True
    lam = torch.linalg.solve(
        torch.tensor([[0.7, 0.3], [0.3, 0.7]], dtype=torch.float64),
        torch.tensor(mu, dtype=torch.float64),
    )
    assert first.details["lambda"] == pytest.approx(lam.tolist(), abs=1e-6)
    assert first.details["finish_reason"] == "length"
    assert first.details["generated_tokens"] == 2


def test_cache_evicts_under_byte_budget(tiny_store):
    engine = Engine(load_store(tiny_store, "cpu", "float32"), EngineConfig(cache_budget_bytes=1))
    engine.plans.budget_bytes = 1 + engine.plans.used_bytes
    generate(engine, [0.1, 0.9], "explicit", max_new=1)
    assert engine.plans.stats.misses == 1 and len(engine.plans) == 0  # too big to keep
    engine.plans.budget_bytes = 10 << 20
    for mu in ([0.1, 0.9], [0.2, 0.8], [0.3, 0.7]):
        generate(engine, mu, "explicit", max_new=1)
    one = engine.plans.used_bytes // 3
    engine.plans.budget_bytes = 2 * one
    generate(engine, [0.4, 0.6], "explicit", max_new=1)
    assert engine.plans.stats.evictions >= 2 and engine.plans.used_bytes <= 2 * one


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(bone_engine):
    sampling = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=7)
    a = token_ids(bone_engine, [0.5, 0.5], "explicit", sampling=sampling)
    b = token_ids(bone_engine, [0.5, 0.5], "explicit", sampling=sampling)
    reseeded = dataclasses.replace(sampling, seed=8)  # the seed is all that differs
    other = token_ids(bone_engine, [0.5, 0.5], "explicit", sampling=reseeded)
    assert a == b  # the same seed draws the same tokens
    assert a != other  # another seed draws others
    assert a != token_ids(bone_engine, [0.5, 0.5], "explicit")  # and sampling is not greedy


def test_stop_sequence_ends_generation(bone_engine):
    tokens, final = generate(bone_engine, [0.3, 0.7], max_new=12)
    text = final.generated_text
    assert len(text) > 6 and "\ufffd" not in text[:6]
    stop = text[4:6]
    _, stopped = generate(bone_engine, [0.3, 0.7], max_new=12, stop=[stop])
    assert stopped.details["finish_reason"] == "stop_sequence"
    assert stop in stopped.generated_text
    assert stopped.details["generated_tokens"] < 12


def test_detokenizer_never_splits_multibyte_characters():
    tokenizer = tiny_tokenizer()
    text = "naïve café 東京 ありがとう 😀 ✓"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text
