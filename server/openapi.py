"""What /openapi.json says beyond the request models: error answers, content types, keys.

A client (or schemathesis) reading the schema should meet no status, content type or
header the schema does not mention.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from server.schemas import ErrorBody

ERROR_DESCRIPTIONS = {
    401: "Missing or wrong API key (only when the server has keys).",
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
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}},
}


def api_responses(success: Any, *statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: its success body (a model, "event-stream" or None for the
    route's own) and each error status, all with the ErrorBody schema."""
    responses: dict[int | str, dict[str, Any]] = {}
    if success == "event-stream":
        responses[200] = {
            "description": SSE_DESCRIPTION,
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        }
    elif success is not None:
        responses[200] = {"model": success, "description": "The generated text and details."}
    for status in statuses:
        responses[status] = {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[status]}
        if status in _HEADERS:
            responses[status]["headers"] = _HEADERS[status]
    return responses


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
                        content["text/event-stream"] = {"schema": SSE_EVENT_SCHEMA}
                    else:  # FastAPI files every answer under the route's media type
                        response["content"] = {"application/json": content["text/event-stream"]}
                if open_paths is not None:
                    _require_key(operation, path in open_paths)
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


def _require_key(operation: dict[str, Any], open_path: bool) -> None:
    if open_path:
        operation["security"] = []
        return
    operation["security"] = [{"bearer": []}]
    operation.setdefault("responses", {})["401"] = {
        "description": ERROR_DESCRIPTIONS[401],
        "headers": _HEADERS[401],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
