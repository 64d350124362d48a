"""Between HTTP handlers and the engine: what the HTTP layer holds, and the relay of requests.

Handlers of every API (TGI, OpenAI) hand a prompt and options to the Gateway; it tokenises
off the event loop, submits to the engine's bounded queue, and relays each request's events
through an asyncio.Queue fed thread-safely, within the request's deadline, stopping when the
engine dies or stalls or the client goes away. The model itself only runs on the engine
thread.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from guidance.engine import Engine, EngineConfig, EngineUnavailableError, QueueFullError
from guidance.requests import ErrorEvent, Event, GenerationRequest, RequestHandle
from model_store.errors import StoreError
from model_store.loader import LoadedStore, load_store
from server.metrics import Metrics
from server.request_ids import LiveRequests, caller, request_id
from server.schemas import ApiError
from server.settings import ServerSettings
from server.translate import Options, Prompt, build_request

log = logging.getLogger("mage.server")
DEADLINE_GRACE_S = 0.5
"""How long past a request's deadline the HTTP layer waits for the engine's own timeout
event before answering 504 itself (an engine that stopped emitting cannot hold it)."""
NOT_READY_FAILED = "not ready: the model store failed to load (the server log says why)"
"""What clients see of a load failure: the reason names files, so it stays in the log."""
ERROR_STATUS = {"validation": 422, "timeout": 504, "generation": 500, "unavailable": 503}
"""HTTP status of an engine error event, by its error_type."""


def package_version() -> str:
    try:
        return version("mage-server")
    except PackageNotFoundError:
        return "0+unknown"


class ServingState:
    """What the HTTP layer holds: settings, metrics, and the engine once the store is up."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.store: LoadedStore | None = None
        self.engine: Engine | None = None
        self.load_failed = False
        """Set when the store could not be loaded; the reason went to the log only."""

    def start(self, store: LoadedStore) -> None:
        self.store = store
        self.engine = Engine(store, engine_config(self.settings, store), self.metrics)
        self.metrics.watch(self.engine)
        # The store's objects live as long as the process: move them out of the collector's
        # reach, so a gen-2 collection (a pause of milliseconds) does not land inside a
        # step or a plan build (vLLM and SGLang freeze after start-up for the same reason).
        gc.freeze()
        self.engine.start()
        self.metrics.ready.set(1)

    def load_in_background(self) -> None:
        def load() -> None:
            try:
                self.start(
                    load_store(self.settings.store, self.settings.device, self.settings.dtype)
                )
            except StoreError as exc:
                self.load_failed = True
                log.error("store failed to load: %s", exc)
            except Exception:  # anything else (torch, tokenizer files): same, with traceback
                self.load_failed = True
                log.exception("store failed to load")

        threading.Thread(target=load, name="mage-store-loader", daemon=True).start()

    def not_ready_message(self) -> str:
        return NOT_READY_FAILED if self.load_failed else "not ready: the model store is loading"


def engine_config(settings: ServerSettings, store: LoadedStore) -> EngineConfig:
    """The engine's limits from the settings; the KV budget in tokens of one batch row."""
    budget_mb = settings.kv_cache_mb
    if budget_mb is None and store.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(store.device)
        budget_mb = free / 2 / (1 << 20)
    budget_mb = budget_mb if budget_mb is not None else 2048.0
    return EngineConfig(
        max_queue=settings.max_queue,
        max_running=settings.max_running,
        kv_budget_tokens=int(budget_mb * (1 << 20)) // store.kv_bytes_per_token,
        prefill_tokens=settings.prefill_tokens,
        cache_budget_bytes=int(settings.merge_cache_mb * (1 << 20)),
        prefix_cache_bytes=int(settings.prefix_cache_mb * (1 << 20)),
        stall_timeout_s=settings.engine_stall_timeout_s,
    )


@dataclass(frozen=True)
class Submitted:
    """A request in the engine, seen from the HTTP side."""

    handle: RequestHandle
    events: asyncio.Queue[Event]
    until: float
    """monotonic() past which the HTTP layer stops waiting, whatever the engine does."""


class Gateway:
    """Prepare, submit and relay requests for the route handlers."""

    def __init__(self, state: ServingState) -> None:
        self.state, self.settings = state, state.settings
        self.live = LiveRequests()
        """Running requests by caller and id, for preference changes (server.steering)."""

    def ready(self) -> tuple[LoadedStore, Engine]:
        state = self.state
        if state.engine is None or state.store is None:
            raise ApiError(503, state.not_ready_message(), "unavailable")
        return state.store, state.engine

    async def prepare(self, prompt: Prompt, options: Options) -> GenerationRequest:
        """The engine request (tokenised in a worker thread: it takes milliseconds)."""
        store, _ = self.ready()
        return await run_in_threadpool(build_request, prompt, options, store, self.settings)

    def submit(
        self, requests: list[GenerationRequest], http: Request | None = None
    ) -> list[Submitted]:
        """Queue every request, or none (see submit_all); a refusal is the caller's 429 or
        503. With `http`, they run under its X-Request-Id, where its caller can change their
        preference."""
        _, engine = self.ready()
        loop = asyncio.get_running_loop()
        submitted: list[Submitted] = []
        for index, request in enumerate(requests):
            events: asyncio.Queue[Event] = asyncio.Queue()
            handle = RequestHandle(
                request,
                lambda e, q=events: loop.call_soon_threadsafe(q.put_nowait, e),
                time.monotonic(),
                counted=index == 0,  # one HTTP request, one outcome, however many choices
            )
            deadline = request.deadline or handle.submitted_at + self.settings.request_timeout_s
            submitted.append(Submitted(handle, events, deadline + DEADLINE_GRACE_S))
        try:
            submit_all(engine, [one.handle for one in submitted])
        except (QueueFullError, EngineUnavailableError) as exc:
            raise _refusal(exc) from None
        if http is not None:
            owner = caller(http, keyed=bool(self.settings.api_key))
            self.live.add(owner, request_id(http), [one.handle for one in submitted])
        return submitted

    @staticmethod
    def cancel(submitted: list[Submitted]) -> None:
        """Free the engine slots (a no-op for finished requests)."""
        for one in submitted:
            one.handle.cancel()

    async def next_event(self, one: Submitted, http: Request | None = None) -> Event | None:
        """The engine's next event, or an error event once the deadline passes or the engine
        dies or stalls; None if the client went away. Either way no request outlives its
        deadline and none waits on a dead engine. With `http`, a client that went away is
        noticed at its request's next event (one decode step), not only when events pause."""
        while True:
            if http is not None and await http.is_disconnected():
                one.handle.cancel()
                return None
            remaining = one.until - time.monotonic()
            if remaining <= 0:
                return self._timed_out(one.handle)
            try:
                return await asyncio.wait_for(one.events.get(), timeout=min(0.5, remaining))
            except TimeoutError:
                engine = self.state.engine
                reason = engine.health() if engine is not None else None
                if reason is not None:
                    one.handle.cancel()
                    return ErrorEvent(f"unavailable: {reason}", "unavailable")

    def _timed_out(self, handle: RequestHandle) -> ErrorEvent:
        """The engine answers a request that passes its deadline itself (queued or running);
        this is for an engine that did not, within the grace after it."""
        handle.cancel()
        if handle.settle():
            self.state.metrics.rejected("timeout")
            log.warning(
                "request %s: no answer from the engine by its deadline", handle.request.request_id
            )
        return ErrorEvent("request exceeded its deadline", "timeout")


def submit_all(engine: Engine, handles: list[RequestHandle]) -> None:
    """Queue the handles of one HTTP request, or none: if the queue fills half-way, the
    error is raised and those already queued are settled (the refusal is that request's one
    outcome, so the engine counts none of them as it drops them) and cancelled (they leave
    the queue at the engine's next step)."""
    for index, handle in enumerate(handles):
        try:
            engine.submit(handle)
        except (QueueFullError, EngineUnavailableError):
            for queued in handles[:index]:
                queued.settle()
                queued.cancel()
            raise


def _refusal(exc: Exception) -> ApiError:
    if isinstance(exc, QueueFullError):
        return ApiError(429, f"overloaded: {exc}; retry later", "overloaded", {"Retry-After": "1"})
    return ApiError(503, f"unavailable: {exc}", "unavailable")


def error_status(event: ErrorEvent) -> int:
    return ERROR_STATUS.get(event.error_type, 500)
