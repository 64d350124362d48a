"""Token choice for a whole batch at once, applied after guidance (Eq. 25).

Every row has its own settings: a repetition penalty on the tokens its sequence already holds
(greedy rows too, as in transformers); then greedy rows take the argmax, and sampled rows get
their own temperature, top-k, top-p and typical-p (transformers' warper semantics and order,
vectorised over rows) and draw with their request's own generator, so a seeded request gives
the same tokens whatever else is in the batch. The chosen ids, their log-probabilities, a
finiteness flag and each row's top-n alternatives come back to the host in one transfer per
step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from guidance.requests import SamplingParams


@dataclass(frozen=True)
class Pick:
    """The token chosen for one row."""

    token: int
    logprob: float
    """log-probability under the guided distribution softmax(log pi + gamma V), after the
    repetition penalty, before temperature and filtering."""
    finite: bool
    """False when the row's guided scores held a NaN or an infinity: nothing is emitted."""
    top: tuple[tuple[int, float], ...] = ()
    """The row's `top_n` most likely tokens as (id, logprob), best first (same distribution
    as `logprob`); empty unless asked."""


def penalise_repeats(
    scores: torch.Tensor, params: list[SamplingParams], seen: list[torch.Tensor | None]
) -> torch.Tensor:
    """transformers' repetition penalty per row: a token the row's sequence (prompt and
    generated) already holds has its score divided by the penalty if positive, multiplied if
    negative. `seen[i]` is row i's (vocab,) bool mask, None where its penalty is 1."""
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if not rows:
        return scores
    index = torch.tensor(rows, device=scores.device)
    penalty = torch.tensor([params[i].repetition_penalty for i in rows], device=scores.device)
    mask = torch.stack([seen[i] for i in rows])  # (rows, vocab); None here is a caller bug
    picked = scores[index]
    penalised = torch.where(picked < 0, picked * penalty[:, None], picked / penalty[:, None])
    scores = scores.clone()
    scores[index] = torch.where(mask, penalised, picked)
    return scores


def _typical(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """transformers' TypicalLogitsWarper with a mass per row (rows at mass 1 are untouched)."""
    normalized = torch.log_softmax(scores, dim=-1)
    entropy = -(normalized * normalized.exp()).nansum(-1, keepdim=True)
    shifted, order = (-normalized - entropy).abs().sort(dim=-1)
    cumulative = scores.gather(-1, order).softmax(-1).cumsum(-1)
    last = (cumulative < mass[:, None]).sum(1).clamp(max=scores.shape[-1] - 1)
    drop = shifted > shifted.gather(1, last[:, None])
    drop[:, :1] = False  # the most typical token always stays
    filtered = scores.masked_fill(drop.scatter(1, order, drop), -torch.inf)
    return torch.where((mass < 1.0)[:, None], filtered, scores)


def warp(logprobs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, then typical-p, per row: (rows, vocab) ->
    (rows, vocab), with filtered tokens at -inf (the order and rules of transformers' logits
    warpers)."""
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
        drop[:, 0] = False  # also when top_p underflows to 0 in float32 (5e-324 is "> 0")
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -torch.inf)
    typical = [p.typical_p if p.typical_p is not None else 1.0 for p in params]
    if min(typical) < 1.0:
        scores = _typical(scores, torch.tensor(typical, device=device))
    return scores


def choose_tokens(
    scores: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    seen: list[torch.Tensor | None] | None = None,
    allowed: torch.Tensor | None = None,
) -> list[Pick]:
    """One token per row of guided scores (rows, vocab). `seen`: per row, the (vocab,) bool
    mask of its sequence's tokens, for rows with a repetition penalty. `allowed`: (rows,
    vocab) bool, the tokens a row's grammar permits (guidance.constrain), or None: every
    token; the constrained distribution is renormalised over them, so `logprob` and `top`
    report it (as vLLM does), and forbidden tokens are never alternatives."""
    scores = penalise_repeats(scores.float(), params, seen or [None] * len(params))
    finite = torch.isfinite(scores).all(-1)  # of the guided scores, before the grammar's -inf
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -torch.inf)
    logprobs = torch.log_softmax(scores, dim=-1)
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
    columns = [tokens.double()[:, None], chosen.double()[:, None], finite.double()[:, None]]
    top_n = min(max(p.top_n for p in params), scores.shape[1])
    if top_n:
        best = logprobs.topk(top_n, dim=-1)
        columns += [best.indices.double(), best.values.double()]
    packed = torch.cat(columns, 1).tolist()  # the step's one transfer to the host
    return [_pick(row, p.top_n, top_n) for row, p in zip(packed, params, strict=True)]


def _pick(row: list[float], wanted: int, width: int) -> Pick:
    ids, values = row[3 : 3 + width], row[3 + width :]
    pairs = zip(ids[:wanted], values[:wanted], strict=True)
    top = tuple((int(t), float(v)) for t, v in pairs if v > -math.inf)  # grammar-forbidden
    return Pick(int(row[0]), float(row[1]), bool(row[2]), top)
