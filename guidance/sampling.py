"""Token choice for a whole batch at once, applied after guidance (Eq. 25).

Every row has its own settings: greedy rows take the argmax; sampled rows get their own
temperature, top-k and top-p (transformers' warper semantics, vectorised over rows) and
draw with their request's own generator, so a seeded request gives the same tokens
whatever else is in the batch. The chosen ids, their log-probabilities and a finiteness flag
per row come back to the host in one transfer per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guidance.requests import SamplingParams


@dataclass(frozen=True)
class Pick:
    """The token chosen for one row."""

    token: int
    logprob: float
    """log-probability under the guided distribution softmax(log pi + gamma V), before
    temperature and filtering."""
    finite: bool
    """False when the row's guided scores held a NaN or an infinity: nothing is emitted."""


def warp(logprobs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, per row: (rows, vocab) -> (rows, vocab), with
    filtered tokens at -inf (the order and rules of transformers' logits warpers)."""
    device, vocab = logprobs.device, logprobs.shape[1]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    scores = logprobs / temperature[:, None]
    top_k = [min(p.top_k or vocab, vocab) for p in params]
    if min(top_k) < vocab:
        kth = scores.topk(max(top_k), dim=-1).values  # (rows, k_max), descending
        index = torch.tensor([k - 1 if k < vocab else 0 for k in top_k], device=device)
        threshold = kth.gather(1, index[:, None])
        threshold[torch.tensor([k >= vocab for k in top_k], device=device)] = -torch.inf
        scores = scores.masked_fill(scores < threshold, -torch.inf)
    top_p = [p.top_p if p.top_p is not None else 1.0 for p in params]
    if min(top_p) < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly better tokens
        # Keep the smallest set whose mass reaches top_p; the best token always stays.
        drop = before >= torch.tensor(top_p, device=device)[:, None]
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -torch.inf)
    return scores


def choose_tokens(
    scores: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[Pick]:
    """One token per row of guided scores (rows, vocab)."""
    logprobs = torch.log_softmax(scores.float(), dim=-1)
    tokens = logprobs.argmax(-1)  # greedy rows keep this
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=scores.device)
        probs = torch.softmax(warp(logprobs[rows], [params[i] for i in sampled]), -1)
        # Exponential race: argmax p / E with E ~ Exp(1) draws from p; each row's noise comes
        # from its request's generator, so other rows never change what it draws.
        noise = torch.empty_like(probs)
        for row, i in enumerate(sampled):
            noise[row].exponential_(generator=generators[i])
        tokens[rows] = (probs / noise).argmax(-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    finite = torch.isfinite(scores).all(-1)
    packed = torch.stack([tokens.double(), chosen.double(), finite.double()], 1).tolist()
    return [Pick(int(t), float(lp), bool(ok)) for t, lp, ok in packed]
