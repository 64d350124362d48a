"""Request bodies (TGI / LoRAX conventions) and their range checks with TGI-style messages."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error answered as {"error": message, "error_type": kind} with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class GuidanceParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: str | None = None
    """none | explicit | explicit-ensemble | implicit | implicit-ensemble."""
    gamma: float | None = None
    """Guidance scale gamma of Eq. (25)."""


class Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preference: list[float] | dict[str, float] | None = None
    """mu: weights in objective order, or {objective: weight}; normalised onto the simplex."""
    guidance: GuidanceParameters | None = None
    """Guidance mode and scale."""
    merge_method: Literal["bone-soup", "rewarded-soup", "direct"] = "bone-soup"
    """How backbone coefficients come from mu (bone-soup: lambda = B^-1 mu, Eq. 13)."""
    max_new_tokens: int | None = None
    """Tokens to generate at most."""
    do_sample: bool = False
    """Sample instead of greedy; implied by temperature, top_k or top_p."""
    temperature: float | None = None
    """Sampling temperature (> 0)."""
    top_k: int | None = None
    """Top-k filter (> 0)."""
    top_p: float | None = None
    """Nucleus filter, in (0, 1]."""
    seed: int | None = None
    """Seed for sampling."""
    stop: list[str] = Field(default_factory=list)
    """Stop sequences."""
    details: bool = True
    """Accepted for TGI compatibility; details are always returned."""


class Message(BaseModel):
    role: str
    content: str


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: str | None = None
    """Raw prompt text (no template applied)."""
    messages: list[Message] | None = None
    """Chat messages, rendered with the tokenizer's chat template."""
    parameters: Parameters = Field(default_factory=Parameters)
    """Generation parameters."""


def check_ranges(p: Parameters, max_new_tokens_limit: int, max_stop: int) -> None:
    """Range checks, with messages shaped like TGI's."""

    def fail(message: str) -> None:
        raise ApiError(422, message, "validation")

    if p.max_new_tokens is not None:
        if p.max_new_tokens <= 0:
            fail(f"`max_new_tokens` must be strictly positive. Given: {p.max_new_tokens}")
        if p.max_new_tokens > max_new_tokens_limit:
            fail(f"`max_new_tokens` must be <= {max_new_tokens_limit}. Given: {p.max_new_tokens}")
    if p.temperature is not None and not p.temperature > 0:
        fail(f"`temperature` must be strictly positive. Given: {p.temperature}")
    if p.top_k is not None and p.top_k <= 0:
        fail(f"`top_k` must be strictly positive. Given: {p.top_k}")
    if p.top_p is not None and not 0 < p.top_p <= 1:
        fail(f"`top_p` must be > 0.0 and <= 1.0. Given: {p.top_p}")
    if len(p.stop) > max_stop:
        fail(f"`stop` supports up to {max_stop} stop sequences. Given: {len(p.stop)}")
    if any(s == "" for s in p.stop):
        fail("`stop` sequences must not be empty")
    if p.guidance and p.guidance.gamma is not None:
        gamma = p.guidance.gamma
        if gamma != gamma or abs(gamma) == float("inf") or gamma < 0:
            fail(f"`gamma` must be finite and >= 0. Given: {gamma}")
