"""Request ids: the X-Request-Id of every response, and the running requests by id.

As vLLM's `--enable-request-id-headers` does, every response carries `X-Request-Id`: the
client's own when it sent one (1 to 128 characters of letters, digits and `._~:-`, so that
it fits a URL path and a log line as is), else one the server makes (a uuid4 in hex). An
OpenAI answer's `id` is the same text: the client's id as sent, or `chatcmpl-<hex>` /
`cmpl-<hex>`. A client id outside that alphabet is not refused but replaced, and the
header says by what. The id names the request to POST /v1/requests/{id}/preference
(server.steering).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable

from fastapi import Request
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guidance.requests import RequestHandle

REQUEST_ID_HEADER = "X-Request-Id"
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._~:-]{1,128}")
"""The ids a client may choose; others are replaced by a server-made one."""
_ID, _GIVEN = "request_id", "request_id_given"
"""Where the middleware leaves the id (and whether the client chose it) in scope["state"]."""


class RequestIdMiddleware:
    """Give every HTTP request an id and send it back in X-Request-Id, whatever answers
    (a route, an error handler, or another middleware's refusal)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = [v for k, v in scope["headers"] if k == REQUEST_ID_HEADER.lower().encode()]
        text = sent[0].decode("latin-1") if len(sent) == 1 else ""
        given = CLIENT_REQUEST_ID.fullmatch(text) is not None
        state = scope.setdefault("state", {})
        state[_ID], state[_GIVEN] = (text if given else uuid.uuid4().hex), given

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Read now, not before the app ran: an OpenAI route prefixes a made-up id.
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = state[_ID]
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id(http: Request, prefix: str = "") -> str:
    """This request's id, as its X-Request-Id header will say: the client's, else the
    server's with `prefix` (OpenAI's `chatcmpl-`, `cmpl-`)."""
    state = http.scope.setdefault("state", {})
    if _ID not in state:  # an app built without the middleware (never by create_app)
        state[_ID], state[_GIVEN] = uuid.uuid4().hex, False
    if prefix and not state[_GIVEN] and not state[_ID].startswith(prefix):
        state[_ID] = prefix + state[_ID]
    return state[_ID]


def caller(http: Request, keyed: bool) -> str:
    """Who sent a request, as far as the server can tell: with API keys (`keyed`), a digest
    of the bearer key the key middleware accepted; without, nobody in particular ("")."""
    if not keyed:
        return ""
    _, _, token = http.headers.get("authorization", "").partition(" ")
    return hashlib.sha256(token.strip().encode()).hexdigest()


class LiveRequests:
    """Running requests by (caller, id): what a preference change can reach. An id names
    every engine request it started (an OpenAI request's n choices; two requests sent
    with the same client id). Entries go once all their requests have ended. Used from the
    event loop only, so it needs no lock."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], list[RequestHandle]] = {}

    def __len__(self) -> int:
        self._prune()
        return len(self._entries)

    def add(self, owner: str, request_id: str, handles: Iterable[RequestHandle]) -> None:
        self._prune()
        self._entries.setdefault((owner, request_id), []).extend(handles)

    def running(self, owner: str, request_id: str) -> list[RequestHandle]:
        """The requests of this caller under this id that have not ended (none: [])."""
        self._prune()
        return [h for h in self._entries.get((owner, request_id), []) if not h.ended]

    def _prune(self) -> None:
        ended = [key for key, handles in self._entries.items() if all(h.ended for h in handles)]
        for key in ended:
            del self._entries[key]
