"""Pure ASGI middleware: API keys and the request-body byte limit.

Both answer before FastAPI parses anything: an unauthenticated client cannot make the
server read, parse or tokenise its body, and an oversized body is refused from its
Content-Length alone (or, for a chunked body, as soon as the running count passes the
limit), never buffered whole.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response

Reject = Callable[[str], None]
"""Called with the error_type of every request a middleware refuses (for metrics)."""


class ApiKeyMiddleware:
    """Every path but `open_paths` needs `Authorization: Bearer <one of keys>`.

    Default-deny: routes added later (a /v1/* API, /docs, unknown paths) are protected
    without being listed, and a client without a key learns nothing about which exist.
    """

    def __init__(
        self, app: ASGIApp, keys: Sequence[bytes], open_paths: frozenset[str], on_reject: Reject
    ) -> None:
        self.app, self.keys, self.open_paths, self.on_reject = app, keys, open_paths, on_reject

    def _authorised(self, scope: Scope) -> bool:
        headers = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(headers) != 1:  # none, or two (which would win is for nobody to guess): refused
            return False
        scheme, _, token = headers[0].partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False
        # Compare against every key, without stopping at a match, in constant time per key:
        # how long this takes says nothing about which key (or how much of one) matched.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(token, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        self.on_reject("unauthorized")
        response = error_response(
            401,
            "missing or invalid API key: send the header `Authorization: Bearer <key>`",
            "unauthorized",
            {"WWW-Authenticate": "Bearer"},
            path=scope["path"],
        )
        await response(scope, receive, send)


class HeaderLimitMiddleware:
    """Refuse a request whose request line and headers are over `max_bytes` with 400.

    The HTTP parser limits only headers that arrive in pieces (what it must buffer); a
    block that arrives whole is parsed whatever its size, so the limit is checked here too.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Reject) -> None:
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            line = len(scope["method"]) + len(scope.get("raw_path") or b"") + 12
            size = line + sum(len(k) + len(v) + 4 for k, v in scope["headers"])
            if size > self.max_bytes:
                self.on_reject("validation")
                message = f"request line and headers are larger than {self.max_bytes} bytes"
                response = error_response(
                    400, message, "bad_request", {"Connection": "close"}, path=scope["path"]
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413, then hand the app the body read."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Reject) -> None:
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.on_reject("payload_too_large")
        response = error_response(
            413,
            f"request body is larger than {self.max_bytes} bytes",
            "payload_too_large",
            # The unread rest of the body is still on the wire: the connection cannot be
            # reused, and saying so lets the client stop sending.
            {"Connection": "close"},
            path=scope["path"],
        )
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client gone before the body arrived
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: bytes | None = b"".join(chunks)

        async def replay() -> Message:
            # The body once, then the real channel (for http.disconnect while streaming).
            nonlocal body
            if body is not None:
                message, body = {"type": "http.request", "body": body, "more_body": False}, None
                return message
            return await receive()

        await self.app(scope, replay, send)
