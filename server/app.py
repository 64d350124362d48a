"""FastAPI app: TGI-style /generate and /generate_stream, health, info, metrics.

Requests are validated and tokenised here, then handed to the engine thread through its
bounded queue; events come back through an asyncio.Queue fed thread-safely.

Whatever happens, a client gets {"error", "error_type"} JSON (never a traceback, a plain
text page or NaN), within the request's deadline. No `from __future__ import annotations`
here: the body type is built per app from its settings, and FastAPI must see it as an
object, not as a name to look up in this module.
"""

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware import Middleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from guidance.engine import Engine, EngineConfig, EngineUnavailableError, QueueFullError
from guidance.requests import ErrorEvent, Event, RequestHandle, TokenEvent
from model_store.errors import StoreError
from model_store.loader import LoadedStore, load_store
from server.errors import (
    HTTP_ERROR_TYPES,
    clean_message,
    describe_validation,
    dumps,
    error_response,
    finite_json,
)
from server.metrics import Metrics
from server.middleware import ApiKeyMiddleware, BodyLimitMiddleware
from server.openapi import api_responses, customise_openapi
from server.schemas import ApiError, GenerateResponse, request_body_type
from server.settings import ServerSettings
from server.translate import available_modes, build_request

log = logging.getLogger("mage.server")
ERROR_STATUS = {"validation": 422, "timeout": 504, "generation": 500, "unavailable": 503}
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
"""Answered without an API key: probes and (unless metrics_require_key) Prometheus."""
DEADLINE_GRACE_S = 0.5
"""How long past a request's deadline the HTTP layer waits for the engine's own timeout
event before answering 504 itself (an engine that stopped emitting cannot hold it)."""
NOT_READY_FAILED = "not ready: the model store failed to load (the server log says why)"
"""What clients see of a load failure: the reason names files, so it stays in the log."""


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


class PrometheusResponse(Response):
    media_type = CONTENT_TYPE_LATEST


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
        stall_timeout_s=settings.engine_stall_timeout_s,
    )


def create_app(settings: ServerSettings, store: LoadedStore | None = None) -> FastAPI:
    """The app. With `store` given it serves at once; otherwise it loads settings.store in
    the background and answers 503 on /ready and /generate until that is done."""
    state = ServingState(settings)
    GenerateBody = request_body_type(settings)  # noqa: N806 (a type, built per app)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if store is not None:
            state.start(store)
        else:
            state.load_in_background()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(
        title="MAGE server",
        version=package_version(),
        description="Controllable multi-objective generation (Merge and Guide), TGI-style.",
        lifespan=lifespan,
        middleware=_middleware(settings, state.metrics),
    )
    app.state.serving = state
    customise_openapi(app, open_paths(settings) if settings.api_key else None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        state.metrics.rejected(exc.kind)
        return error_response(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        state.metrics.rejected("validation")
        return error_response(422, describe_validation(exc.errors()), "validation")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers 400 for a body json.loads cannot even start on; to a client that
        # is as invalid as malformed JSON, so it gets the same 422.
        unreadable = {UnicodeDecodeError: "not valid UTF-8", RecursionError: "nested too deeply"}
        for cause, why in unreadable.items():
            if exc.status_code == 400 and isinstance(exc.__cause__, cause):
                state.metrics.rejected("validation")
                return error_response(422, f"invalid request: body is {why}", "validation")
        kind = HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else kind.replace("_", " ")
        if exc.status_code in (404, 405):  # no route: not a request the API counts
            message = f"{message}: {request.method} {request.url.path}"
        else:
            state.metrics.rejected(kind)
        return error_response(exc.status_code, message, kind, exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer; the client learns nothing of it.
        state.metrics.rejected("internal")
        return error_response(500, "internal server error", "internal")

    def ready_engine() -> tuple[LoadedStore, Engine]:
        if state.engine is None or state.store is None:
            raise ApiError(503, state.not_ready_message(), "unavailable")
        return state.store, state.engine

    async def submit(body: Any) -> tuple[RequestHandle, asyncio.Queue[Event]]:
        store_, engine = ready_engine()
        request = await run_in_threadpool(build_request, body, store_, settings)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        handle = RequestHandle(
            request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), time.monotonic()
        )
        try:
            engine.submit(handle)
        except QueueFullError as exc:
            raise ApiError(
                429, f"overloaded: {exc}; retry later", "overloaded", {"Retry-After": "1"}
            ) from None
        except EngineUnavailableError as exc:
            raise ApiError(503, f"unavailable: {exc}", "unavailable") from None
        return handle, events

    def give_up_at(handle: RequestHandle) -> float:
        """monotonic() past which the HTTP layer stops waiting, whatever the engine does."""
        deadline = handle.request.deadline or handle.submitted_at + settings.request_timeout_s
        return deadline + DEADLINE_GRACE_S

    def timed_out(handle: RequestHandle) -> ErrorEvent:
        handle.cancel()
        state.metrics.rejected("timeout")
        log.warning(
            "request %s: no answer from the engine by its deadline", handle.request.request_id
        )
        return ErrorEvent("request exceeded its deadline", "timeout")

    async def next_event(
        handle: RequestHandle,
        events: asyncio.Queue[Event],
        until: float,
        http: Request | None = None,
    ) -> Event | None:
        """The engine's next event, or an error event once the deadline passes or the engine
        dies or stalls; None if the client went away. Either way no request outlives its
        deadline and none waits on a dead engine."""
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return timed_out(handle)
            try:
                return await asyncio.wait_for(events.get(), timeout=min(0.5, remaining))
            except TimeoutError:
                reason = state.engine.health() if state.engine is not None else None
                if reason is not None:
                    handle.cancel()
                    return ErrorEvent(f"unavailable: {reason}", "unavailable")
                if http is not None and await http.is_disconnected():
                    handle.cancel()
                    return None

    @app.post(
        "/generate",
        response_model=None,
        responses=api_responses(GenerateResponse, 413, 422, 429, 500, 503, 504),
        summary="Generate text for a preference (one JSON answer)",
    )
    async def generate(body: GenerateBody, http: Request) -> Response:
        handle, events = await submit(body)
        until = give_up_at(handle)
        try:
            while True:
                event = await next_event(handle, events, until, http)
                if event is None:
                    return Response(status_code=499)
                if isinstance(event, ErrorEvent):
                    return error_response(
                        ERROR_STATUS.get(event.error_type, 500), event.message, event.error_type
                    )
                if event.details is not None:
                    return JSONResponse(
                        finite_json(
                            {"generated_text": event.generated_text, "details": event.details}
                        )
                    )
        finally:
            handle.cancel()  # no-op once finished; frees the slot if we leave early

    @app.post(
        "/generate_stream",
        response_class=EventStreamResponse,
        responses=api_responses("event-stream", 413, 422, 429, 500, 503),
        summary="Generate text for a preference, one server-sent event per token",
    )
    async def generate_stream(body: GenerateBody) -> EventStreamResponse:
        handle, events = await submit(body)
        until = give_up_at(handle)

        async def stream() -> AsyncIterator[str]:
            try:
                while True:
                    event = await next_event(handle, events, until)
                    if isinstance(event, ErrorEvent):
                        yield sse_error(event.message, event.error_type)
                        return
                    yield f"data: {dumps(token_payload(event))}\n\n"
                    if event.details is not None:
                        return
            except Exception:  # headers are sent: the error can only be an event now
                log.exception("request %s: stream failed", handle.request.request_id)
                state.metrics.rejected("internal")
                yield sse_error("internal server error", "internal")
            finally:  # client gone (task cancelled) or stream done: free the engine slot
                handle.cancel()

        return EventStreamResponse(
            stream(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.get(
        "/health",
        responses=api_responses(None, 503),
        summary="Liveness: 200 while the process serves HTTP and its engine steps",
    )
    async def health() -> Response:
        # 503 once the engine thread died or stalled, so Kubernetes restarts the pod.
        reason = state.engine.health() if state.engine is not None else None
        if reason is not None:
            return error_response(503, f"unhealthy: {reason}", "unavailable")
        return JSONResponse({"status": "ok"})

    @app.get(
        "/ready",
        responses=api_responses(None, 503),
        summary="Readiness: 200 once the store is loaded",
    )
    async def ready() -> Response:
        if state.engine is None:  # probes are not requests: answered without counting
            return error_response(503, state.not_ready_message(), "unavailable")
        reason = state.engine.health()
        if reason is not None:
            return error_response(503, f"not ready: {reason}", "unavailable")
        return JSONResponse({"status": "ready"})

    @app.get(
        "/info",
        responses=api_responses(None, 503),
        summary="Objectives, B, alpha, beta, guidance modes, defaults and limits",
    )
    async def info() -> JSONResponse:
        store_, engine = ready_engine()
        manifest = store_.checked.manifest
        info = {
            "version": package_version(),
            "store": manifest.name,
            "model": str(store_.checked.base_path.name),
            "objectives": manifest.objectives,
            "combination_matrix": store_.checked.combination_matrix.tolist(),
            "alpha": manifest.alpha,
            "beta": manifest.beta,
            "guidance_modes": available_modes(store_),
            "defaults": manifest.defaults.model_dump(),
            "limits": {
                "max_new_tokens": settings.max_new_tokens,
                "max_input_tokens": settings.max_input_tokens,
                "max_queue": settings.max_queue,
                "max_running": settings.max_running,
                "request_timeout_s": settings.request_timeout_s,
                "max_body_bytes": settings.max_body_bytes,
                "merge_cache_mb": settings.merge_cache_mb,
                "kv_cache_tokens": engine.config.kv_budget_tokens,
                "prefill_tokens": settings.prefill_tokens,
            },
            "device": str(store_.device),
            "dtype": str(store_.dtype).removeprefix("torch."),
        }
        return JSONResponse(finite_json(info))

    @app.get(
        "/metrics",
        response_class=PrometheusResponse,
        summary="Prometheus metrics (text exposition format)",
    )
    async def metrics() -> PrometheusResponse:
        return PrometheusResponse(generate_latest(state.metrics.registry))

    return app


def open_paths(settings: ServerSettings) -> frozenset[str]:
    return OPEN_PATHS - {"/metrics"} if settings.metrics_require_key else OPEN_PATHS


def _middleware(settings: ServerSettings, metrics: Metrics) -> list[Middleware]:
    """Outermost first: CORS (so preflights and error answers carry its headers), then
    API keys (so nobody without one makes the server read a body), then the body limit."""
    stack = []
    if settings.cors_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
                expose_headers=["Retry-After"],
            )
        )
    if settings.api_key:
        keys = [key.get_secret_value().encode() for key in settings.api_key]
        stack.append(
            Middleware(
                ApiKeyMiddleware,
                keys=keys,
                open_paths=open_paths(settings),
                on_reject=metrics.rejected,
            )
        )
    stack.append(
        Middleware(
            BodyLimitMiddleware, max_bytes=settings.max_body_bytes, on_reject=metrics.rejected
        )
    )
    return stack


def sse_error(message: str, kind: str) -> str:
    payload = {"error": clean_message(message), "error_type": kind}
    return f"event: error\ndata: {dumps(payload)}\n\n"


def token_payload(event: TokenEvent) -> dict:
    token = {k: v for k, v in asdict(event).items() if k in ("id", "text", "logprob", "special")}
    return {"token": token, "generated_text": event.generated_text, "details": event.details}
