"""FastAPI app: the TGI routes (server.tgi), the OpenAI-compatible routes (server.openai_api),
the playground page (server.playground), health, info, metrics.

Requests are validated and tokenised in the route modules, then handed to the engine thread
through its bounded queue (server.relay); events come back through an asyncio.Queue fed
thread-safely.

Whatever happens, a client gets its API's error JSON ({"error", "error_type"}, or OpenAI's
{"error": {...}} under /v1; never a traceback, a plain text page or NaN), within the
request's deadline.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware import Middleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from model_store.loader import LoadedStore
from server import openai_api, playground, steering, tgi
from server.errors import (
    HTTP_ERROR_TYPES,
    describe_validation,
    error_response,
    finite_json,
    first_param,
)
from server.metrics import Metrics
from server.middleware import ApiKeyMiddleware, BodyLimitMiddleware, HeaderLimitMiddleware
from server.openapi import api_responses, customise_openapi
from server.relay import Gateway, ServingState, package_version
from server.request_ids import REQUEST_ID_HEADER, RequestIdMiddleware
from server.schemas import ApiError, request_body_type
from server.settings import ServerSettings
from server.translate import available_modes

log = logging.getLogger("mage.server")
DESCRIPTION = (
    "Controllable multi-objective generation (Merge and Guide): TGI's API (/generate, "
    "/generate_stream, POST /), an OpenAI-compatible API (/v1/...) and a playground (GET /)."
)
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
"""Answered without an API key: probes and (unless metrics_require_key) Prometheus."""


class PrometheusResponse(Response):
    media_type = CONTENT_TYPE_LATEST


def create_app(settings: ServerSettings, store: LoadedStore | None = None) -> FastAPI:
    """The app. With `store` given it serves at once; otherwise it loads settings.store in
    the background and answers 503 on /ready and /generate until that is done."""
    state = ServingState(settings)
    gateway = Gateway(state)

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
        description=DESCRIPTION,
        lifespan=lifespan,
        middleware=_middleware(settings, state.metrics),
    )
    app.state.serving = state
    customise_openapi(app, open_paths(settings) if settings.api_key else None)
    _error_handlers(app, state)
    tgi.register(app, gateway, request_body_type(settings))
    openai_api.register(app, gateway)
    steering.register(app, gateway)
    playground.register(app)
    _service_routes(app, state, gateway)
    return app


def _error_handlers(app: FastAPI, state: ServingState) -> None:
    """Every error in the route's shape (TGI's, or OpenAI's under /v1), counted."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        state.metrics.rejected(exc.kind)
        path = request.url.path
        return error_response(
            exc.status, exc.message, exc.kind, exc.headers, path=path, param=exc.param
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        state.metrics.rejected("validation")
        errors = exc.errors()
        message = describe_validation(errors)
        return error_response(
            422, message, "validation", path=request.url.path, param=first_param(errors)
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        # FastAPI answers 400 for a body json.loads cannot even start on; to a client that
        # is as invalid as malformed JSON, so it gets the same 422.
        unreadable = {UnicodeDecodeError: "not valid UTF-8", RecursionError: "nested too deeply"}
        for cause, why in unreadable.items():
            if exc.status_code == 400 and isinstance(exc.__cause__, cause):
                state.metrics.rejected("validation")
                message = f"invalid request: body is {why}"
                return error_response(422, message, "validation", path=path)
        kind = HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else kind.replace("_", " ")
        if exc.status_code in (404, 405):  # no route: not a request the API counts
            message = f"{message}: {request.method} {path}"
        else:
            state.metrics.rejected(kind)
        return error_response(exc.status_code, message, kind, exc.headers, path=path)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer; the client learns nothing of it.
        state.metrics.rejected("internal")
        return error_response(500, "internal server error", "internal", path=request.url.path)


def _service_routes(app: FastAPI, state: ServingState, gateway: Gateway) -> None:
    """Probes, /info and /metrics."""
    settings = state.settings

    @app.get(
        "/health",
        responses=api_responses(None, 503),
        summary="Liveness: 200 while the process serves HTTP and its engine steps",
    )
    async def health() -> Response:
        # 503 once the engine thread died or stalled, or the store failed to load (a server
        # that can never become ready), so Kubernetes restarts the pod and shows why.
        reason = state.engine.health() if state.engine is not None else None
        if reason is None and state.load_failed:
            reason = "the model store failed to load (the server log says why)"
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
        store_, engine = gateway.ready()
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
                "prefix_cache_mb": settings.prefix_cache_mb,
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


def open_paths(settings: ServerSettings) -> frozenset[str]:
    return OPEN_PATHS - {"/metrics"} if settings.metrics_require_key else OPEN_PATHS


def _middleware(settings: ServerSettings, metrics: Metrics) -> list[Middleware]:
    """Outermost first: request ids (every answer carries X-Request-Id), the header limit,
    CORS (so preflights and error answers carry its headers), then API keys (so nobody
    without one makes the server read a body), then the body limit."""
    stack = [
        Middleware(RequestIdMiddleware),
        Middleware(
            HeaderLimitMiddleware, max_bytes=settings.max_header_bytes, on_reject=metrics.rejected
        ),
    ]
    if settings.cors_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
                expose_headers=["Retry-After", REQUEST_ID_HEADER],
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
