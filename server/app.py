"""FastAPI app: TGI-style /generate and /generate_stream, health, info, metrics.

Requests are validated and tokenised here, then handed to the engine thread through its
bounded queue; events come back through an asyncio.Queue fed thread-safely.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from guidance.engine import Engine, EngineConfig, EngineUnavailableError, QueueFullError
from guidance.requests import ErrorEvent, Event, RequestHandle, TokenEvent
from model_store.errors import StoreError
from model_store.loader import LoadedStore, load_store
from server.metrics import Metrics
from server.schemas import ApiError, GenerateBody
from server.settings import ServerSettings
from server.translate import available_modes, build_request

log = logging.getLogger("mage.server")
ERROR_STATUS = {"validation": 422, "timeout": 504, "generation": 500, "unavailable": 503}


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
        self.load_error: str | None = None

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
                self.load_error = str(exc)
                log.error("store failed to load: %s", exc)

        threading.Thread(target=load, name="mage-store-loader", daemon=True).start()


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


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": kind}, status_code=status)


def create_app(settings: ServerSettings, store: LoadedStore | None = None) -> FastAPI:
    """The app. With `store` given it serves at once; otherwise it loads settings.store in
    the background and answers 503 on /ready and /generate until that is done."""
    state = ServingState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if store is not None:
            state.start(store)
        else:
            state.load_in_background()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="MAGE server", version=package_version(), lifespan=lifespan)
    app.state.serving = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        state.metrics.rejected(exc.kind)
        return error_response(exc.status, exc.message, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            "body is not valid JSON"
            if err["type"] == "json_invalid"
            else f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}"
            for err in exc.errors()
        )
        state.metrics.rejected("validation")
        return error_response(422, f"invalid request: {problems}", "validation")

    def ready_engine() -> tuple[LoadedStore, Engine]:
        if state.engine is None or state.store is None:
            reason = state.load_error or "the model store is still loading"
            raise ApiError(503, f"not ready: {reason}", "unavailable")
        return state.store, state.engine

    async def submit(body: GenerateBody) -> tuple[RequestHandle, asyncio.Queue[Event]]:
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
            raise ApiError(429, f"overloaded: {exc}; retry later", "overloaded") from None
        except EngineUnavailableError as exc:
            raise ApiError(503, f"unavailable: {exc}", "unavailable") from None
        return handle, events

    async def next_event(
        handle: RequestHandle, events: asyncio.Queue[Event], http: Request | None = None
    ) -> Event | None:
        """The engine's next event; an error event if the engine dies or stalls meanwhile;
        None if the client went away (then the request is cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.5)
            except TimeoutError:
                reason = state.engine.health() if state.engine is not None else None
                if reason is not None:
                    handle.cancel()
                    return ErrorEvent(f"unavailable: {reason}", "unavailable")
                if http is not None and await http.is_disconnected():
                    handle.cancel()
                    return None

    @app.post("/generate")
    async def generate(body: GenerateBody, http: Request):
        handle, events = await submit(body)
        try:
            while True:
                event = await next_event(handle, events, http)
                if event is None:
                    return Response(status_code=499)
                if isinstance(event, ErrorEvent):
                    return error_response(
                        ERROR_STATUS.get(event.error_type, 500), event.message, event.error_type
                    )
                if event.details is not None:
                    return {"generated_text": event.generated_text, "details": event.details}
        finally:
            handle.cancel()  # no-op once finished; frees the slot if we leave early

    @app.post("/generate_stream")
    async def generate_stream(body: GenerateBody):
        handle, events = await submit(body)

        async def stream():
            try:
                while True:
                    event = await next_event(handle, events)
                    if isinstance(event, ErrorEvent):
                        payload = {"error": event.message, "error_type": event.error_type}
                        yield f"event: error\ndata: {json.dumps(payload)}\n\n"
                        return
                    yield f"data: {json.dumps(token_payload(event))}\n\n"
                    if event.details is not None:
                        return
            finally:  # client gone (task cancelled) or stream done: free the engine slot
                handle.cancel()

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/health")
    async def health():
        # Liveness: 503 once the engine thread died or stalled, so Kubernetes restarts the pod.
        reason = state.engine.health() if state.engine is not None else None
        if reason is not None:
            return error_response(503, f"unhealthy: {reason}", "unavailable")
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.engine is None:  # probes are not requests: answered without counting
            reason = state.load_error or "the model store is still loading"
            return error_response(503, f"not ready: {reason}", "unavailable")
        reason = state.engine.health()
        if reason is not None:
            return error_response(503, f"not ready: {reason}", "unavailable")
        return {"status": "ready"}

    @app.get("/info")
    async def info():
        store_, _ = ready_engine()
        manifest = store_.checked.manifest
        return {
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
            },
            "device": str(store_.device),
            "dtype": str(store_.dtype).removeprefix("torch."),
        }

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def token_payload(event: TokenEvent) -> dict:
    token = {k: v for k, v in asdict(event).items() if k in ("id", "text", "logprob", "special")}
    return {"token": token, "generated_text": event.generated_text, "details": event.details}
