"""Admission: queued requests become sequences, grouped into the next prefill batch.

Between steps the engine takes requests from its queue in order: each is made ready to
decode (its plan from the merge cache, its RNG, detokenizer, grammar state and
repetition-penalty mask), then joins the next prefill group while the group fits the
per-step prefill budget (chunked prefill) and the KV budget of the whole batch. A request
that does not fit waits at the head of the queue (`_held`), so the order of arrival is
kept; one with a cached prompt prefix is prefilled in a group of its own, from that KV.

This is a mixin of guidance.engine.Engine rather than an object of its own because it reads
and updates the engine's scheduling state (the queue, `_held`, `_retry`, the decoding
batch) in place: that state stays in one object, where the step and its tests read it,
while the rules for admitting live here. Faults stay with their request: one that cannot
be planned or prepared fails alone, and a group whose batch cannot be built is retried one
request at a time.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque

import torch

from guidance.batch import Batch
from guidance.detokenize import IncrementalDetokenizer
from guidance.engine_config import EngineConfig, EngineObserver
from guidance.plan import DecodePlan
from guidance.prefix_cache import CachedPrefix, PrefixCache
from guidance.requests import ErrorEvent, GenerationRequest, RequestHandle
from guidance.sequence import Sequence
from model_store.loader import LoadedStore

log = logging.getLogger("mage.engine")
DEADLINE_PASSED = "request exceeded its deadline"


def abandonment(handle: RequestHandle, now: float) -> tuple[str, ErrorEvent | None] | None:
    """(outcome, final event) if the request was cancelled or passed its deadline, else
    None: the one rule for queued, admitted and running requests alike."""
    if handle.cancelled.is_set():
        return "cancelled", None
    deadline = handle.request.deadline
    if deadline is not None and now > deadline:
        return "timeout", ErrorEvent(DEADLINE_PASSED, "timeout")
    return None


class Admission:
    """The engine's admission rules (see the module docstring); guidance.engine.Engine
    provides the state below and `_finish`, `_finish_handle`, `_check_abandoned`,
    `_retry_alone`, `_plan_for`, `_change_preference` and `running`."""

    store: LoadedStore
    config: EngineConfig
    observer: EngineObserver
    prefix_cache: PrefixCache | None
    waiting: deque[RequestHandle]
    decoding: Batch
    _held: Sequence | None
    _retry: deque[Sequence]
    _kv_plans: weakref.WeakKeyDictionary[Sequence, DecodePlan]
    _lock: threading.Lock

    def _expire_waiting(self) -> None:
        """Finish queued requests that were cancelled or passed their deadline while waiting,
        so they leave the queue (and mage_queue_size, the autoscaler's signal) at once
        instead of when a slot frees up, and get their answer from the engine."""
        now = self.config.clock()
        with self._lock:
            expired = [(h, ended) for h in self.waiting if (ended := abandonment(h, now))]
            if not expired:
                return
            gone = {id(h) for h, _ in expired}
            self.waiting = deque(h for h in self.waiting if id(h) not in gone)
        for handle, (outcome, event) in expired:
            self._finish_handle(handle, outcome, event)

    def _next_group(self) -> Batch | None:
        """The next prefill batch: a request to retry alone first, else queued requests in
        order, while they fit; None when nothing is ready or nothing fits yet."""
        while self._retry:
            seq = self._retry.popleft()
            self._check_abandoned(seq)
            if not seq.finished:
                return self._open([seq])
        group: list[Sequence] = []
        while len(self.decoding) + len(group) < self.config.max_running:
            seq, self._held = self._held or self._prepare_next(), None
            if seq is None:
                break
            self._check_abandoned(seq)
            if seq.finished:
                continue
            if not self._fits(group, seq):
                if not group and not self.decoding:  # it could never fit: refuse it
                    self._finish(seq, "validation", self._too_big(seq))
                    continue
                self._held = seq
                break
            prefix = self._cached_prefix(seq)
            if prefix is not None:  # prefilled in a group of its own, from the cached KV
                if group:
                    self._held = seq
                    break
                return self._open([seq], prefix)
            group.append(seq)
        return self._open(group) if group else None

    def _too_big(self, seq: Sequence) -> ErrorEvent:
        message = (
            f"prompt tokens + max_new_tokens times the {seq.kv_rows} rows of mode "
            f"{seq.plan.mode!r} exceed the server's KV budget of "
            f"{self.config.kv_budget_tokens} tokens"
        )
        return ErrorEvent(message, "validation")

    def _open(self, group: list[Sequence], prefix: CachedPrefix | None = None) -> Batch | None:
        """The group's prefill batch; if building it fails, its requests start over one by
        one (the one that fails alone fails; one restored from the cache, without it)."""
        try:
            return self._start(group, prefix)
        except Exception as exc:
            if prefix is not None:
                log.exception("restoring a cached prefix failed; prefilling it afresh")
                self._retry.extend(group)
                return None
            self._retry_alone(group, "prefill", exc)
            return None

    def _cached_prefix(self, seq: Sequence) -> CachedPrefix | None:
        """The request's longest cached prefix (guidance.prefix_cache), unless it asks for
        every prompt token's log-probability (computed by the prefill only)."""
        if self.prefix_cache is None or seq.prefill_logprobs is not None:
            return None
        return self.prefix_cache.lookup(seq.plan, seq.request.prompt_ids)

    def _fits(self, group: list[Sequence], seq: Sequence) -> bool:
        """Whether `seq` may join `group`: the group's prompt rows stay within the prefill
        budget (a lone request always may), and the whole batch, padded to its longest
        sequence, within the KV budget."""
        members = [*group, seq]
        budget = self.config.prefill_tokens
        longest_prompt = max(len(s.request.prompt_ids) for s in members)
        if (
            group
            and budget is not None
            and sum(s.kv_rows for s in members) * longest_prompt > budget
        ):
            return False
        kv = self.config.kv_budget_tokens
        if kv is None:
            return True
        everyone = [*self.decoding.members, *members]
        longest = max(len(s.request.prompt_ids) + s.request.max_new_tokens for s in everyone)
        return sum(s.kv_rows for s in everyone) * longest <= kv

    def _start(self, group: list[Sequence], prefix: CachedPrefix | None = None) -> Batch:
        batch = Batch(self.store)
        cached = 0 if prefix is None else prefix.tokens
        batch.start(group, [list(seq.request.prompt_ids[cached:]) for seq in group], prefix)
        self._kv_plans.update((seq, seq.plan) for seq in group)
        now = self.config.clock()
        for seq in group:
            seq.cached_tokens = cached
            if self.prefix_cache is not None:
                self.observer.prefix_lookup(len(seq.request.prompt_ids), cached)
            seq.last_token_at = now
            self.observer.admitted(now - seq.handle.submitted_at, self.running + 1)
        return batch

    def _prepare_next(self) -> Sequence | None:
        """The next waiting request made ready to prefill, or None when none is left."""
        while True:
            with self._lock:
                if not self.waiting:
                    return None
                handle = self.waiting.popleft()
            try:
                seq = self._prepare(handle)
            except ValueError as exc:
                self._finish_handle(handle, "validation", ErrorEvent(str(exc), "validation"))
                continue
            except Exception as exc:  # any other fault stays with this request
                log.exception("admission failed for %s", handle.request.request_id)
                message = f"admission failed: {exc}"
                self._finish_handle(handle, "error", ErrorEvent(message, "generation"))
                continue
            if seq is not None:
                return seq

    def _prepare(self, handle: RequestHandle) -> Sequence | None:
        request = handle.request
        if ended := abandonment(handle, self.config.clock()):
            self._finish_handle(handle, *ended)
            return None
        plan, hit = (request.plan, False) if request.plan is not None else self._plan_for(request)
        seq = new_sequence(self.store, handle, plan, hit)
        self._change_preference(seq)  # changed while queued: decodes under it from the start
        return seq


def new_sequence(
    store: LoadedStore, handle: RequestHandle, plan: DecodePlan, cache_hit: bool
) -> Sequence:
    """The decode state of an admitted request: its own seeded RNG when it samples (a seed
    drawn here when it gives none, reported in details), its grammar's start state, and the
    mask of tokens seen so far when a repetition penalty applies."""
    request: GenerationRequest = handle.request
    seed, generator = request.sampling.seed, None
    if not request.sampling.greedy:
        seed = seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        generator = torch.Generator(device=store.device).manual_seed(seed)
    detok = IncrementalDetokenizer(store.tokenizer)
    seq = Sequence(handle, plan, cache_hit, detok, generator, seed, list(request.prompt_ids))
    seq.constraint = request.grammar.start() if request.grammar is not None else None
    if request.sampling.repetition_penalty != 1.0:
        vocab = store.model.get_output_embeddings().weight.shape[0]
        seq.seen = torch.zeros(vocab, dtype=torch.bool, device=store.device)
        seq.seen[torch.tensor(seq.ids, dtype=torch.long, device=store.device)] = True
    if request.prompt_logprobs:
        seq.prefill_logprobs = []
    return seq
