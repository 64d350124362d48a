"""The oracles of `mage eval` (evaluation.oracle): guided by a planted true reward, checked
against an independent scoring of their candidates, and equal to the plain policy at K = 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli.main import main as mage
from evaluation.methods import METHODS, decode
from evaluation.oracle import (
    OracleSettings,
    TrueReward,
    best_of_k,
    controlled_decode,
    oracle_responses,
)
from guidance.plan import build_plan
from guidance.requests import SamplingParams
from guidance.search import greedy_generate, run_plan
from model_store.loader import load_store
from objectives.prompts import load_prompts
from objectives.scale import RewardScale
from training.common import encode_prompt

PLANTED = ("tests.test_oracle:count_a", "tests.test_oracle:count_e")


def count_a(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(r.count("a")) for r in responses]


def count_e(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(r.count("e")) for r in responses]


def planted(mu, responses: list[str]) -> np.ndarray:
    """mu^T r of the planted rewards, computed without the oracle's code."""
    return np.array([mu[0] * r.count("a") + mu[1] * r.count("e") for r in responses])


@pytest.fixture(scope="module")
def setup(tiny_store):
    store = load_store(tiny_store, "cpu", "float32")
    chosen = load_prompts("validation")[:3]
    prompts = [encode_prompt(store.tokenizer, p["prompt"]) for p in chosen]
    return store, prompts, [p["prompt"] for p in chosen]


def policy_plan(store, mu):
    return build_plan(store, "none", torch.tensor(mu, dtype=torch.float64), "bone-soup")


def reward() -> TrueReward:
    return TrueReward(PLANTED, RewardScale.identity(2))


@pytest.mark.parametrize("mu", [(1.0, 0.0), (0.0, 1.0), (0.8, 0.2)])
def test_best_of_k_picks_the_argmax_of_the_true_reward(setup, mu):
    store, prompts, texts = setup
    settings = OracleSettings(samples=6)
    answers = best_of_k(store, policy_plan(store, mu), prompts, texts, mu, reward(), settings, 8)
    greedy = greedy_generate(store, policy_plan(store, mu), prompts, 8, 1.0)
    for answer, greedy_ids in zip(answers, greedy, strict=True):
        candidates = [text for text, _ in answer.candidates]
        assert len(candidates) == 6 and candidates[0] == decode(store, greedy_ids)
        assert len(set(candidates)) > 1  # the samples differ, so the pick means something
        independent = planted(mu, candidates)
        assert answer.text == candidates[int(np.argmax(independent))]
        assert answer.score == pytest.approx(independent.max())
        assert answer.forwards >= 6  # one row per candidate per step, at least one step each


def test_the_pick_follows_the_preference(setup):
    """Same candidates (one policy), planted rewards that disagree: mu = (1, 0) and (0, 1)
    pick different answers, each the better one on its own reward."""
    store, prompts, texts = setup
    plan, settings, picks = policy_plan(store, (0.5, 0.5)), OracleSettings(samples=8), {}
    for mu in ((1.0, 0.0), (0.0, 1.0)):
        picks[mu] = best_of_k(store, plan, prompts, texts, mu, reward(), settings, 8)
    pairs = list(zip(picks[(1.0, 0.0)], picks[(0.0, 1.0)], strict=True))
    for by_a, by_e in pairs:
        assert by_a.text.count("a") >= by_e.text.count("a")
        assert by_e.text.count("e") >= by_a.text.count("e")
    assert any(a.text != e.text for a, e in pairs)


def test_one_candidate_is_the_plain_policy(setup):
    """K = 1 (best of the greedy answer alone) and k = 1 (only the policy's top token) both
    decode Bone Soup greedily."""
    store, prompts, texts = setup
    mu = (0.3, 0.7)
    greedy = [
        decode(store, ids)
        for ids in greedy_generate(store, policy_plan(store, mu), prompts, 9, 1.0)
    ]
    for method, settings in (
        ("oracle-bok", OracleSettings(samples=1)),
        ("oracle-cd", OracleSettings(candidates=1, rollout=3, interval=2)),
    ):
        answers = oracle_responses(store, method, mu, prompts, texts, reward(), settings, 9)
        assert [a.text for a in answers] == greedy, method


def test_controlled_decoding_keeps_the_best_scored_token(setup):
    """With interval = rollout = the whole answer, controlled decoding makes one decision:
    the best by mu^T r of the policy's top-k first tokens, each continued greedily;
    recomputed here from the engine's top tokens and greedy continuations."""
    store, prompts, texts = setup
    mu, k, n = (1.0, 0.0), 4, 6
    plan = policy_plan(store, mu)
    settings = OracleSettings(candidates=k, rollout=n, interval=n)
    answers = controlled_decode(store, plan, prompts, texts, mu, reward(), settings, n)
    first = run_plan(store, plan, prompts, 1, sampling=[SamplingParams(top_n=k)] * len(prompts))
    for prompt, events, answer in zip(prompts, first, answers, strict=True):
        tops = [top.id for top in events[0].top_tokens]
        bodies = []
        for token in tops:
            rest = (
                []
                if token in store.eos_ids
                else greedy_generate(store, plan, [prompt + [token]], n - 1, 1.0)[0]
            )
            bodies.append([token, *rest])
        scores = planted(mu, [decode(store, body) for body in bodies])
        best = int(np.argmax(scores))
        assert answer.tokens == bodies[best] and answer.choices == [best]
        assert answer.forwards == 1 + sum(len(b) - 1 for b in bodies)


def test_controlled_decoding_decides_every_interval(setup):
    store, prompts, texts = setup
    mu = (0.0, 1.0)
    settings = OracleSettings(candidates=3, rollout=3, interval=2)
    answers = controlled_decode(
        store, policy_plan(store, mu), prompts, texts, mu, reward(), settings, 7
    )
    for answer in answers:
        ended = answer.tokens[-1] in store.eos_ids
        assert len(answer.tokens) == 7 or ended
        assert len(answer.choices) == -(-len(answer.tokens) // 2) or ended
        assert all(0 <= rank < 3 for rank in answer.choices)


def test_oracle_settings_are_checked():
    with pytest.raises(ValueError, match="rollout"):
        OracleSettings(rollout=2, interval=4)
    with pytest.raises(ValueError, match=">= 1"):
        OracleSettings(samples=0)


def test_mage_eval_runs_the_oracles(tiny_store, tmp_path, capsys):
    out = tmp_path / "ev"
    args = [
        "eval",
        "--store",
        str(tiny_store),
        "--out",
        str(out),
        "--methods",
        "bone-soup,oracle-bok,oracle-cd",
        "--preferences",
        "1,0;0,1",
        "--rewards",
        ",".join(PLANTED),
        "--split",
        "validation",
        "--limit",
        "2",
        "--max-new-tokens",
        "5",
        "--hv-reference=-1,-1",
        "--oracle-samples",
        "3",
        "--oracle-candidates",
        "2",
        "--oracle-rollout",
        "2",
        "--oracle-interval",
        "2",
        "--replicates",
        "50",
    ]
    assert mage(args) == 0
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    assert metrics["oracle-bok"]["forwards_per_token"] >= 3
    assert metrics["oracle-cd"]["forwards_per_token"] > 1
    assert "forwards_per_token" not in metrics["bone-soup"]
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    bok = [r for r in rows if r["method"] == "oracle-bok"]
    assert bok and all(len(r["candidates"]) == 3 for r in bok)
    for r in bok:  # the kept answer is the best candidate by the planted mu^T r
        best = max(planted(r["preference"], [c for c, _ in r["candidates"]]))
        assert planted(r["preference"], [r["response"]])[0] == best
    pairs = {(c["a"], c["b"]) for c in results["comparisons"]}
    assert {("oracle-bok", "bone-soup"), ("oracle-cd", "bone-soup")} <= pairs
    assert "forwards/token" in capsys.readouterr().out


def test_generate_batch_refuses_an_oracle(setup):
    from evaluation.methods import generate_batch
    from guidance.search import BeamSettings

    store, prompts, _ = setup
    assert METHODS["oracle-bok"].oracle == "best-of-k"
    with pytest.raises(ValueError, match="true rewards"):
        generate_batch(store, "oracle-bok", (0.5, 0.5), prompts, 3, 1.0, set(), BeamSettings())


def test_answer_relevance_subtracts_the_echo(monkeypatch):
    from objectives.rewards import builtin

    assert builtin.echo_share("How do I take notes?", "how do I take NOTES") == 1.0
    assert builtin.echo_share("How do I take notes?", "Write less, listen more.") == 0.0
    assert builtin.echo_share("Take notes", "Notes: take notes daily") == pytest.approx(1 / 3)
    monkeypatch.setattr(builtin.RelevanceReward, "_score", lambda self, s, p, r: [0.9] * len(r))
    reward = builtin.AnswerRelevanceReward()
    prompts = ["How do I take notes?"] * 2
    scores = reward._score(None, prompts, ["How do I take notes?", "Write less, listen more."])
    assert scores == pytest.approx([-0.1, 0.9])


def test_room_compares_the_best_candidate_with_the_greedy_one():
    """A planted pool: candidate 1 is better on objective 0, candidate 2 on objective 1; the
    oracle's front takes each where its preference asks, the greedy front is candidate 0."""
    from evaluation.room import room

    prefs = [(1.0, 0.0), (0.0, 1.0)]
    raw = np.zeros((2, 5, 3, 2))
    raw[:, :, 1, 0], raw[:, :, 2, 1] = 1.0, 2.0
    found = room(raw, prefs, RewardScale.identity(2), replicates=50)
    assert found["oracle_front"] == [[1.0, 0.0], [0.0, 2.0]]
    assert found["greedy_front"] == [[0.0, 0.0], [0.0, 0.0]]
    assert found["gain_sd"] == [1.0, 2.0] and found["picked_greedy_share"] == 0.0
    assert found["hv_bone_soup"] == 4.0 and found["hv_oracle"] == pytest.approx(3 * 2 + 2 * 2)
