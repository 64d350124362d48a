"""Guidance combination (Eq. 25) and token choice, applied after guidance."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from guidance.requests import SamplingParams


def guided_scores(
    policy_logprobs: torch.Tensor, guidance: torch.Tensor | None, gamma: float
) -> torch.Tensor:
    """log pi_policy + gamma * V (Eq. 25, in log space); (vocab,) -> (vocab,).

    For implicit guidance V = log(pi*/pi_ref) (Eq. 23 and the equation after Eq. 25).
    """
    if guidance is None:
        return policy_logprobs
    return policy_logprobs + gamma * guidance


def build_warpers(params: SamplingParams) -> LogitsProcessorList:
    """transformers' own warpers, so temperature/top-k/top-p behave as in `generate`."""
    warpers = LogitsProcessorList()
    if params.greedy:
        return warpers
    warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p is not None and params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return warpers


def choose_token(
    scores: torch.Tensor,
    params: SamplingParams,
    warpers: LogitsProcessorList,
    generator: torch.Generator | None,
    input_ids: torch.Tensor,
) -> tuple[int, float]:
    """Pick the next token from guided scores (vocab,); returns (id, logprob).

    The logprob is the token's log-probability under the guided distribution
    softmax(log pi + gamma V), before temperature and filtering.
    """
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    if params.greedy:
        token = int(torch.argmax(logprobs))
    else:
        warped = warpers(input_ids[None, :], logprobs[None, :].clone())[0]
        probs = torch.softmax(warped, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logprobs[token])
