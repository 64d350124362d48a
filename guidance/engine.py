"""The engine thread: continuous batching of requests with mixed preferences.

Requests wait in a bounded queue; between steps they are admitted (plan from the merge
cache), prefilled in groups under a per-step token budget (chunked prefill), then join the
decoding batch. Every step decodes all running sequences in one forward of the shared base,
whatever their preference, guidance mode or merge method (guidance.batch); finished or
cancelled ones leave at once. The HTTP layer never touches a model: it submits requests and
receives events through the callback each RequestHandle carries.

Faults stay with the request that caused them: admission, planning and emission errors fail
that request; a failed shared prefill is retried one request at a time; a failed decode
forward fails the requests in it and the engine carries on. `health()` tells the probes
when the engine thread itself is gone or stuck.

The engine is the lifecycle, the queue and the step; the rules it applies live beside it:
admitting and grouping requests in guidance.admission, turning picks into events in
guidance.emission, a preference changed mid-request in guidance.steering, its limits and
metrics hooks in guidance.engine_config.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

import torch

from guidance.admission import DEADLINE_PASSED, Admission, abandonment
from guidance.batch import Batch
from guidance.constrain import allowed_tokens
from guidance.emission import Emitter
from guidance.engine_config import EngineConfig, EngineObserver
from guidance.kv import return_free_memory
from guidance.plan import DecodePlan, build_plan, round_preference
from guidance.plan_cache import MergeCache
from guidance.prefix_cache import PrefixCache
from guidance.requests import ErrorEvent, Event, GenerationRequest, RequestHandle, TokenEvent
from guidance.sampling import Pick, choose_tokens
from guidance.sequence import Sequence
from guidance.steering import apply_change
from model_store.loader import LoadedStore

__all__ = [
    "DEADLINE_PASSED",
    "Engine",
    "EngineConfig",
    "EngineObserver",
    "EngineUnavailableError",
    "QueueFullError",
]
log = logging.getLogger("mage.engine")
SWITCH_INTERVAL_S = 0.0005
"""GIL switch interval while an engine thread runs (see Engine.start)."""
TRIM_EVERY_S = 5.0
"""Under unbroken load, free host memory goes back to the OS at most this often: a trim took
2-21 ms (mean 8) in a load run on the demo store, so at most ~0.3% of the engine's time."""


class QueueFullError(Exception):
    """The server holds as many requests as it may; the caller should answer 429."""


class EngineUnavailableError(Exception):
    """The engine thread is gone or stuck; the caller should answer 503."""


def _done(events: list[Event]) -> bool:
    return bool(events) and (isinstance(events[-1], ErrorEvent) or events[-1].details is not None)


class Engine(Admission):
    """Runs generation for every request on one thread, all running requests per step."""

    def __init__(
        self,
        store: LoadedStore,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
    ):
        self.store, self.config = store, config or EngineConfig()
        # Emitting reads the metrics hooks and EOS set there (see the properties below).
        self.emitter = Emitter(store, self.config.clock, observer or EngineObserver(), self._finish)
        self.plans = MergeCache(self.config.cache_budget_bytes, on_event=self.observer.cache_event)
        self.prefix_cache = (
            PrefixCache(
                store,
                self.config.prefix_cache_bytes,
                self.config.prefix_block_tokens,
                on_evict=self.observer.prefix_evicted,
            )
            if self.config.prefix_cache_bytes > 0
            else None
        )
        # Per running sequence, the plan its KV is computed with (the prefix cache's key).
        self._kv_plans: weakref.WeakKeyDictionary[Sequence, DecodePlan] = (
            weakref.WeakKeyDictionary()
        )
        self.waiting: deque[RequestHandle] = deque()
        self.decoding = Batch(store)
        self.prefilling: Batch | None = None
        self._held: Sequence | None = None  # head of the queue, prepared, waiting for room
        self._retry: deque[Sequence] = deque()  # prefilled alone after a shared prefill failed
        self._accepted = 0  # waiting + held + running
        self._stepped = False  # a step ran since memory was last returned
        self._trimmed_at = time.monotonic()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="mage-engine", daemon=True)

    @property
    def observer(self) -> EngineObserver:
        """The metrics hooks; replaceable while the engine runs (tests wrap them)."""
        return self.emitter.observer

    @observer.setter
    def observer(self, observer: EngineObserver) -> None:
        self.emitter.observer = observer

    @property
    def eos_ids(self) -> set[int]:
        """Tokens that end a request (unless it ignores EOS); tests widen the set."""
        return self.emitter.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids: set[int]) -> None:
        self.emitter.eos_ids = ids

    # --- lifecycle and the HTTP side ------------------------------------------------------
    def start(self) -> None:
        # The engine thread shares the GIL with the HTTP event loop, and re-takes it after
        # every torch op; with Python's default 5 ms switch interval a busy event loop can
        # make each of those waits 5 ms. A shorter interval bounds them (process-wide).
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def queue_size(self) -> int:
        return len(self.waiting) + (self._held is not None) + len(self._retry)

    @property
    def running(self) -> int:
        """Requests prefilling or decoding, read from the batches themselves (the metrics
        read it at scrape time, from another thread: one read of each attribute)."""
        prefilling = self.prefilling
        members = self.decoding.members + (prefilling.members if prefilling is not None else [])
        return sum(not seq.finished for seq in members)

    def kv_bytes(self) -> int:
        """KV-cache bytes held by the decoding and prefilling batches."""
        batches = [self.decoding, self.prefilling]
        return sum(batch.nbytes() for batch in batches if batch is not None)

    def health(self) -> str | None:
        """None while the engine works; otherwise why it does not (for /health and /ready)."""
        if self._thread.ident is not None and not self._thread.is_alive():
            return "the engine thread has stopped"
        idle = time.monotonic() - self.heartbeat
        if self._thread.is_alive() and self._busy() and idle > self.config.stall_timeout_s:
            return f"the engine has completed no step for {idle:.0f} s"
        return None

    def submit(self, handle: RequestHandle, bounded: bool = True) -> None:
        """Queue a request; QueueFullError past max_queue + max_running accepted requests."""
        reason = self.health()
        if reason is not None:
            raise EngineUnavailableError(reason)
        capacity = self.config.max_queue + self.config.max_running
        with self._lock:
            if bounded and self._accepted >= capacity:
                raise QueueFullError(f"the server holds {capacity} requests, its limit")
            self._accepted += 1
            self.waiting.append(handle)
        self.observer.queued(self.queue_size)
        self._wake.set()

    def run_all(
        self, requests: list[GenerationRequest], on_event: Callable[[Event], None] | None = None
    ) -> list[list[Event]]:
        """Offline use (evaluation, benchmarks, tests), with the engine thread not started:
        submit every request, step until each has its last event; the events per request."""
        events: list[list[Event]] = [[] for _ in requests]
        for request, own in zip(requests, events, strict=True):

            def record(event: Event, own: list[Event] = own) -> None:
                own.append(event)
                if on_event is not None:
                    on_event(event)

            self.submit(RequestHandle(request, record, self.config.clock()), bounded=False)
        while not all(_done(own) for own in events) and self._busy():
            self.step()
        return events

    def run_to_completion(
        self, request: GenerationRequest, on_event: Callable[[Event], None] | None = None
    ) -> list[Event]:
        """One request, offline (see run_all)."""
        return self.run_all([request], on_event)[0]

    def _busy(self) -> bool:
        return bool(self.waiting or self._held or self._retry or self.prefilling or self.decoding)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = now = time.monotonic()
            busy = self._busy()
            # Freed KV buffers go back to the OS when the batch drains, and every few seconds
            # under unbroken load (see return_free_memory: otherwise RSS ratchets up).
            if self._stepped and (not busy or now - self._trimmed_at > TRIM_EVERY_S):
                self._stepped, self._trimmed_at = False, now
                return_free_memory()
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self._stepped = True
            try:
                self.step()
            except Exception as exc:  # a bug outside the per-request guards: fail, carry on
                log.exception("engine step failed")
                self._fail_all(f"engine step failed: {exc}")

    # --- the step: schedule -> forward -> guide -> constrain -> sample -> emit ---------------
    def step(self) -> None:
        """One step over every running sequence at once (nano-vllm's LLMEngine.step)."""
        self._schedule()
        ready = self._forward()  # [(batch, its forward's outputs)]: decoding, prefilled
        members = [seq for batch, _ in ready for seq in batch.members]
        if members:
            try:
                scores = torch.cat([batch.scores(out) for batch, out in ready])  # Eq. (25)
                allowed = allowed_tokens([s.constraint for s in members], scores)  # grammars
                picks = _sample(members, scores, allowed)
            except Exception:  # find the rows that break: only their requests fail
                log.exception("guidance or sampling failed; retrying request by request")
                self._pick_alone(ready)
            else:
                for seq, pick in zip(members, picks, strict=True):
                    self.emitter.emit(seq, pick)
        self._settle(prefilled=any(batch is self.prefilling for batch, _ in ready))

    def _pick_alone(self, ready: list[tuple[Batch, torch.Tensor]]) -> None:
        """Guide and sample each request's row on its own, after the batched pass failed: a
        request whose row breaks fails alone (a batch whose guided scores cannot be formed
        fails its own members)."""
        for batch, outputs in ready:
            try:
                scores = batch.scores(outputs)  # (members, vocab), Eq. (25)
            except Exception as exc:
                self._fail(batch.members, f"guidance failed: {exc}")
                continue
            for row, seq in enumerate(batch.members):
                try:
                    one = scores[row : row + 1]
                    (pick,) = _sample([seq], one, allowed_tokens([seq.constraint], one))
                except Exception as exc:
                    self._fail([seq], f"sampling failed: {exc}")
                else:
                    self.emitter.emit(seq, pick)

    def _schedule(self) -> None:
        """Drop abandoned requests, queued or running, then start the next prefill group if
        none is running."""
        self._expire_waiting()
        for batch in (self.decoding, self.prefilling):
            if batch is not None:
                for seq in batch.members:
                    self._check_abandoned(seq)
        self._settle(prefilled=False)
        self._change_preferences()
        if self.prefilling is None:
            self.prefilling = self._next_group()

    def _change_preferences(self) -> None:
        """Preferences changed while their requests run take effect from each one's next
        token (guidance.steering); the decoding batch rebuilds its layout if one changed.
        A request still prefilling keeps its change until it decodes, so a prompt's KV is
        computed under one preference (what the prefix cache stores it under)."""
        if any([self._change_preference(seq) for seq in self.decoding.members]):
            self.decoding.replanned()
        for seq in (self._held, *self._retry):  # not prefilled yet: no KV to keep
            if seq is not None:
                self._change_preference(seq)

    def _change_preference(self, seq: Sequence) -> bool:
        try:
            return apply_change(self.store, seq, lambda r, mu: self._plan_for(r, mu)[0])
        except Exception as exc:  # building its new plan failed: that request alone fails
            log.exception("preference change failed for %s", seq.request.request_id)
            message = f"preference change failed: {exc}"
            self._finish(seq, "error", ErrorEvent(message, "generation"))
            return False

    def _forward(self) -> list[tuple[Batch, torch.Tensor]]:
        """Decode every running sequence (one forward), and the prefill group's next chunk."""
        ready: list[tuple[Batch, torch.Tensor]] = []
        if self.decoding:
            tokens = [seq.ids[-1] for seq in self.decoding.members]
            try:
                ready.append((self.decoding, self.decoding.decode(tokens)))
            except Exception as exc:
                log.exception("decode forward failed")
                self._fail(self.decoding.members, f"batched forward failed: {exc}")
                self.decoding = Batch(self.store)
        group = self.prefilling
        if group is not None:
            budget = self.config.prefill_tokens
            width = group.prefill_left if budget is None else max(1, budget // group.rows)
            try:
                outputs = group.prefill(width)
            except Exception as exc:
                self._prefill_failed(group, exc)
            else:
                if outputs is not None:
                    ready.append((group, outputs))
                    self._store_prefixes(group, finished=False)
        return ready

    def _prefill_failed(self, group: Batch, exc: Exception) -> None:
        """Retry the members one by one, so only the request that breaks fails."""
        self.prefilling = None
        self._retry_alone([seq for seq in group.members if not seq.finished], "prefill", exc)

    def _retry_alone(self, members: list[Sequence], stage: str, exc: Exception) -> None:
        """Members of a group whose prefill `stage` failed start over one by one; a request
        that fails alone fails, the others are served."""
        names = ", ".join(seq.request.request_id for seq in members)
        log.exception("%s failed for %s", stage, names or "no running request")
        if len(members) == 1:
            self._fail(members, f"{stage} failed: {exc}")
        else:
            self._retry.extend(members)

    def _settle(self, prefilled: bool) -> None:
        """Finished sequences leave their batch; a prefilled group joins the decoding one."""
        for batch in (self.decoding, self.prefilling):
            if batch is not None and any(seq.finished for seq in batch.members):
                if batch is self.decoding:
                    self._store_prefixes(batch, finished=True)
                self._drop_finished(batch)
        group = self.prefilling
        if group is not None and (prefilled or not group):
            if group:
                self.decoding.extend(group)
            self.prefilling = None

    def _drop_finished(self, batch: Batch) -> None:
        """Free the finished members' KV. Should that fail: the rest of a prefilling group
        has generated nothing yet, so each of its requests prefills again on its own; a
        decoding batch's KV is no longer trusted, so its requests fail (as for a failed
        decode forward), and the engine goes on with an empty one."""
        alive = [seq for seq in batch.members if not seq.finished]
        try:
            batch.keep([i for i, seq in enumerate(batch.members) if not seq.finished])
        except Exception as exc:
            log.exception("freeing finished requests failed")
            if batch is self.prefilling:
                self.prefilling = None
                self._retry.extend(alive)
            else:
                self._fail(alive, f"batched KV bookkeeping failed: {exc}")
                self.decoding = Batch(self.store)

    # --- prefix cache (guidance.prefix_cache) and merge cache (guidance.plan_cache) ------------
    def _store_prefixes(self, batch: Batch, finished: bool) -> None:
        """Cache the KV of the prompts a group just prefilled, or of the finished requests
        (prompt and answer: a chat's next turn starts with them); a failure here costs
        reuse, never the requests."""
        if self.prefix_cache is None:
            return
        members = [i for i, seq in enumerate(batch.members) if seq.finished or not finished]
        try:
            self.prefix_cache.store(batch, members, self._kv_plans)
        except Exception:
            log.exception("storing KV in the prefix cache failed")

    def _plan_for(
        self, request: GenerationRequest, mu: torch.Tensor | None = None
    ) -> tuple[DecodePlan, bool]:
        """The plan of the request's mode and merge method for its preference (or `mu`, a
        preference changed while it runs), through the merge cache."""
        mu = round_preference(request.preference if mu is None else mu)
        key = (request.mode, request.merge_method, tuple(mu.tolist()))
        started = time.perf_counter()

        def build() -> tuple[DecodePlan, int]:
            plan = build_plan(self.store, request.mode, mu, request.merge_method)
            return plan, plan.nbytes()

        plan, hit = self.plans.get_or_build(key, build)
        self.observer.merge(time.perf_counter() - started)
        return plan, hit

    # --- finish (emitting is guidance.emission) ---------------------------------------------
    def _check_abandoned(self, seq: Sequence) -> None:
        if not seq.finished and (ended := abandonment(seq.handle, self.config.clock())):
            self._finish(seq, *ended)

    def _fail(self, members: list[Sequence], message: str) -> None:
        for seq in members:
            if not seq.finished:
                self._finish(seq, "error", ErrorEvent(message, "generation"))

    def _fail_all(self, message: str) -> None:
        """Fail every admitted request and start from empty batches (the queue is kept)."""
        members = self.decoding.members + (self.prefilling.members if self.prefilling else [])
        self._fail([*members, *self._retry], message)
        self.decoding, self.prefilling = Batch(self.store), None
        self._retry.clear()

    def _finish(self, seq: Sequence, outcome: str, event: TokenEvent | ErrorEvent | None) -> None:
        seq.finished = True
        self._finish_handle(seq.handle, outcome, event, seq.generated)

    def _finish_handle(
        self,
        handle: RequestHandle,
        outcome: str,
        event: TokenEvent | ErrorEvent | None,
        generated: int = 0,
    ) -> None:
        with self._lock:
            self._accepted -= 1
        if event is not None:
            try:
                handle.on_event(event)
            except Exception:  # the caller's callback broke: its request is over anyway
                log.exception("delivering the last event of %s failed", handle.request.request_id)
        if handle.settle():  # counted once, even if the HTTP layer gave up on it first
            elapsed = self.config.clock() - handle.submitted_at
            self.observer.finished(outcome, elapsed, generated, self.running)


def _sample(
    members: list[Sequence], scores: torch.Tensor, allowed: torch.Tensor | None
) -> list[Pick]:
    """Each member's token from its row of guided scores (members, vocab), with its own
    sampling parameters, RNG, seen-token mask and grammar mask."""
    generators, seen = [s.generator for s in members], [s.seen for s in members]
    return choose_tokens(scores, [s.sampling for s in members], generators, seen, allowed)
