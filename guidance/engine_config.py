"""The limits of one engine and its metrics hooks.

They live apart from guidance.engine so that the parts the engine is built from
(guidance.admission, guidance.emission) can read them without importing the engine itself:
the import graph stays a tree. guidance.engine re-exports both names.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


class EngineObserver:
    """Hooks for metrics; the default does nothing."""

    def queued(self, size: int) -> None: ...
    def admitted(self, queue_seconds: float, running: int) -> None: ...
    def token(self, seconds_since_last: float, first: bool) -> None: ...
    def finished(self, outcome: str, seconds: float, generated: int, running: int) -> None: ...
    def merge(self, seconds: float) -> None: ...
    def cache_event(self, event: str) -> None: ...
    def prefix_lookup(self, prompt_tokens: int, cached_tokens: int) -> None: ...
    def prefix_evicted(self, blocks: int) -> None: ...


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one engine."""

    max_queue: int = 64
    """Requests waiting beyond the running ones; past max_queue + max_running, 429."""
    max_running: int = 16
    """Requests prefilling or decoding at once (one batch)."""
    kv_budget_tokens: int | None = None
    """KV token-rows the batch may hold (rows x longest prompt + max_new_tokens, since the
    batch is padded to its longest sequence); None: unbounded."""
    prefill_tokens: int | None = 512
    """Prompt token-rows prefilled per step, so a long prompt cannot stall running streams
    (chunked prefill); None: a whole group at once (offline use)."""
    cache_budget_bytes: int = 256 << 20
    """Byte budget of the per-preference merge cache."""
    stall_timeout_s: float = 120.0
    """With work waiting, no completed loop for this long makes `health()` report a stall."""
    prefix_cache_bytes: int = 0
    """Byte budget of the prefix cache (guidance.prefix_cache), on the model's device; 0:
    off (offline use computes every prompt afresh)."""
    prefix_block_tokens: int = 16
    """Tokens per prefix-cache block: prompts are reused in whole blocks."""
    clock: Callable[[], float] = time.monotonic
    """The time deadlines, submissions and token latencies are read in (`deadline` of a
    request is in its units); tests step an explicit clock. Health and memory trimming keep
    real time."""
