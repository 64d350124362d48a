"""Per-row sampling settings after guidance: repetition penalty and typical-p as transformers
computes them, top-n alternatives, prompt log-probabilities; each request's tokens are the
same whatever else is in the batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TypicalLogitsWarper,
)

from guidance.engine import Engine, EngineConfig
from guidance.requests import SamplingParams, TokenEvent
from guidance.sampling import choose_tokens, penalise_repeats, warp
from model_store.loader import load_store
from tests.common import make_request

PROMPT = "How do I bake bread? Mix flour, water, salt and yeast"


@pytest.fixture(scope="module")
def store(tiny_store):
    return load_store(tiny_store, "cpu", "float32")


def test_typical_p_per_row_equals_transformers():
    torch.manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(4, 50) * 3, -1)
    params = [
        SamplingParams(1.0, typical_p=0.3),
        SamplingParams(0.7),
        SamplingParams(1.0, typical_p=0.9),
        SamplingParams(1.5, top_k=20, typical_p=0.5),
    ]
    ours = warp(logprobs, params)
    for row, p in enumerate(params):
        scores = logprobs[row : row + 1] / p.temperature
        if p.top_k:
            scores = scores.masked_fill(scores < scores.topk(p.top_k).values[:, -1:], -torch.inf)
        if p.typical_p is not None:
            scores = TypicalLogitsWarper(p.typical_p)(None, scores)
        assert torch.equal(ours[row : row + 1], scores), row
    assert torch.isinf(ours[0]).sum() > 0  # it did filter


def test_repetition_penalty_per_row_equals_transformers():
    torch.manual_seed(1)
    scores = torch.randn(3, 40) * 4
    history = [[1, 5, 5, 9], [], [2, 39]]
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(), SamplingParams()]
    params[2] = SamplingParams(0.8, repetition_penalty=0.7)  # < 1 favours repeats
    seen = []
    for ids in history:
        mask = torch.zeros(40, dtype=torch.bool)
        mask[ids] = True
        seen.append(mask)
    ours = penalise_repeats(
        scores,
        params,
        [s if p.repetition_penalty != 1 else None for s, p in zip(seen, params, strict=True)],
    )
    for row, (ids, p) in enumerate(zip(history, params, strict=True)):
        processor = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)
        expected = processor(torch.tensor([ids or [0]]), scores[row : row + 1].clone())
        if not ids:
            expected = scores[row : row + 1]
        assert torch.allclose(ours[row : row + 1], expected), row
    assert not torch.equal(ours[0], scores[0])


def test_top_n_alternatives_come_back_in_the_one_transfer(monkeypatch):
    torch.manual_seed(2)
    scores = torch.randn(3, 30)
    params = [SamplingParams(top_n=3), SamplingParams(), SamplingParams(1.0, seed=1, top_n=5)]
    generators = [None, None, torch.Generator().manual_seed(1)]
    transfers = []
    original = torch.Tensor.tolist

    def counted(self):
        transfers.append(tuple(self.shape))
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    picks = choose_tokens(scores, params, generators)
    assert len(transfers) == 1
    logprobs = torch.log_softmax(scores, -1)
    for row, (pick, p) in enumerate(zip(picks, params, strict=True)):
        best = logprobs[row].topk(p.top_n) if p.top_n else None
        assert len(pick.top) == p.top_n
        if best is not None:
            assert [t for t, _ in pick.top] == best.indices.tolist()
            assert [v for _, v in pick.top] == pytest.approx(best.values.tolist())
        assert pick.logprob == pytest.approx(float(logprobs[row, pick.token]))


def events_of(engine, request) -> list[TokenEvent]:
    events = engine.run_to_completion(request)
    assert isinstance(events[-1], TokenEvent), events[-1]
    return events


def summary(events: list[TokenEvent]) -> tuple:
    """What a request produced: tokens, alternatives, prompt log-probabilities."""
    prefill = events[-1].details.get("prefill")
    return (
        [e.id for e in events],
        [[(t.id, round(t.logprob, 4)) for t in e.top_tokens] for e in events],
        [(p["id"], None if p["logprob"] is None else round(p["logprob"], 4)) for p in prefill]
        if prefill
        else None,
    )


def new_settings_requests(store):
    """Each new setting, in different modes, next to plain neighbours."""
    specs = [
        ("none", SamplingParams(repetition_penalty=1.8), False),
        ("explicit", SamplingParams(1.2, seed=5, typical_p=0.6), False),
        ("implicit", SamplingParams(top_n=3), True),
        (
            "explicit-ensemble",
            SamplingParams(0.9, top_k=30, seed=9, repetition_penalty=1.4, top_n=2),
            True,
        ),
        ("none", SamplingParams(), False),
    ]
    prompts = [PROMPT, "Hi", "Tell me a long story about a dragon", "naïve café", PROMPT]
    return [
        dataclasses.replace(
            make_request(
                store,
                prompt,
                (0.3 + 0.1 * i, 0.7 - 0.1 * i),
                mode,
                10,
                sampling,
                gamma=2.0,
                name=f"r{i}",
            ),
            prompt_logprobs=logprobs,
        )
        for i, (prompt, (mode, sampling, logprobs)) in enumerate(zip(prompts, specs, strict=True))
    ]


def test_new_settings_in_a_batch_equal_each_request_alone(store):
    reqs = new_settings_requests(store)
    together = Engine(store).run_all(reqs)
    for req, events in zip(reqs, together, strict=True):
        assert summary(events) == summary(events_of(Engine(store), req)), req.request_id
    # chunked prefill (a few columns per step) gives the same prompt log-probabilities
    chunked = Engine(store, EngineConfig(prefill_tokens=6)).run_all(reqs)
    for events, other in zip(together, chunked, strict=True):
        assert summary(events) == summary(other)


def test_repetition_penalty_changes_greedy_output_and_is_reproducible(store):
    plain = make_request(store, PROMPT, (0.5, 0.5), "none", 16)
    penalised = dataclasses.replace(plain, sampling=SamplingParams(repetition_penalty=3.0))
    ids = [e.id for e in events_of(Engine(store), plain)]
    penalised_ids = [e.id for e in events_of(Engine(store), penalised)]
    assert penalised_ids != ids
    prompt = set(plain.prompt_ids)
    # a strong penalty steers away from tokens already seen
    assert sum(t in prompt for t in penalised_ids) < sum(t in prompt for t in ids) or len(
        set(penalised_ids)
    ) > len(set(ids))
    assert [e.id for e in events_of(Engine(store), penalised)] == penalised_ids


def test_prompt_logprobs_are_the_policys_next_token_logprobs(store):
    """prefill[k] is log pi(prompt[k] | prompt[:k]): the same number the engine reports as the
    first token's alternatives when it is given prompt[:k] (mode none: guidance is off)."""
    req = dataclasses.replace(
        make_request(store, PROMPT, (0.2, 0.8), "implicit", 1), prompt_logprobs=True
    )
    prefill = events_of(Engine(store), req)[-1].details["prefill"]
    assert [p["id"] for p in prefill] == list(req.prompt_ids)
    assert prefill[0]["logprob"] is None
    vocab = len(store.tokenizer)
    for k in (1, 4, len(req.prompt_ids) - 1):
        prefix = dataclasses.replace(
            req,
            prompt_ids=req.prompt_ids[:k],
            mode="none",
            prompt_logprobs=False,
            sampling=SamplingParams(top_n=vocab),
        )
        (event,) = events_of(Engine(store), prefix)
        alternatives = dict((t.id, t.logprob) for t in event.top_tokens)
        assert prefill[k]["logprob"] == pytest.approx(alternatives[req.prompt_ids[k]], abs=1e-4)
