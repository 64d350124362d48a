"""Rewards-in-Context (RiC; Yang et al. 2024, "Rewards-in-Context: Multi-objective Alignment of
Foundation Models with Dynamic Preference Adjustment"): the prompt format and the map from a
preference mu to the rewards written into the prompt.

RiC conditions one policy on the rewards its response should reach: during training the prompt
carries the normalised rewards its response obtained, and at inference it carries the rewards
the user wants. Pure functions, shared by training (training/ric.py), evaluation and the server
(merge_method "ric"), so all three write exactly the same prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

TAG = "<rm{}_score>"
"""RiC's tag for objective i (1-based), as in its public code (`Instructions_n.score_splits`)."""


def reward_tags(scores: Sequence[float]) -> str:
    """' <rm1_score> 0.3 <rm2_score> -1.2': one tag and one one-decimal score per objective, in
    objective order (RiC rounds every normalised score to one decimal)."""
    if not scores:
        raise ValueError("RiC needs at least one score")
    parts = []
    for i, score in enumerate(scores, start=1):
        if not math.isfinite(score):
            raise ValueError(f"RiC score {i} is not finite: {score}")
        value = round(float(score), 1) + 0.0  # + 0.0 turns -0.0 into 0.0
        parts.append(f"{TAG.format(i)} {value:.1f}")
    return " " + " ".join(parts)


def ric_prompt(prompt: str, scores: Sequence[float]) -> str:
    """The user prompt with RiC's reward tags appended. RiC puts them after the query and
    before the assistant turn; with a chat template that is the end of the user message."""
    return prompt.rstrip() + reward_tags(scores)


def desired_rewards(
    preference: Sequence[float], low: Sequence[float], high: Sequence[float]
) -> list[float]:
    """RiC's preference-to-reward map (Yang et al. 2024, Sec. 4.3, "dynamic inference-time
    adjustment"): with N objectives, objective i is asked for

        r_i = high_i                                          if mu_i >= 1/N
        r_i = low_i + N * mu_i * (high_i - low_i)             otherwise,

    i.e. r_i = low_i + min(N mu_i, 1) (high_i - low_i), where low_i and high_i are the smallest
    and largest normalised rewards of objective i in RiC's training data. The public code's
    `map_rewards_from_preference(..., method='linf')` computes the same (it gives the argmax
    objective high_i outright; min(N mu_i, 1) = 1 there anyway). Scores are rounded to one
    decimal, as the prompt carries them."""
    n = len(preference)
    if n == 0 or len(low) != n or len(high) != n:
        raise ValueError(
            f"preference, low and high need one value per objective: {n}, {len(low)}, {len(high)}"
        )
    if any(not math.isfinite(w) or w < 0 for w in preference) or sum(preference) <= 0:
        raise ValueError(f"preference {list(preference)} must be >= 0 and not all zero")
    total = sum(preference)
    return [
        round(lo + min(n * w / total, 1.0) * (hi - lo), 1)
        for w, lo, hi in zip(preference, low, high, strict=True)
    ]


def preference_prompt(
    prompt: str, preference: Sequence[float], low: Sequence[float], high: Sequence[float]
) -> str:
    """The prompt a RiC policy answers for preference mu: desired_rewards in RiC's tags."""
    return ric_prompt(prompt, desired_rewards(preference, low, high))
