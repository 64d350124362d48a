"""Oracle guidance: Stage 2 with the true rewards in place of a learned value model.

The oracle measures the room guided decoding has on a task: how far the Stage-1 policy's own
candidates can be pushed by a guide that knows the reward exactly. Both oracles decode the
Bone Soup policy (Eq. 13) through the serving engine's step (guidance.search.run_plan: the
engine's batched forward, sampling and top-n alternatives), many candidates per forward, and
score candidates by the true scalarised reward mu^T r~ on the store's scale (the quantity
Eq. 12 says Bone Soup optimises, and Eq. 25's V estimates):

* `oracle-bok`, best-of-K reranking: the greedy answer and K - 1 samples (temperature 1 by
  default) per prompt; the one with the highest mu^T r~ wins. K = 1 is the greedy policy.
* `oracle-cd`, token-level controlled decoding with the true reward: at each decision the k
  most likely next tokens of the policy are each scored by mu^T r~ of the prefix, the token
  and a rollout of L more tokens (greedy, or sampled); the best token is kept together with
  the first `interval` - 1 tokens of its rollout (the policy's own continuation), then the
  next decision is made. interval = 1 decides every token; k = 1 is the greedy policy.

Cost per emitted token: `forwards` counts model rows per forward (a sequence's prefill is one
forward, each decode step one more), `positions` the token positions those forwards ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from evaluation.methods import METHODS, decode, method_store
from guidance.plan import DecodePlan, build_plan
from guidance.requests import SamplingParams, TokenEvent
from guidance.search import run_plan
from model_store.loader import LoadedStore
from objectives.rewards import get_reward
from objectives.scale import RewardScale


@dataclass(frozen=True)
class OracleSettings:
    """Knobs of the two oracles (`mage eval --oracle-*`)."""

    samples: int = 8
    """oracle-bok: K candidates per prompt, the greedy answer and K - 1 samples."""
    temperature: float = 1.0
    """oracle-bok: temperature of the K - 1 samples (no top-k or top-p filter)."""
    candidates: int = 4
    """oracle-cd: k most likely next tokens of the policy scored at each decision."""
    rollout: int = 8
    """oracle-cd: L tokens rolled out after each candidate token before scoring (>= interval)."""
    interval: int = 4
    """oracle-cd: tokens committed per decision (the chosen token and its rollout's first
    interval - 1); 1 decides every token."""
    rollout_temperature: float = 0.0
    """oracle-cd: 0 rolls out greedily; above 0 samples the rollouts at this temperature."""
    seed: int = 0
    """Seed of every sample (per candidate, so a sample does not depend on its batch)."""

    def __post_init__(self) -> None:
        if min(self.samples, self.candidates, self.interval) < 1:
            raise ValueError("oracle: samples, candidates and interval must be >= 1")
        if self.rollout < self.interval:
            raise ValueError("oracle: the rollout must be at least the interval long")
        if self.temperature <= 0 or self.rollout_temperature < 0:
            raise ValueError("oracle: temperatures must be > 0 (samples) and >= 0 (rollouts)")


@dataclass(frozen=True)
class TrueReward:
    """The oracle's guide: mu^T r~ from the evaluation's own reward specs and scale."""

    specs: tuple[str, ...]
    """Reward spec per objective (objectives.rewards)."""
    scale: RewardScale
    """The store's fixed scale r~ (identity for a store without one)."""

    def scalarised(self, mu, prompts: list[str], responses: list[str]) -> np.ndarray:
        """(len(responses),) mu^T r~; an objective with weight 0 is not scored at all."""
        total = np.zeros(len(responses))
        for j, spec in enumerate(self.specs):
            if mu[j] != 0:
                raw = get_reward(spec)(prompts, responses)
                total += mu[j] * np.asarray(self.scale.apply(j, raw))
        return total


@dataclass
class OracleAnswer:
    """One prompt's answer and what it cost."""

    tokens: list[int]
    text: str
    score: float
    """Its mu^T r~ as the oracle scored it."""
    forwards: int = 0
    """Model rows forwarded for this prompt (prefill: one per sequence; decode: one per step)."""
    positions: int = 0
    """Token positions those forwards ran (prompts included)."""
    candidates: list[tuple[str, float]] = field(default_factory=list)
    """oracle-bok: every candidate's text and mu^T r~ (the greedy answer first)."""
    choices: list[int] = field(default_factory=list)
    """oracle-cd: per decision, the rank under the policy of the token it kept (0: greedy's)."""

    def record(self) -> dict:
        """The extra fields of its generations.jsonl line."""
        out = {"score": round(self.score, 5), "forwards": self.forwards}
        out["positions"] = self.positions
        if self.candidates:
            out["candidates"] = [[text, round(score, 5)] for text, score in self.candidates]
        if self.choices:
            out["choices"] = self.choices
        return out


def _cost(prompt: list[int], events: list[TokenEvent]) -> tuple[int, int]:
    """(forwards, positions) of one request: its prefill and each decode step."""
    return len(events), len(prompt) + max(len(events) - 1, 0)


def best_of_k(
    store: LoadedStore,
    plan: DecodePlan,
    prompts: list[list[int]],
    texts: list[str],
    mu,
    reward: TrueReward,
    settings: OracleSettings,
    max_new_tokens: int,
) -> list[OracleAnswer]:
    """Per prompt, the best by mu^T r~ of its greedy answer and K - 1 samples."""
    k = settings.samples
    sampling = [SamplingParams()] + [
        SamplingParams(temperature=settings.temperature, seed=settings.seed + s)
        for s in range(1, k)
    ]
    repeated = [prompt for prompt in prompts for _ in range(k)]
    found = run_plan(store, plan, repeated, max_new_tokens, sampling=sampling * len(prompts))
    tokens = [[event.id for event in events] for events in found]
    responses = [decode(store, ids) for ids in tokens]
    scores = reward.scalarised(mu, [t for t in texts for _ in range(k)], responses)
    answers = []
    for i, prompt in enumerate(prompts):
        own = range(i * k, (i + 1) * k)
        best = max(own, key=lambda c: scores[c])  # ties: the first, so the greedy answer
        costs = [_cost(prompt, found[c]) for c in own]
        answers.append(
            OracleAnswer(
                tokens[best],
                responses[best],
                float(scores[best]),
                forwards=sum(f for f, _ in costs),
                positions=sum(p for _, p in costs),
                candidates=[(responses[c], float(scores[c])) for c in own],
            )
        )
    return answers


@dataclass
class _Decoding:
    """One prompt's state in controlled decoding."""

    prompt: list[int]
    text: str
    tops: list[int]
    """The policy's k most likely next tokens after the prefix, best first."""
    prefix: list[int] = field(default_factory=list)
    done: bool = False
    score: float = 0.0
    forwards: int = 0
    positions: int = 0
    choices: list[int] = field(default_factory=list)


def _top_ids(event: TokenEvent) -> list[int]:
    return [top.id for top in event.top_tokens]


def controlled_decode(
    store: LoadedStore,
    plan: DecodePlan,
    prompts: list[list[int]],
    texts: list[str],
    mu,
    reward: TrueReward,
    settings: OracleSettings,
    max_new_tokens: int,
) -> list[OracleAnswer]:
    """Token-level controlled decoding with the true reward (see the module docstring); all
    prompts' candidate rollouts run in one engine batch per decision."""
    k, eos = settings.candidates, store.eos_ids
    first = run_plan(store, plan, prompts, 1, sampling=[SamplingParams(top_n=k)] * len(prompts))
    states = [
        _Decoding(prompt, text, _top_ids(events[0]), forwards=1, positions=len(prompt))
        for prompt, text, events in zip(prompts, texts, first, strict=True)
    ]
    decision = 0
    while active := [s for s in states if not s.done]:
        jobs = [(s, rank, token) for s in active for rank, token in enumerate(s.tops)]
        rollouts = _roll_out(store, plan, jobs, settings, max_new_tokens, decision)
        bodies = [
            s.prefix + [token] + ([e.id for e in events] if events else [])
            for (s, _, token), events in zip(jobs, rollouts, strict=True)
        ]
        responses = [decode(store, body) for body in bodies]
        scores = reward.scalarised(mu, [s.text for s, _, _ in jobs], responses)
        for j, (s, _, token) in enumerate(jobs):
            if rollouts[j] is not None:
                forwards, positions = _cost(s.prefix + [token], rollouts[j])
                s.forwards, s.positions = s.forwards + forwards, s.positions + positions
        for s in active:
            own = [j for j, job in enumerate(jobs) if job[0] is s]
            best = max(own, key=lambda j: scores[j])  # ties: the policy's likelier token
            _commit(s, jobs[best][1], jobs[best][2], rollouts[best], settings, max_new_tokens, eos)
            s.score = float(scores[best])
        decision += 1
    return [
        OracleAnswer(
            s.prefix,
            decode(store, s.prefix),
            s.score,
            forwards=s.forwards,
            positions=s.positions,
            choices=s.choices,
        )
        for s in states
    ]


def _roll_out(store, plan, jobs, settings, max_new_tokens, decision):
    """Per job (state, rank, token), the events of its rollout after the token, or None
    where there is none (the token ends the answer, or the budget is spent)."""
    asked, limits, sampling, where = [], [], [], []
    for j, (s, rank, token) in enumerate(jobs):
        length = min(settings.rollout, max_new_tokens - len(s.prefix) - 1)
        if length < 1 or token in store.eos_ids:
            continue
        temperature = settings.rollout_temperature or None
        seed = settings.seed + 7919 * decision + rank
        sampling.append(
            SamplingParams(temperature=temperature, seed=seed, top_n=settings.candidates)
        )
        asked.append(s.prompt + s.prefix + [token])
        limits.append(length)
        where.append(j)
    out: list[list[TokenEvent] | None] = [None] * len(jobs)
    if asked:
        for j, events in zip(
            where, run_plan(store, plan, asked, limits, sampling=sampling), strict=True
        ):
            out[j] = events
    return out


def _commit(s: _Decoding, rank, token, events, settings, max_new_tokens, eos) -> None:
    """Keep the chosen token and its rollout's first interval - 1 tokens; the next
    decision's candidates are the policy's top tokens after them."""
    s.choices.append(rank)
    room = min(settings.interval, max_new_tokens - len(s.prefix))
    kept = [token] + [e.id for e in (events or [])[: room - 1]]
    for n, t in enumerate(kept):
        if t in eos:
            kept, s.done = kept[: n + 1], True
            break
    s.prefix += kept
    if len(s.prefix) >= max_new_tokens:
        s.done = True
    if not s.done:
        s.tops = _top_ids(events[len(kept) - 1])


ORACLES = {"best-of-k": best_of_k, "controlled": controlled_decode}
"""EvalMethod.oracle -> how it decodes."""


def oracle_responses(
    store: LoadedStore,
    method: str,
    mu,
    prompts: list[list[int]],
    texts: list[str],
    reward: TrueReward,
    settings: OracleSettings,
    max_new_tokens: int,
) -> list[OracleAnswer]:
    """The answers of oracle `method` (a key of METHODS with an `oracle`) at preference mu,
    on its policy's plan (Bone Soup, Eq. 13, at the store's alpha)."""
    spec = METHODS[method]
    decoding_store = method_store(store, method)
    mu_tensor = torch.tensor(mu, dtype=torch.float64)
    plan = build_plan(decoding_store, spec.mode, mu_tensor, spec.merge, policy=spec.policy)
    run = ORACLES[spec.oracle]
    return run(decoding_store, plan, prompts, texts, mu, reward, settings, max_new_tokens)
