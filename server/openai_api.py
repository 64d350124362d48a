"""The OpenAI-compatible routes: POST /v1/chat/completions, POST /v1/completions,
GET /v1/models.

A body is read into the same Options as a TGI one (server.translate), tokenised once per
prompt, and fanned out into `n` engine requests (each with its own seed when sampling),
which decode together in the engine's batched forward. Answers follow OpenAI's shapes, plus
a `mage` field: the normalised preference, lambda, guidance and merge method used.

No `from __future__ import annotations` here: the body types are built per app from its
settings, and FastAPI must see them as objects.
"""

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from guidance.constrain import ANY_OBJECT, GrammarSpec
from guidance.requests import ErrorEvent, Event, GenerationRequest
from model_store.loader import LoadedStore
from server.errors import dumps, finite_json, openai_error
from server.openai_choices import Choice, Reply
from server.openai_schemas import (
    ChatCompletion,
    Completion,
    ModelList,
    openai_body_types,
)
from server.openapi import api_responses
from server.relay import Gateway, Submitted, error_status
from server.request_ids import request_id
from server.schemas import SAMPLING_FILTERS, SEED_LIMIT, TEMPERATURE_MIN, ApiError
from server.tgi import STREAM_HEADERS, EventStreamResponse
from server.translate import Options, Prompt, header_steering, merged_steering, sampling_of

log = logging.getLogger("mage.server")
MAX_TOKENS_NAMES = ("`max_new_tokens`", "`max_tokens`")
"""The shared validation's name for max_tokens, and this API's."""


def read_options(body: Any, headers: Any, chat: bool, store: LoadedStore) -> Options:
    """Options of a schema-valid OpenAI body; temperature below 0.01 (0 included) is greedy."""
    greedy = body.temperature is not None and body.temperature < TEMPERATURE_MIN
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    max_tokens = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
    return Options(
        steering=merged_steering(body, header_steering(headers, store)),
        sampling=sampling_of(body, **dict.fromkeys(SAMPLING_FILTERS if greedy else ())),
        max_new_tokens=max_tokens,
        stop=stop,
        top_n=_top_n(body, chat),
        grammar=_grammar(body.response_format),
    )


def _grammar(response_format: Any) -> GrammarSpec | None:
    """OpenAI's response_format as a grammar: json_object is any JSON object (as vLLM
    reads it), json_schema its schema; text (or none) is free text."""
    kind = response_format.type if response_format is not None else "text"
    if kind == "json_object":
        return GrammarSpec("json", ANY_OBJECT, "response_format")
    if kind == "json_schema":
        return GrammarSpec("json", response_format.json_schema.schema_, "response_format")
    return None


def _top_n(body: Any, chat: bool) -> int:
    if chat:
        return (body.top_logprobs or 0) if body.logprobs else 0
    return body.logprobs or 0


def chat_prompt(body: Any) -> Prompt:
    messages = []
    for message in body.messages:
        content = message.content
        if not isinstance(content, str):
            content = "".join(part.text for part in content)
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": content})
    return Prompt(messages=messages)


def fan_out(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """n copies of a request; copy i samples with seed + i (the engine picks seeds if none)."""
    seed = request.sampling.seed
    copies = []
    for i in range(n):
        sampling = dataclasses.replace(
            request.sampling, seed=None if seed is None else (seed + i) % SEED_LIMIT
        )
        copies.append(
            dataclasses.replace(request, request_id=f"{request.request_id}-{i}", sampling=sampling)
        )
    return copies


def register(app: FastAPI, gateway: Gateway) -> None:
    """Add the /v1 routes, with bodies bounded by the gateway's settings."""
    ChatBody, CompletionBody = openai_body_types(gateway.settings)  # noqa: N806 (types)
    started = int(time.time())

    def model_name() -> str:
        store, _ = gateway.ready()
        return store.checked.manifest.name

    async def start(
        prompts: list[Prompt], options: Options, n: int, http: Request
    ) -> list[Submitted]:
        requests = []
        for prompt in prompts:
            try:
                request = await gateway.prepare(prompt, options)
            except ApiError as exc:
                raise _renamed(exc, "messages" if prompt.messages else "prompt") from None
            requests += fan_out(request, n)
        return gateway.submit(requests, http)

    async def answer(body: Any, http: Request, kind: str, prompts: list[Prompt]) -> Response:
        chat = kind == "chat"
        store, _ = gateway.ready()
        options = read_options(body, http.headers, chat, store)
        n = body.n or 1
        answer_id = request_id(http, "chatcmpl-" if chat else "cmpl-")  # = X-Request-Id
        submitted = await start(prompts, options, n, http)
        echo = not chat and bool(body.echo)
        choices = [
            Choice(
                index=i,
                submitted=one,
                stops=options.stop,
                chat=chat,
                prefix=prompts[i // n].text if echo else "",
                logprobs=bool(body.logprobs) if chat else body.logprobs is not None,
                prompt_key=i // n,
                token_text=lambda token: store.tokenizer.decode([token]),
            )
            for i, one in enumerate(submitted)
        ]
        reply = Reply(kind, store.checked.manifest.name, body, choices, answer_id)
        if body.stream:
            return EventStreamResponse(_stream(gateway, reply, submitted), headers=STREAM_HEADERS)
        try:
            failure = await _collect(gateway, choices, http)
        finally:
            gateway.cancel(submitted)
        if failure is not None:
            return failure
        return JSONResponse(finite_json(reply.whole()))

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses=api_responses(("openai", ChatCompletion), 401, 413, 422, 429, 500, 503, 504),
        summary="OpenAI-compatible chat completion (preference as an extra field)",
    )
    async def chat_completions(body: ChatBody, http: Request) -> Response:
        return await answer(body, http, "chat", [chat_prompt(body)])

    @app.post(
        "/v1/completions",
        response_model=None,
        responses=api_responses(("openai", Completion), 401, 413, 422, 429, 500, 503, 504),
        summary="OpenAI-compatible text completion (preference as an extra field)",
    )
    async def completions(body: CompletionBody, http: Request) -> Response:
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        return await answer(body, http, "text", [Prompt(text=t) for t in texts])

    @app.get(
        "/v1/models",
        responses=api_responses(("openai-json", ModelList), 401, 503),
        summary="The served store, as the one OpenAI model",
    )
    async def models() -> JSONResponse:
        card = {"id": model_name(), "object": "model", "created": started, "owned_by": "mage"}
        return JSONResponse({"object": "list", "data": [card]})


def _renamed(exc: ApiError, prompt_name: str) -> ApiError:
    """The shared validation's message with this API's field names."""
    message = exc.message.replace("`inputs`", f"`{prompt_name}`")
    message = message.replace(*MAX_TOKENS_NAMES)
    params = {"inputs": prompt_name, "max_new_tokens": "max_tokens"}
    param = params.get(exc.param or "", exc.param)
    return ApiError(exc.status, message, exc.kind, exc.headers, param)


async def _collect(gateway: Gateway, choices: list[Choice], http: Request) -> Response | None:
    """Wait for every choice's last event; the error answer if one fails (or 499)."""

    async def one(choice: Choice) -> Response | None:
        while True:
            event = await gateway.next_event(choice.submitted, http)
            if event is None:
                return Response(status_code=499)
            if isinstance(event, ErrorEvent):
                return _error(event)
            choice.add(event)
            if event.details is not None:
                return None

    results = await asyncio.gather(*(one(choice) for choice in choices))
    return next((r for r in results if r is not None), None)


def _error(event: ErrorEvent) -> Response:
    status = error_status(event)
    return JSONResponse(openai_error(status, event.message, event.error_type), status_code=status)


async def _stream(gateway: Gateway, reply: Reply, submitted: list[Submitted]) -> AsyncIterator[str]:
    """Chunks as events arrive, from every choice; usage (if asked), then [DONE]."""
    merged: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        while True:
            event = await gateway.next_event(choice.submitted)
            await merged.put((choice.index, event))
            if isinstance(event, ErrorEvent) or event.details is not None:
                return

    tasks = [asyncio.create_task(pump(choice)) for choice in reply.choices]
    try:
        for chunk in reply.openings():
            yield _data(chunk)
        open_choices = len(reply.choices)
        while open_choices:
            index, event = await merged.get()
            if isinstance(event, ErrorEvent):
                yield _data(openai_error(error_status(event), event.message, event.error_type))
                break
            chunk = reply.chunk(index, event)
            if chunk is not None:
                yield _data(chunk)
            open_choices -= event.details is not None
        else:
            if reply.wants_usage:
                yield _data(reply.usage_chunk())
        yield "data: [DONE]\n\n"
    except Exception:  # headers are sent: the error can only be an event now
        log.exception("stream failed")
        if any(one.handle.settle() for one in submitted):  # once, not again by the engine
            gateway.state.metrics.rejected("internal")
        yield _data(openai_error(500, "internal server error", "internal"))
    finally:  # client gone (task cancelled) or stream done: free the engine slots
        gateway.cancel(submitted)
        for task in tasks:
            task.cancel()


def _data(payload: dict) -> str:
    return f"data: {dumps(payload)}\n\n"
