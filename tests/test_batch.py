"""Batched offline decoding, MOD, the naive pi* merge, specialists and beam lookahead."""

from __future__ import annotations

import json

import pytest
import torch

from guidance.batch import Batch
from guidance.engine import Engine
from guidance.plan import DecodePlan, build_plan
from guidance.requests import GenerationRequest, SamplingParams
from guidance.search import BeamSettings, beam_lookahead, greedy_generate
from model_store.errors import StoreError
from model_store.loader import load_store
from model_store.manifest import MANIFEST_NAME
from model_store.validate import check_store

MODES = ("none", "explicit", "explicit-ensemble", "implicit", "implicit-ensemble")
PROMPTS = ("How do I bake bread?", "Hi", "Tell me a long story about a dragon and a knight")


@pytest.fixture(scope="module")
def engine(tiny_store):
    return Engine(load_store(tiny_store, "cpu", "float32"))


def prompt_ids(store) -> list[list[int]]:
    return [store.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def one_at_a_time(engine: Engine, ids: list[int], mu, mode: str, method="bone-soup") -> list[int]:
    request = GenerationRequest(
        "t", tuple(ids), mu, mode, 1.0, SamplingParams(), 10, merge_method=method
    )
    return [event.id for event in engine.run_to_completion(request)]


class Member:
    def __init__(self, plan: DecodePlan, gamma: float = 1.0) -> None:
        self.plan, self.gamma = plan, gamma


def prefill(store, plan: DecodePlan, prompts: list[list[int]]) -> tuple[Batch, torch.Tensor]:
    """A batch of `prompts` under one plan, prefilled; its outputs at the last prompt token."""
    batch = Batch(store)
    batch.start([Member(plan) for _ in prompts], prompts)
    return batch, batch.prefill(batch.prefill_left)


@pytest.mark.parametrize("mode", MODES)
def test_batched_greedy_equals_the_engine_per_prompt(engine, mode):
    """Left padding, positions and per-row coefficients must not change a single token."""
    mu = torch.tensor([0.3, 0.7], dtype=torch.float64)
    plan = build_plan(engine.store, mode, mu, "bone-soup")
    ids = prompt_ids(engine.store)
    batched = greedy_generate(engine.store, plan, ids, 10, 1.0)
    assert batched == [one_at_a_time(engine, p, mu, mode) for p in ids]


def test_batched_greedy_with_standalone_value_models(standalone_store):
    engine = Engine(load_store(standalone_store, "cpu", "float32"))
    mu = torch.tensor([0.6, 0.4], dtype=torch.float64)
    plan = build_plan(engine.store, "explicit", mu, "bone-soup")
    ids = prompt_ids(engine.store)
    batched = greedy_generate(engine.store, plan, ids, 8, 1.0)
    expected = [one_at_a_time(engine, p, mu, "explicit")[:8] for p in ids]
    assert batched == expected


def test_rewarded_soup_merges_the_specialists(engine):
    store = engine.store
    mu = torch.tensor([0.25, 0.75], dtype=torch.float64)
    plan = build_plan(store, "none", mu, "rewarded-soup")
    policy = plan.coefficients[0].double()
    assert torch.allclose(policy[store.specialist_slots], mu.to(policy))  # lambda = mu
    assert not policy[store.backbone_slots].any()


def test_rewarded_soup_needs_specialists_unless_b_is_identity(tmp_path, tiny_store, soup_store):
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(tiny_store, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["specialists"] = []
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    store = load_store(copy, "cpu", "float32")
    with pytest.raises(ValueError, match="no Rewarded-Soup specialists"):
        build_plan(store, "none", torch.tensor([0.5, 0.5], dtype=torch.float64), "rewarded-soup")
    soup = load_store(soup_store, "cpu", "float32")  # B = I: its backbones are specialists
    plan = build_plan(soup, "none", torch.tensor([0.5, 0.5], dtype=torch.float64), "rewarded-soup")
    assert plan.coefficients[0, soup.backbone_slots].tolist() == [0.5, 0.5]


def test_specialists_must_be_one_hot(store_copy):
    manifest = json.loads((store_copy / MANIFEST_NAME).read_text())
    manifest["specialists"][0]["weights"] = [0.7, 0.3]
    (store_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="one-hot"):
        check_store(store_copy)


def test_mod_is_the_mu_weighted_sum_of_specialist_logprobs(engine):
    """MOD: log pi = sum_i mu_i log pi_i, each specialist alone (not a weight merge)."""
    store, mu = engine.store, torch.tensor([0.3, 0.7], dtype=torch.float64)
    ids = prompt_ids(store)[:2]
    mod = build_plan(store, "none", mu, "rewarded-soup", policy="logit-ensemble")
    single = [
        build_plan(store, "none", torch.eye(2, dtype=torch.float64)[i], "rewarded-soup")
        for i in range(2)
    ]
    batch, out = prefill(store, mod, ids)
    got, _ = batch.parts(out)  # (prompts, vocab): the MOD policy's log pi
    singles = []
    for plan in single:
        single_batch, single_out = prefill(store, plan, ids)
        singles.append(single_batch.parts(single_out)[0])
    assert torch.allclose(got, 0.3 * singles[0] + 0.7 * singles[1], atol=1e-5)
    merged = build_plan(store, "none", mu, "rewarded-soup")
    assert greedy_generate(store, mod, ids, 8, 1.0, ignore_eos=True) != greedy_generate(
        store, merged, ids, 8, 1.0, ignore_eos=True
    )


def test_naive_pistar_merges_backbones_with_mu(engine):
    store, mu = engine.store, torch.tensor([0.2, 0.8], dtype=torch.float64)
    naive = build_plan(store, "implicit", mu, "bone-soup", pistar_merge="direct")
    (pistar,) = naive.pistar_rows
    assert pistar != naive.policy_rows[0]
    assert torch.allclose(naive.coefficients[pistar, store.backbone_slots].double(), mu)
    merged = build_plan(store, "implicit", mu, "bone-soup")  # pi* = the Bone Soup policy row
    assert merged.pistar_rows == merged.policy_rows
    ids = prompt_ids(store)
    assert greedy_generate(store, naive, ids, 10, 1.0, ignore_eos=True) != greedy_generate(
        store, merged, ids, 10, 1.0, ignore_eos=True
    )


def test_keep_reorders_and_repeats_every_lane(engine):
    store = engine.store
    plan = build_plan(store, "implicit", torch.tensor([0.5, 0.5], dtype=torch.float64), "direct")
    ids = prompt_ids(store)
    batch, _ = prefill(store, plan, ids)
    reference = batch.scores(batch.decode([5, 6, 7]))
    swapped, _ = prefill(store, plan, ids)
    swapped.keep([2, 0, 0])
    got = swapped.scores(swapped.decode([7, 5, 5]))
    assert torch.allclose(got, reference[[2, 0, 0]], atol=1e-5)


def implicit_reward(store, plan, prompt: list[int], tokens: list[int]) -> float:
    """Teacher-forced sum of log pi*/pi_ref over the tokens (the beam's score)."""
    batch, out = prefill(store, plan, [prompt])
    total = 0.0
    for token in tokens:
        total += float(batch.parts(out)[1][0, token])
        out = batch.decode([token])
    return total


def test_beam_lookahead_returns_its_best_scored_beam(engine):
    store = engine.store
    plan = build_plan(store, "implicit", torch.tensor([0.4, 0.6], dtype=torch.float64), "bone-soup")
    prompt = prompt_ids(store)[0]
    settings = BeamSettings(width=3, expansion=2, interval=3, seed=1)
    ((tokens, score),) = beam_lookahead(store, plan, [prompt], 9, 1.0, set(), settings)
    assert len(tokens) == 9
    assert score == pytest.approx(implicit_reward(store, plan, prompt, tokens), abs=1e-4)
    ((again, _),) = beam_lookahead(store, plan, [prompt], 9, 1.0, set(), settings)
    assert again == tokens  # seeded
    rivals = [
        beam_lookahead(store, plan, [prompt], 9, 1.0, set(), BeamSettings(1, 1, 3, seed))[0][1]
        for seed in range(4)
    ]
    assert score >= sorted(rivals)[1]  # search beats most single samples


def test_beam_lookahead_batches_prompts_independently(engine):
    """Several prompts in one batch: each result is that prompt's own best, scored on it."""
    store = engine.store
    plan = build_plan(store, "implicit", torch.tensor([0.4, 0.6], dtype=torch.float64), "bone-soup")
    prompts = prompt_ids(store)
    found = beam_lookahead(store, plan, prompts, 6, 1.0, set(), BeamSettings(2, 2, 2, seed=3))
    assert len(found) == len(prompts)
    for prompt, (tokens, score) in zip(prompts, found, strict=True):
        assert len(tokens) == 6
        assert score == pytest.approx(implicit_reward(store, plan, prompt, tokens), abs=1e-4)
