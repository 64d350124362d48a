"""Every error leaves the server as {"error": ..., "error_type": ...}, in strict JSON; on the
OpenAI-compatible routes (/v1/...) as OpenAI's {"error": {"message", "type", "param",
"code"}}, with the same status codes (`code` is the error_type).

Validation errors are rewritten from pydantic's into one sentence per problem, named by
the field's path (relative to `parameters`, as TGI names them): a client reads
"`max_new_tokens` must be <= 512. Given: 9000", never a list of pydantic dicts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi.responses import JSONResponse

MAX_MESSAGE_CHARS = 2000
"""Error messages are cut here: some echo what the client sent (field names, modes)."""
HTTP_ERROR_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "validation",
    429: "overloaded",
    500: "internal",
    503: "unavailable",
    504: "timeout",
}
"""error_type for statuses raised by the framework itself (404 routes, 405 methods)."""
OPENAI_TYPES = {401: "authentication_error", 429: "rate_limit_error"}
"""OpenAI's error `type` by status; other 4xx are invalid_request_error, 5xx server_error."""
UNSUPPORTED = {
    "best_of": "1",
    "watermark": "false",
    "frequency_penalty": "0",
    "presence_penalty": "0",
    "logit_bias": "null, {} or biases of 0",
    "suffix": "null",
    "tools": "null or []",
    "tool_choice": 'null, "none" or "auto"',
    "tool_calls": "null or []",
}
"""Fields accepted for compatibility at their neutral value only: what is accepted."""

MAX_PROBLEMS = 5
"""Problems named in one validation message; the rest are counted (a list of a thousand bad
items is one message, not a thousand)."""

# Tags of the discriminated unions (server.schemas): part of pydantic's error locations,
# meaningless to clients.
_BODY_TAGS = ("text", "chat")
_PREFERENCE_TAGS = ("weights", "by_objective")
_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}
_TYPES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def clean_message(message: str) -> str:
    """Bounded, and encodable as UTF-8 (a lone surrogate a client sent is escaped)."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def is_openai(path: str) -> bool:
    """Whether a path belongs to the OpenAI-compatible API (its own error shape)."""
    return path == "/v1" or path.startswith("/v1/")


def openai_error(status: int, message: str, kind: str, param: str | None = None) -> dict:
    kind_of = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {
        "error": {"message": clean_message(message), "type": kind_of, "param": param, "code": kind}
    }


def error_response(
    status: int,
    message: str,
    kind: str,
    headers: Mapping[str, str] | None = None,
    *,
    path: str = "",
    param: str | None = None,
) -> JSONResponse:
    """The error answer for a request to `path`: OpenAI's shape under /v1, else TGI's."""
    body = (
        openai_error(status, message, kind, param)
        if is_openai(path)
        else {"error": clean_message(message), "error_type": kind}
    )
    return JSONResponse(body, status_code=status, headers=dict(headers) if headers else None)


def finite_json(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by null: strict JSON has neither."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """Strict JSON text (raises rather than writing NaN), after finite_json."""
    return json.dumps(finite_json(value), allow_nan=False)


def quote(value: Any) -> str:
    """What a client sent, as JSON, cut to 80 characters for an error message."""
    if isinstance(value, str | list | dict) and len(value) > 80:
        value = value[:80] if isinstance(value, str | list) else "{...}"  # never dump megabytes
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bound(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # "must be >= 0", not ">= 0.0"
    return str(value)


def _path(loc: Iterable[Any]) -> list[str]:
    parts = [str(p) for p in loc]
    if parts[:1] == ["body"]:
        parts = parts[1:]
    if parts[:1] and parts[0] in _BODY_TAGS:
        parts = parts[1:]
    at = parts.index("preference") + 1 if "preference" in parts else 0
    if at and parts[at : at + 1] and parts[at] in _PREFERENCE_TAGS:
        del parts[at]
    return parts


def describe_error(error: Mapping[str, Any]) -> str:
    """One pydantic error as a sentence."""
    kind, ctx, given = error["type"], error.get("ctx") or {}, error.get("input")
    parts = _path(error["loc"])
    full = ".".join(parts) or "body"
    name = ".".join(parts[1:]) if parts[:1] == ["parameters"] and len(parts) > 1 else full
    unit = "characters" if isinstance(given, str) else "items"
    unsupported = next((part for part in parts if part in UNSUPPORTED), None)
    if unsupported is not None and kind != "missing":
        accepted = UNSUPPORTED[unsupported]
        return f"`{unsupported}` is not supported by this server (accepted: {accepted})"
    if kind == "json_invalid":
        return "body is not valid JSON"
    if kind == "missing":
        return f"`{name}` is required" if parts else "body is required: a JSON object"
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        return f"`{name}` must be {op} {_bound(ctx.get(key))}. Given: {quote(given)}"
    if kind == "finite_number":
        return f"`{name}` must be a finite number"
    if kind in ("too_short", "string_too_short"):
        least = ctx.get("min_length")
        return f"`{name}` cannot be empty" if least == 1 else f"`{name}` needs {least}+ {unit}"
    if kind in ("too_long", "string_too_long"):
        count = len(given) if hasattr(given, "__len__") else "more"
        return f"`{name}` must have at most {ctx.get('max_length')} {unit}. Given: {count}"
    if kind == "literal_error" and parts[-1:] == ["type"] and "content" in parts:
        return f"`{name}`: only text content parts are supported. Given: {quote(given)}"
    if kind == "literal_error":
        return f"`{name}` must be one of {ctx.get('expected')}. Given: {quote(given)}"
    if kind in _TYPES:
        return f"`{name}` must be {_TYPES[kind]}. Given: {quote(given)}"
    if kind == "union_type":
        return f"`{name}` must be {' or '.join(error['expected'])}. Given: {quote(given)}"
    if kind == "body_shape":
        return error["msg"]
    if kind in ("preference_shape", "invalid_unicode"):
        return f"`{name}` {error['msg']}"
    return f"{full}: {error['msg']}"


def _is_branch(part: Any) -> bool:
    """A union member's tag in a pydantic location ('list[TextPart]', 'function-after[...]',
    'str', 'TextPart'), as opposed to a field name or a list index."""
    return isinstance(part, str) and ("[" in part or part[:1].isupper() or part in _SCALARS)


_SCALARS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def collapse_unions(errors: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Pydantic reports a value that fits no member of a union (`stop`: a string or a list)
    once per member, each under the member's internal tag. Keep the members whose type the
    value has (their errors are the real problem, e.g. `stop.0` too long); if it has none
    of their types, one error: `stop` must be a string or a list."""
    out: list[dict] = []
    groups: dict[tuple, list[tuple[tuple, dict]]] = {}
    for error in errors:
        loc = tuple(error["loc"])
        at = next((i for i, part in enumerate(loc) if _is_branch(part)), None)
        if at is None:
            out.append(dict(error))
            continue
        head = loc[:at]
        if head not in groups:
            groups[head] = []
            out.append({"type": "_union", "loc": head})  # its place in the order
        groups[head].append((loc[at + 1 :], dict(error)))
    result: list[dict] = []
    for error in out:
        if error["type"] != "_union":
            result.append(error)
            continue
        head, members = error["loc"], groups[error["loc"]]
        mismatched, fitting = [], []
        for rest, e in members:  # a type error at a member's root: the value is not its type
            if not rest and e["type"] in _TYPES:
                mismatched.append(e)
            else:
                fitting.append({**e, "loc": head + rest})
        if fitting:
            result.extend(collapse_unions(fitting))
        else:
            expected = list(dict.fromkeys(_TYPES[e["type"]] for e in mismatched))
            given = mismatched[0].get("input")
            result.append({"type": "union_type", "loc": head, "input": given, "ctx": {}})
            result[-1]["expected"] = expected
    return result


def _readable(errors: Iterable[Mapping[str, Any]]) -> list[dict]:
    """collapse_unions, and a content part of an unsupported type (image_url, input_audio,
    file, refusal) named once, by its type, not also by the fields such parts carry."""
    errors = collapse_unions(errors)
    parts = {
        tuple(e["loc"][:-1])
        for e in errors
        if e["type"] == "literal_error" and e["loc"][-1:] == ("type",) and "content" in e["loc"]
    }
    return [e for e in errors if tuple(e["loc"][:-1]) not in parts or e["loc"][-1] == "type"]


def first_param(errors: Iterable[Mapping[str, Any]]) -> str | None:
    """The field of the first problem, dotted (OpenAI's `param`); None for the whole body."""
    for error in _readable(errors):
        return ".".join(_path(error["loc"])) or None
    return None


def describe_validation(errors: Iterable[Mapping[str, Any]]) -> str:
    problems = list(dict.fromkeys(describe_error(e) for e in _readable(errors)))
    more = len(problems) - MAX_PROBLEMS
    shown = problems[:MAX_PROBLEMS] + ([f"and {more} more"] if more > 0 else [])
    return "invalid request: " + "; ".join(shown)
