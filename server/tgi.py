"""The TGI routes: /generate, /generate_stream, and `POST /` (TGI's compat route, which
dispatches on the body's `stream` and answers a one-element list when not streaming).

The preference comes from `parameters` (preference, guidance, merge_method), else from
`parameters.adapter_id` (what InferenceClient.text_generation can send), else from the
X-Mage-Preference header (what the `text-generation` Client can send), else the store's
defaults.

No `from __future__ import annotations` here: the body type is built per app from its
settings, and FastAPI must see it as an object, not as a name to look up in this module.
"""

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from guidance.constrain import GrammarSpec
from guidance.requests import ErrorEvent, GenerationRequest, TokenEvent
from model_store.loader import LoadedStore
from server.errors import clean_message, dumps, error_response, finite_json
from server.openapi import api_responses
from server.relay import Gateway, Submitted, error_status
from server.schemas import GenerateResponse
from server.translate import (
    Options,
    Prompt,
    header_steering,
    merged_steering,
    parse_steering,
    sampling_of,
)

log = logging.getLogger("mage.server")
TOKEN_FIELDS = ("id", "text", "logprob", "special")


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def read_body(body: Any, headers: Mapping[str, str], store: LoadedStore) -> tuple[Prompt, Options]:
    """Prompt and options of a schema-valid TGI body."""
    p = body.parameters
    adapter = parse_steering(p.adapter_id, "adapter_id", store) if p.adapter_id else None
    messages = getattr(body, "messages", None)
    prompt = Prompt(
        text=getattr(body, "inputs", None),
        messages=[m.model_dump() for m in messages] if messages is not None else None,
    )
    options = Options(
        steering=merged_steering(p, adapter, header_steering(headers, store)),
        sampling=sampling_of(p),
        max_new_tokens=p.max_new_tokens,
        do_sample=p.do_sample,
        stop=tuple(p.stop),
        top_n=p.top_n_tokens or 0,
        prompt_logprobs=p.decoder_input_details,
        truncate=p.truncate,
        grammar=GrammarSpec(p.grammar.type, p.grammar.value) if p.grammar else None,
    )
    return prompt, options


@dataclass
class Answer:
    """What a TGI answer carries beyond the engine's events: the tokens so far, and the
    body's choices about the final text and details."""

    body: Any
    request: GenerationRequest
    prefix: str
    """The prompt text when return_full_text, else ''."""
    tokens: list[dict] = field(default_factory=list)
    top_tokens: list[list[dict]] = field(default_factory=list)

    @property
    def wants_top(self) -> bool:
        return self.request.sampling.top_n > 0

    def add(self, event: TokenEvent) -> None:
        self.tokens.append(token_json(event))
        if self.wants_top:
            self.top_tokens.append([asdict(t) for t in event.top_tokens])

    def final(self, event: TokenEvent) -> dict:
        """/generate's body: generated_text, and details (TGI's and this server's)."""
        answer: dict[str, Any] = {"generated_text": self.prefix + (event.generated_text or "")}
        if self.body.parameters.details:
            details = {**event.details, "prefill": event.details.get("prefill", [])}
            details["tokens"] = self.tokens
            if self.wants_top:
                details["top_tokens"] = self.top_tokens
            answer["details"] = details
        return answer

    def stream_event(self, event: TokenEvent) -> dict:
        """One SSE event: the token (and its alternatives); the last one also the text and
        details (details: the engine's, with prefill when asked)."""
        payload: dict[str, Any] = {"index": len(self.tokens), "token": token_json(event)}
        if self.wants_top:
            payload["top_tokens"] = [asdict(t) for t in event.top_tokens]
        last = event.details is not None
        payload["generated_text"] = self.prefix + (event.generated_text or "") if last else None
        payload["details"] = event.details if last and self.body.parameters.details else None
        return payload


def token_json(event: TokenEvent) -> dict:
    return {name: getattr(event, name) for name in TOKEN_FIELDS}


def register(app: FastAPI, gateway: Gateway, body_type: Any) -> None:
    """Add the TGI routes for bodies of `body_type` (server.schemas.request_body_type)."""

    async def start(body: Any, http: Request) -> tuple[Submitted, Answer]:
        prompt, options = read_body(body, http.headers, gateway.ready()[0])
        request = await gateway.prepare(prompt, options)
        (one,) = gateway.submit([request], http)
        prefix = ""
        if body.parameters.return_full_text:
            store, _ = gateway.ready()
            prefix = (
                prompt.text
                if prompt.text is not None
                else store.tokenizer.decode(list(request.prompt_ids))
            )
        return one, Answer(body, request, prefix)

    async def whole(body: Any, http: Request) -> dict | Response:
        """The answer's JSON, or the error (or 499) response."""
        one, answer = await start(body, http)
        try:
            while True:
                event = await gateway.next_event(one, http)
                if event is None:
                    return Response(status_code=499)
                if isinstance(event, ErrorEvent):
                    return error_response(error_status(event), event.message, event.error_type)
                answer.add(event)
                if event.details is not None:
                    return finite_json(answer.final(event))
        finally:
            one.handle.cancel()  # no-op once finished; frees the slot if we leave early

    async def streamed(body: Any, http: Request) -> EventStreamResponse:
        one, answer = await start(body, http)

        async def events() -> AsyncIterator[str]:
            try:
                while True:
                    event = await gateway.next_event(one)
                    if isinstance(event, ErrorEvent):
                        yield sse_error(event.message, event.error_type)
                        return
                    answer.add(event)
                    yield f"data: {dumps(answer.stream_event(event))}\n\n"
                    if event.details is not None:
                        return
            except Exception:  # headers are sent: the error can only be an event now
                log.exception("request %s: stream failed", one.handle.request.request_id)
                if one.handle.settle():  # counted once: the engine will not count it too
                    gateway.state.metrics.rejected("internal")
                yield sse_error("internal server error", "internal")
            finally:  # client gone (task cancelled) or stream done: free the engine slot
                one.handle.cancel()

        return EventStreamResponse(events(), headers=STREAM_HEADERS)

    @app.post(
        "/generate",
        response_model=None,
        responses=api_responses(GenerateResponse, 413, 422, 429, 500, 503, 504),
        summary="Generate text for a preference (one JSON answer)",
    )
    async def generate(body: body_type, http: Request) -> Response:
        answer = await whole(body, http)
        return JSONResponse(answer) if isinstance(answer, dict) else answer

    @app.post(
        "/generate_stream",
        response_class=EventStreamResponse,
        responses=api_responses("event-stream", 413, 422, 429, 500, 503),
        summary="Generate text for a preference, one server-sent event per token",
    )
    async def generate_stream(body: body_type, http: Request) -> EventStreamResponse:
        return await streamed(body, http)

    @app.post(
        "/",
        response_model=None,
        responses=api_responses("compat", 413, 422, 429, 500, 503, 504),
        summary="TGI's compat route: `stream` true streams events, else a one-element list",
    )
    async def compat(body: body_type, http: Request) -> Response:
        if body.stream:
            return await streamed(body, http)
        answer = await whole(body, http)
        return JSONResponse([answer]) if isinstance(answer, dict) else answer


def sse_error(message: str, kind: str) -> str:
    payload = {"error": clean_message(message), "error_type": kind}
    return f"event: error\ndata: {dumps(payload)}\n\n"
