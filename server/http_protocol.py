"""uvicorn's h11 protocol with this server's error shape and a deadline for request headers.

uvicorn answers what it cannot parse as HTTP (a header line over `max_header_bytes`, an
obsolete folded header line, a NUL byte in a header) with a plain-text 400, and waits for
headers as long as a client keeps trickling bytes (slowloris). Here the first is answered
as {"error", "error_type": "bad_request"}, and a connection whose headers are not all in
`header_timeout_s` after it opened, or after its previous answer, gets a 408 in the same
shape and is closed. Both answers are written raw and the connection closed at once: h11
has no request to answer (or a broken one), so there is nothing left to keep alive.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.settings import ServerSettings

REASONS = {400: b"Bad Request", 408: b"Request Timeout"}


class ShapedH11Protocol(H11Protocol):
    """H11Protocol answering protocol errors in the error shape, with a header deadline."""

    header_timeout_s: float = 10.0
    """Set per server by `uvicorn_config` (a subclass per settings)."""
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()  # the next request on this connection gets its own

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        message = "invalid HTTP request: malformed, oversized or with bad bytes in its headers"
        self._answer_and_close(400, message, "bad_request")

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        # uvicorn starts a cycle once a request's headers are all in: none, or only the
        # previous one's, means this connection is still waiting for headers. (No h11
        # import: it is uvicorn's dependency, not this package's.)
        waiting_for_headers = self.cycle is None or self.cycle.response_complete
        if waiting_for_headers and not self.transport.is_closing():
            message = f"request headers not received within {self.header_timeout_s:g} s"
            self._answer_and_close(408, message, "timeout")

    def _answer_and_close(self, status: int, message: str, kind: str) -> None:
        body = json.dumps({"error": message, "error_type": kind}).encode()
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, REASONS[status], len(body))
        )
        self.transport.write(head + body)
        self.transport.close()


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """uvicorn's options for `settings`: the shaped protocol with its header deadline."""
    protocol = type(
        "ShapedH11Protocol", (ShapedH11Protocol,), {"header_timeout_s": settings.header_timeout_s}
    )
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "http": protocol,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }


def uvicorn_config(app: object, settings: ServerSettings) -> uvicorn.Config:
    """The uvicorn Config the tests' live servers run the app with (in a thread)."""
    return uvicorn.Config(app, **uvicorn_options(settings))  # type: ignore[arg-type]


def serve(app: object, settings: ServerSettings) -> None:
    """Serve `app` until stopped, as `mage serve` does: through uvicorn.run, so that what
    stands in for uvicorn.run (a test that must not bind a port) stands in here too."""
    uvicorn.run(app, **uvicorn_options(settings))  # type: ignore[arg-type]
