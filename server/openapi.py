"""What /openapi.json says beyond the request models: error answers, content types, keys.

A client (or schemathesis) reading the schema should meet no status, content type or
header the schema does not mention.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from server.errors import is_openai
from server.schemas import ErrorBody, GenerateResponse

ERROR_DESCRIPTIONS = {
    401: "Missing or wrong API key (only when the server has keys).",
    404: "No running request has this id (finished, unknown, or another API key's).",
    409: "The request's preference cannot change while it runs (its mode or merge method).",
    413: "Request body larger than the server's max_body_bytes.",
    422: "Invalid request: the message names the field and the problem.",
    429: "The waiting queue is full; retry after Retry-After seconds.",
    500: "Internal error (or a generation error); details are in the server log.",
    503: "The model store is loading, or failed to load.",
    504: "The request passed its deadline (request_timeout_s).",
}
SSE_DESCRIPTION = (
    "Server-sent events: `data: {token: {id, text, logprob, special}, generated_text, "
    "details}` per token, the last with generated_text and details; an error after the "
    "stream started arrives as `event: error` with `data: {error, error_type}`. "
    "logprob is null if it is not finite (strict JSON)."
)
_ERROR_JSON = {
    "type": "object",
    "required": ["error", "error_type"],
    "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
    "additionalProperties": False,
}
_TOKEN_JSON = {
    "type": "object",
    "required": ["token", "generated_text", "details"],
    "properties": {
        "token": {
            "type": "object",
            "required": ["id", "text", "logprob", "special"],
            "properties": {
                "id": {"type": "integer"},
                "text": {"type": "string"},
                "logprob": {"type": ["number", "null"]},
                "special": {"type": "boolean"},
            },
        },
        "generated_text": {"type": ["string", "null"]},
        "details": {"type": ["object", "null"]},
    },
}
SSE_EVENT_SCHEMA = {
    # Before OpenAPI 3.2's itemSchema, an event stream's schema describes each event:
    # its `event` name and its `data` line, a JSON document of its own.
    "oneOf": [
        {
            "type": "object",
            "required": ["data"],
            "properties": {
                "event": {"const": "message"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": _TOKEN_JSON,
                },
            },
        },
        {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"const": "error"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": _ERROR_JSON,
                },
            },
        },
    ]
}
OPENAI_SSE_EVENT_SCHEMA = {
    # Each event's data is a chunk (JSON) or the final [DONE]; see OPENAI_SSE_DESCRIPTION.
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}},
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
}


OPENAI_SSE_DESCRIPTION = (
    "With `stream: true`, server-sent events: `data: {chunk}` (chat.completion.chunk or "
    "text_completion objects, the last of each choice with finish_reason and `mage`), a "
    "usage chunk if stream_options.include_usage, then `data: [DONE]`; an error after the "
    "stream started arrives as `data: {error: {message, type, param, code}}`."
)


def api_responses(success: Any, *statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: its success body and each error status. `success` is a
    model, "event-stream" (TGI's events), "compat" (POST /: a list, or TGI's events),
    ("openai", model) (JSON or OpenAI's event stream), ("openai-json", model), or None for
    the route's own. Errors have the ErrorBody schema, or OpenAI's on ("openai...") routes."""
    responses: dict[int | str, dict[str, Any]] = {}
    openai = isinstance(success, tuple)
    if openai:
        kind, model = success
        responses[200] = {"model": model, "description": "The answer."}
        if kind == "openai":
            responses[200]["description"] += " " + OPENAI_SSE_DESCRIPTION
            responses[200]["content"] = {"text/event-stream": {"schema": OPENAI_SSE_EVENT_SCHEMA}}
    elif success == "event-stream":
        responses[200] = {
            "description": SSE_DESCRIPTION,
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        }
    elif success == "compat":
        responses[200] = {
            "description": "`stream` false: a list holding /generate's answer. " + SSE_DESCRIPTION,
            "content": {
                "application/json": {
                    "schema": {"type": "array", "items": GenerateResponse.model_json_schema()}
                },
                "text/event-stream": {"schema": SSE_EVENT_SCHEMA},
            },
        }
    elif success is not None:
        responses[200] = {"model": success, "description": "The generated text and details."}
    error_model = _openai_error_model() if openai else ErrorBody
    for status in statuses:
        responses[status] = {"model": error_model, "description": ERROR_DESCRIPTIONS[status]}
        if status in _HEADERS:
            responses[status]["headers"] = _HEADERS[status]
    return responses


def _openai_error_model() -> Any:
    from server.openai_schemas import OpenAIErrorBody  # a leaf, imported late: no cycle

    return OpenAIErrorBody


def customise_openapi(app: FastAPI, open_paths: frozenset[str] | None) -> None:
    """Finish what FastAPI generates: event streams get their per-event schema (FastAPI
    merges a plain "type: string" into any non-JSON response), and with API keys
    (`open_paths` given) a bearer scheme is required by every other operation, each of
    which may then answer 401."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = _exact_integer_bounds(build())
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if "text/event-stream" not in content:
                        continue
                    if status.startswith("2"):
                        # FastAPI merges a plain "type: string" over the schemas given
                        events = OPENAI_SSE_EVENT_SCHEMA if is_openai(path) else SSE_EVENT_SCHEMA
                        content["text/event-stream"] = {"schema": events}
                    else:  # FastAPI files every answer under the route's media type
                        response["content"] = {"application/json": content["text/event-stream"]}
                if open_paths is not None:
                    _require_key(operation, path in open_paths, is_openai(path))
        if open_paths is not None:
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _exact_integer_bounds(node: Any) -> Any:
    """FastAPI's OpenAPI model stores bounds as floats (seed < 2**64 became
    1.8446744073709552e+19); on integer fields write them back as exact integers, so that
    clients and fuzzers do not compare seeds near 2**64 in floating point."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in _BOUNDS:
                if isinstance(node.get(key), float) and node[key].is_integer():
                    node[key] = int(node[key])
        for value in node.values():
            _exact_integer_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _exact_integer_bounds(value)
    return node


def _require_key(operation: dict[str, Any], open_path: bool, openai: bool) -> None:
    if open_path:
        operation["security"] = []
        return
    operation["security"] = [{"bearer": []}]
    body = "OpenAIErrorBody" if openai else "ErrorBody"
    operation.setdefault("responses", {})["401"] = {
        "description": ERROR_DESCRIPTIONS[401],
        "headers": _HEADERS[401],
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
    }
