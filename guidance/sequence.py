"""The decode state of one admitted request, and the details it reports when it ends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from guidance.constrain import Constraint
from guidance.detokenize import IncrementalDetokenizer
from guidance.plan import DecodePlan
from guidance.requests import GenerationRequest, RequestHandle, SamplingParams

TokenText = Callable[[int], tuple[str, bool]]
"""A token's text on its own, and whether it is special."""


@dataclass(eq=False)
class Sequence:
    """Decode state of one admitted request (a member of a Batch)."""

    handle: RequestHandle
    plan: DecodePlan
    """Rows and weights for this request's preference and mode (shared via the cache)."""
    cache_hit: bool
    """Whether the plan came from the merge cache (reported in details)."""
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    """The request's own RNG when sampling."""
    seed: int | None
    ids: list[int]
    """Prompt then generated token ids."""
    generated: int = 0
    last_token_at: float = 0.0
    finished: bool = False
    seen: torch.Tensor | None = None
    """(vocab,) bool on the device: tokens in `ids`, for a repetition penalty; else None."""
    prefill_logprobs: list[torch.Tensor] | None = None
    """Prompt-token log-probabilities, chunk by chunk (guidance.batch), when asked; else None."""
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (guidance.prefix_cache)."""
    constraint: Constraint | None = None
    """Where the sequence stands in its request's grammar (structured output); else None."""
    plans: list[tuple[int, DecodePlan]] = field(default_factory=list)
    """Every plan this request decoded under, each with the index of the first generated
    token it chose: one entry, unless its preference changed while it ran
    (guidance.steering). Set from `plan` on creation."""

    def __post_init__(self) -> None:
        self.plans = [(0, self.plan)]

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def gamma(self) -> float:
        return self.request.gamma

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def kv_rows(self) -> int:
        """Rows this sequence adds to the lanes: its plan's rows and standalone models."""
        return self.plan.rows + sum(source.model is not None for source in self.plan.values)

    def details(self, reason: str, token_text: TokenText) -> dict:
        """What the last event reports: why it ended, counts, seed, the preference, lambda
        and guidance used, and the prompt tokens' log-probabilities when asked."""
        plan = self.plan
        details = {
            "finish_reason": reason,
            "prompt_tokens": len(self.request.prompt_ids),
            "generated_tokens": self.generated,
            "seed": self.seed,
            "preference": _listed(plan.preference),
            "lambda": _listed(plan.lambdas),
            "preferences": [
                {"from_token": k, "preference": _listed(p.preference), "lambda": _listed(p.lambdas)}
                for k, p in self.plans
            ],
            "guidance": {"mode": plan.mode, "gamma": self.request.gamma},
            "merge_cache_hit": self.cache_hit,
            "cached_tokens": self.cached_tokens,
        }
        if self.prefill_logprobs is not None:
            details["prefill"] = self.prefill(token_text)
        return details

    def prefill(self, token_text: TokenText) -> list[dict]:
        """The prompt tokens with log pi given their prefix (the first has none); reads the
        device once."""
        chunks = self.prefill_logprobs or []
        logprobs = [None, *(torch.cat(chunks).tolist() if chunks else [])]
        return [
            {"id": token, "text": token_text(token)[0], "logprob": logprob}
            for token, logprob in zip(self.request.prompt_ids, logprobs, strict=True)
        ]


def _listed(values: torch.Tensor) -> list[float]:
    # + 0.0 turns -0.0 (a zero weight times a negative) into 0.0 for the client
    return [round(float(v), 6) + 0.0 for v in values]
