"""Offline decoding for evaluation and tuning, on the serving engine's own batched step.

`greedy_generate` submits one request per prompt to an engine (no thread) and steps it to
completion: evaluation decodes exactly as the server does. `beam_lookahead` is Sec. 5.6.2's
guided chunk-level beam search; it drives a `Batch` directly, because its beams fork and
die between chunks (`Batch.keep` with repeats).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guidance.batch import Batch
from guidance.engine import Engine, EngineConfig
from guidance.plan import DecodePlan
from guidance.requests import ErrorEvent, GenerationRequest, SamplingParams, TokenEvent
from guidance.sampling import warp
from model_store.loader import LoadedStore


def greedy_generate(
    store: LoadedStore,
    plan: DecodePlan,
    prompts: list[list[int]],
    max_new_tokens: int,
    gamma: float,
    ignore_eos: bool = False,
) -> list[list[int]]:
    """Greedy guided decoding of every prompt under one plan, all in one batch; token ids
    per prompt (an EOS ends a sequence and is included)."""
    found = run_plan(store, plan, prompts, max_new_tokens, gamma, ignore_eos=ignore_eos)
    return [[event.id for event in events] for events in found]


def run_plan(
    store: LoadedStore,
    plan: DecodePlan,
    prompts: list[list[int]],
    max_new_tokens: int | list[int],
    gamma: float = 1.0,
    sampling: list[SamplingParams] | None = None,
    ignore_eos: bool = False,
) -> list[list[TokenEvent]]:
    """Every prompt decoded under one plan through the engine's step, all in one batch; the
    token events per prompt. `max_new_tokens` and `sampling` (default greedy) may differ per
    prompt (the oracles of evaluation.oracle sample, ask for top-n alternatives, and roll
    out continuations of different lengths)."""
    config = EngineConfig(max_queue=0, max_running=len(prompts), prefill_tokens=None)
    engine = Engine(store, config)
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    requests = [
        GenerationRequest(
            f"offline-{i}",
            tuple(prompt),
            plan.preference,
            plan.mode,
            gamma,
            sampling[i] if sampling is not None else SamplingParams(),
            limits[i],
            ignore_eos=ignore_eos,
            plan=plan,
        )
        for i, prompt in enumerate(prompts)
    ]
    generated = []
    for events in engine.run_all(requests):
        if isinstance(events[-1], ErrorEvent):
            raise RuntimeError(f"offline generation failed: {events[-1].message}")
        generated.append(events)
    return generated


@dataclass(frozen=True)
class BeamSettings:
    """Guided beam lookahead of Sec. 5.6.2 ("MAGE-I-M-b4c1l10"); chunks are sampled with the
    decoding parameters of Sec. 5.2.2: temperature 1.0, top-k 50, nucleus top-p 0.9."""

    width: int = 4
    """b: beams kept after each chunk."""
    expansion: int = 1
    """c: continuations sampled from each kept beam."""
    interval: int = 10
    """l: tokens per chunk between two selections."""
    seed: int = 0
    """Seed of the chunk sampling."""
    temperature: float = 1.0
    """Temperature of the chunk sampling (Sec. 5.2.2: 1.0)."""
    top_k: int | None = 50
    """Top-k filter of the chunk sampling (Sec. 5.2.2: 50; None: off)."""
    top_p: float | None = 0.9
    """Nucleus threshold of the chunk sampling (Sec. 5.2.2: 0.9; None: off)."""

    @property
    def name(self) -> str:
        """The paper's label of this configuration, e.g. "b4c1l10" (Table 4)."""
        return f"b{self.width}c{self.expansion}l{self.interval}"


PAPER_BEAMS: dict[str, BeamSettings] = {
    s.name: s
    for s in (
        BeamSettings(2, 1, 5),
        BeamSettings(2, 2, 5),
        BeamSettings(2, 1, 10),
        BeamSettings(2, 2, 10),
        BeamSettings(4, 1, 10),
    )
}
"""The configurations of the paper's Table 4, by label."""


@dataclass(frozen=True)
class _Beam:
    plan: DecodePlan
    gamma: float


def beam_lookahead(
    store: LoadedStore,
    plan: DecodePlan,
    prompts: list[list[int]],
    max_new_tokens: int,
    gamma: float,
    eos_ids: set[int],
    settings: BeamSettings,
) -> list[tuple[list[int], float]]:
    """Chunk-level beam search for several prompts in one batch: every beam samples
    `expansion` continuations of `interval` tokens from the guided distribution
    softmax(log pi + gamma V) (Eq. 25), warped by the settings' temperature, top-k and top-p
    (transformers' rules, as the server samples); per prompt, the `width` best-scoring candidates
    survive each chunk. A beam's score is its summed log pi*/pi_ref under implicit guidance
    (the implicit reward of Eq. 23, as in weak-to-strong search), its latest value under
    explicit guidance (Eq. 16 trains V to predict the final reward), its summed
    beta log pi_r over `arm` value models (their reward is that sum), else its log pi.
    Returns per prompt its best beam and that beam's score."""
    b, c = settings.width, settings.expansion
    group = b * c  # candidates per prompt; beam i belongs to prompt i // group
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    batch = Batch(store)
    batch.start([_Beam(plan, gamma) for _ in prompts], prompts)
    first = batch.prefill(batch.prefill_left)
    start = [p for p in range(len(prompts)) for _ in range(group)]
    policy, value = (part[start] for part in batch.parts(first))
    batch.keep(start)
    beams: list[list[int]] = [[] for _ in start]
    scores, done = [0.0] * len(start), [False] * len(start)
    warping = [SamplingParams(settings.temperature, settings.top_k, settings.top_p)]
    replaces = bool(plan.values)
    by_value = bool(plan.values) or plan.reference_row is not None or bool(plan.arm_rows)

    def best_per_prompt() -> list[tuple[list[int], float]]:
        firsts = range(0, len(beams), group)
        best = [max(range(f, f + group), key=scores.__getitem__) for f in firsts]
        return [(beams[i], scores[i]) for i in best]

    while True:
        for _ in range(settings.interval):
            guided = torch.log_softmax((policy + gamma * value).float(), -1)
            probs = torch.softmax(warp(guided, warping * len(beams)), -1).cpu()  # (beams, vocab)
            drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
            scored = value if by_value else policy
            increments = scored.gather(1, drawn.to(scored.device)[:, None])[:, 0].tolist()
            tokens = drawn.tolist()
            for i, token in enumerate(tokens):
                if done[i]:
                    tokens[i] = beams[i][-1]
                    continue
                scores[i] = increments[i] if replaces else scores[i] + increments[i]
                beams[i].append(token)
                done[i] = token in eos_ids
            if all(done) or max(len(beam) for beam in beams) >= max_new_tokens:
                return best_per_prompt()
            policy, value = batch.parts(batch.decode(tokens))
        chosen = []
        for first_index in range(0, len(beams), group):
            members = range(first_index, first_index + group)
            keep = sorted(members, key=scores.__getitem__, reverse=True)[:b]
            chosen += [k for k in keep for _ in range(c)]
        batch.keep(chosen)
        beams = [list(beams[k]) for k in chosen]
        scores, done = [scores[k] for k in chosen], [done[k] for k in chosen]
        policy, value = policy[chosen], value[chosen]
