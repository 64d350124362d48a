"""What flows between the HTTP layer and the engine: frozen requests in, events out."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from guidance.constrain import Grammar
    from guidance.plan import DecodePlan


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings, applied after guidance."""

    temperature: float | None = None
    """None or 0 means greedy (the paper's choice)."""
    top_k: int | None = None
    """Keep the k best tokens when sampling."""
    top_p: float | None = None
    """Keep the smallest set of tokens with this much probability when sampling."""
    seed: int | None = None
    """Seed of the request's own random generator; None picks one."""
    repetition_penalty: float = 1.0
    """transformers' repetition penalty on every token already in the sequence (prompt and
    generated), greedy or not; 1 is none."""
    typical_p: float | None = None
    """Typical decoding mass (transformers' TypicalLogitsWarper) when sampling; None: off."""
    top_n: int = 0
    """Most likely alternatives reported with each generated token (TGI's top_n_tokens,
    OpenAI's top_logprobs); 0: none."""

    @property
    def greedy(self) -> bool:
        return not self.temperature


@dataclass(frozen=True)
class GenerationRequest:
    """One validated generation request."""

    request_id: str
    """Unique id, for logs."""
    prompt_ids: tuple[int, ...]
    """Tokenised prompt (chat template already applied)."""
    preference: torch.Tensor
    """mu on the simplex, float64 (n,)."""
    mode: str
    """Guidance mode (see model_store.manifest.GUIDANCE_MODES)."""
    gamma: float
    """Guidance scale of Eq. (25)."""
    sampling: SamplingParams
    """Sampling settings."""
    max_new_tokens: int
    """Generation limit."""
    stop: tuple[str, ...] = ()
    """Stop sequences; the output ends after the first one appears (kept in the text)."""
    deadline: float | None = None
    """time.monotonic() after which the request is abandoned."""
    merge_method: str = "bone-soup"
    """How the policy's backbone coefficients come from mu (merging.registry)."""
    ignore_eos: bool = False
    """Keep generating past EOS tokens (vLLM's `ignore_eos`; evaluation of fixed lengths)."""
    prompt_logprobs: bool = False
    """Report log pi of every prompt token given its prefix (TGI's decoder_input_details):
    the policy's distribution, unguided, as the prefill computes it."""
    grammar: Grammar | None = None
    """The compiled JSON schema or regex the output must follow (guidance.constrain;
    OpenAI's response_format, TGI's grammar); None: free text."""
    plan: DecodePlan | None = None
    """A prebuilt plan (evaluation's MOD, MAGE-I-M' and LMC variants); None builds the plan
    of (mode, preference, merge_method) through the merge cache."""


@dataclass(frozen=True)
class TopToken:
    """One alternative to a generated token (top_n)."""

    id: int
    text: str
    logprob: float
    special: bool


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; the last one also carries the final text and details."""

    id: int
    text: str
    logprob: float
    special: bool
    generated_text: str | None = None
    details: dict[str, Any] | None = None
    top_tokens: tuple[TopToken, ...] = ()
    """The `top_n` most likely tokens at this step, best first (empty unless asked)."""


@dataclass(frozen=True)
class ErrorEvent:
    """Generation failed or was abandoned; ends the stream."""

    message: str
    error_type: str


Event = TokenEvent | ErrorEvent


@dataclass
class RequestHandle:
    """The caller's side of a running request."""

    request: GenerationRequest
    on_event: Callable[[Event], None]
    submitted_at: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    counted: bool = True
    """Whether this request's outcome is a request of its own in the metrics (False for an
    OpenAI request's second and later choices: the HTTP request is counted once)."""
    _settled: bool = False
    _settle_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _new_preference: torch.Tensor | None = field(default=None, repr=False)
    """A preference sent while the request runs, not yet applied by the engine."""

    def change_preference(self, mu: torch.Tensor) -> None:
        """Ask the engine to decode from the next token on under mu (normalised, float64);
        the engine takes it at its next schedule step. A newer change replaces one not yet
        taken: only the latest preference matters."""
        with self._settle_lock:
            self._new_preference = mu

    def take_preference(self) -> torch.Tensor | None:
        """The preference change waiting for the engine (then none is), or None."""
        with self._settle_lock:
            mu, self._new_preference = self._new_preference, None
        return mu

    @property
    def ended(self) -> bool:
        """Finished, failed or cancelled: nothing more will be generated."""
        return self._settled or self.cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating at the next decode step and free the slot."""
        self.cancelled.set()

    def settle(self) -> bool:
        """True for the first caller only: whoever settles a request (the engine finishing
        it, or the HTTP layer giving up on it at its deadline) counts its one outcome."""
        with self._settle_lock:
            first, self._settled = not self._settled, True
        return first and self.counted
