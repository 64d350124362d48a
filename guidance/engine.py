"""The engine thread: owns the models, admits requests from a bounded queue, decodes.

The HTTP layer never touches a model: it submits GenerationRequests and receives events
through the callback each RequestHandle carries.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import LogitsProcessorList

from guidance.detokenize import IncrementalDetokenizer
from guidance.forward import KVState, forward_plan, guidance_term, policy_logprobs
from guidance.plan import DecodePlan, build_plan, round_preference
from guidance.requests import ErrorEvent, Event, GenerationRequest, RequestHandle, TokenEvent
from guidance.sampling import build_warpers, choose_token, guided_scores
from merging.cache import MergeCache
from model_store.loader import LoadedStore

log = logging.getLogger("mage.engine")


class QueueFullError(Exception):
    """The waiting queue is full; the caller should answer 429."""


class EngineObserver:
    """Hooks for metrics; the default does nothing."""

    def queued(self, size: int) -> None: ...
    def admitted(self, queue_seconds: float, running: int) -> None: ...
    def token(self, seconds_since_last: float, first: bool) -> None: ...
    def finished(self, outcome: str, seconds: float, generated: int, running: int) -> None: ...
    def merge(self, seconds: float) -> None: ...
    def cache_event(self, event: str) -> None: ...


@dataclass
class Sequence:
    """Decode state of one running request."""

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
    warpers: LogitsProcessorList
    """Temperature / top-k / top-p, applied after guidance."""
    kv: KVState = field(default_factory=KVState)
    generated: int = 0
    last_token_at: float = 0.0

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


class Engine:
    """Runs generation for every request on one thread."""

    def __init__(
        self,
        store: LoadedStore,
        max_queue: int = 64,
        max_running: int = 4,
        cache_budget_bytes: int = 256 << 20,
        observer: EngineObserver | None = None,
    ):
        self.store = store
        self.observer = observer or EngineObserver()
        self.waiting: queue.Queue[RequestHandle] = queue.Queue(maxsize=max_queue)
        self.max_running = max_running
        self.running: list[Sequence] = []
        self.plans = MergeCache(cache_budget_bytes, on_event=self.observer.cache_event)
        self.special_ids = set(store.tokenizer.all_special_ids)
        self.eos_ids = store.eos_ids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mage-engine", daemon=True)

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def queue_size(self) -> int:
        return self.waiting.qsize()

    def submit(self, handle: RequestHandle) -> None:
        try:
            self.waiting.put_nowait(handle)
        except queue.Full:
            raise QueueFullError(f"queue is full ({self.waiting.maxsize} waiting)") from None
        self.observer.queued(self.waiting.qsize())

    def run_to_completion(
        self, request: GenerationRequest, on_event: Callable[[Event], None] | None = None
    ) -> list[Event]:
        """Offline use (evaluation, benchmarks, tests), with the engine thread not started:
        submit one request and step until its last event; returns every event."""
        events: list[Event] = []

        def record(event: Event) -> None:
            events.append(event)
            if on_event is not None:
                on_event(event)

        self.submit(RequestHandle(request, record, time.monotonic()))
        while not events or (isinstance(events[-1], TokenEvent) and events[-1].details is None):
            self.step()
        return events

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.running:
                try:
                    self._admit(self.waiting.get(timeout=0.05))
                except queue.Empty:
                    continue
            self.step()

    # --- the decode step: schedule -> forward -> guide -> sample -> emit ---------------
    def step(self) -> None:
        self._schedule()
        for seq in list(self.running):
            if self._abandoned(seq):
                continue
            try:
                new_ids = torch.tensor(
                    seq.ids[-1:] if seq.generated else seq.ids, device=self.store.device
                )
                out = forward_plan(self.store, seq.plan, new_ids, seq.kv)  # forward
                scores = guided_scores(
                    policy_logprobs(seq.plan, out),  # guide
                    guidance_term(seq.plan, out),
                    seq.request.gamma,
                )
                token, logprob = choose_token(
                    scores,
                    seq.request.sampling,
                    seq.warpers,  # sample
                    seq.generator,
                    torch.tensor(seq.ids),
                )
                self._emit(seq, token, logprob)  # emit
            except Exception as exc:  # a failing request must not take the engine down
                log.exception("generation failed for %s", seq.request.request_id)
                self._finish(seq, "error", ErrorEvent(f"generation failed: {exc}", "generation"))

    def _schedule(self) -> None:
        while len(self.running) < self.max_running:
            try:
                self._admit(self.waiting.get_nowait())
            except queue.Empty:
                return

    def _admit(self, handle: RequestHandle) -> None:
        request = handle.request
        now = time.monotonic()
        if handle.cancelled.is_set():
            self.observer.finished("cancelled", now - handle.submitted_at, 0, len(self.running))
            return
        try:
            plan, hit = self._plan_for(request)
        except ValueError as exc:
            handle.on_event(ErrorEvent(str(exc), "validation"))
            self.observer.finished("error", now - handle.submitted_at, 0, len(self.running))
            return
        seed = request.sampling.seed
        generator = None
        if not request.sampling.greedy:
            seed = seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
            generator = torch.Generator(device=self.store.device).manual_seed(seed)
        seq = Sequence(
            handle,
            plan,
            hit,
            IncrementalDetokenizer(self.store.tokenizer),
            generator,
            seed,
            list(request.prompt_ids),
            last_token_at=now,
            warpers=build_warpers(request.sampling),
        )
        self.running.append(seq)
        self.observer.admitted(now - handle.submitted_at, len(self.running))

    def _plan_for(self, request: GenerationRequest) -> tuple[DecodePlan, bool]:
        mu = round_preference(request.preference)
        key = (request.mode, request.merge_method, tuple(mu.tolist()))
        started = time.perf_counter()

        def build() -> tuple[DecodePlan, int]:
            plan = build_plan(self.store, request.mode, mu, request.merge_method)
            return plan, plan.nbytes()

        plan, hit = self.plans.get_or_build(key, build)
        self.observer.merge(time.perf_counter() - started)
        return plan, hit

    def _abandoned(self, seq: Sequence) -> bool:
        request = seq.request
        if seq.handle.cancelled.is_set():
            self._finish(seq, "cancelled", None)
            return True
        if request.deadline is not None and time.monotonic() > request.deadline:
            self._finish(seq, "timeout", ErrorEvent("request exceeded its deadline", "timeout"))
            return True
        return False

    def _emit(self, seq: Sequence, token: int, logprob: float) -> None:
        now = time.monotonic()
        self.observer.token(now - seq.last_token_at, first=seq.generated == 0)
        seq.last_token_at = now
        seq.ids.append(token)
        seq.generated += 1
        special = token in self.special_ids
        text = (
            self.store.tokenizer.convert_ids_to_tokens(token) if special else seq.detok.push(token)
        )
        reason = self._finish_reason(seq, token, len(text))
        if reason is None:
            seq.handle.on_event(TokenEvent(token, text, logprob, special))
            return
        if not special:
            text += seq.detok.flush()
        details = self._details(seq, reason)
        event = TokenEvent(token, text, logprob, special, seq.detok.text, details)
        self._finish(seq, "success", event)

    def _finish_reason(self, seq: Sequence, token: int, new_chars: int) -> str | None:
        if token in self.eos_ids:
            return "eos_token"
        # Only text that includes the new characters can hold a stop sequence not seen before.
        longest = max((len(s) for s in seq.request.stop), default=0)
        tail = seq.detok.text[-(longest + new_chars) :] if new_chars else ""
        if any(stop in tail for stop in seq.request.stop):
            return "stop_sequence"
        if seq.generated >= seq.request.max_new_tokens:
            return "length"
        return None

    def _details(self, seq: Sequence, reason: str) -> dict:
        plan = seq.plan
        return {
            "finish_reason": reason,
            "prompt_tokens": len(seq.request.prompt_ids),
            "generated_tokens": seq.generated,
            "seed": seq.seed,
            "preference": [round(float(v), 6) for v in plan.preference],
            "lambda": [round(float(v), 6) for v in plan.lambdas],
            "guidance": {"mode": plan.mode, "gamma": seq.request.gamma},
            "merge_cache_hit": seq.cache_hit,
        }

    def _finish(self, seq: Sequence, outcome: str, event: TokenEvent | ErrorEvent | None) -> None:
        self.running.remove(seq)
        if event is not None:
            seq.handle.on_event(event)
        elapsed = time.monotonic() - seq.handle.submitted_at
        self.observer.finished(outcome, elapsed, seq.generated, len(self.running))
