"""Each backbone and specialist alone, greedy on the validation prompts: does backbone i lean
towards objective i? The demo build's check of its own adapters (`mage store build-demo`
hands it to training.demo.build_demo, since evaluation builds on training and not the
reverse). Decoding only (evaluation.methods), so it runs under the `train` extra alone,
without the metric and plotting dependencies."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evaluation.methods import generate_responses
from guidance.search import BeamSettings
from model_store.loader import load_store
from objectives.prompts import load_prompts
from objectives.rewards import get_reward
from objectives.scale import RewardScale
from training.common import encode_prompt

ALONE_METHODS = {"backbone": "direct", "specialist": "rewarded-soup"}
"""At a vertex e_i, `direct` (lambda = mu) decodes backbone i alone and `rewarded-soup`
(B = I) specialist i alone."""


def validation_means(
    store: Path, kinds: Sequence[str], limit: int | None, tokens: int, batch_size: int = 16
) -> dict[str, dict[str, float]]:
    """`<kind>-<objective>` -> mean r~ (raw r without a reward scale) of every objective, for
    each adapter of `kinds` ("backbone", "specialist") alone, on the first `limit`
    validation prompts, `tokens` new tokens each."""
    loaded = load_store(store)
    scale = RewardScale.from_manifest(loaded.checked.manifest)
    prompts = load_prompts("validation")[:limit]
    ids = [encode_prompt(loaded.tokenizer, p["prompt"]) for p in prompts]
    texts = [p["prompt"] for p in prompts]
    n = loaded.n_objectives
    out: dict[str, dict[str, float]] = {}
    for kind in kinds:
        method = ALONE_METHODS[kind]
        for i, objective in enumerate(loaded.objectives):
            vertex = tuple(float(i == j) for j in range(n))
            found = generate_responses(
                loaded,
                method,
                vertex,
                ids,
                batch_size,
                max_new_tokens=tokens,
                gamma=1.0,  # Stage 1 methods: no guidance to scale
                eos_ids=loaded.eos_ids,
                beam=BeamSettings(),  # unused: greedy
            )
            responses = [text for text, _ in found]
            raw = [get_reward(o)(texts, responses) for o in loaded.objectives]
            out[f"{kind}-{objective}"] = {
                o: round(float(np.mean(scale.apply(j, raw[j]) if scale else raw[j])), 4)
                for j, o in enumerate(loaded.objectives)
            }
    return out
