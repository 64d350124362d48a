"""What the HTTP server itself answers before the app runs: requests it cannot parse get
the error shape (not uvicorn's plain text), and headers that never finish get a 408."""

from __future__ import annotations

import json
import socket
import time

import pytest

from model_store.loader import load_store
from tests.http_server import serving


@pytest.fixture(scope="module")
def loaded(tiny_store):
    return load_store(tiny_store, "cpu", "float32")


def _exchange(url: str, raw: bytes, trickle: bytes = b"") -> bytes:
    """Send `raw`, then `trickle` a byte at a time; everything the server answers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(raw)
        for byte in trickle:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # the server closed the connection: it has answered
                break
            time.sleep(0.05)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _shaped(answer: bytes, status: int) -> dict:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)
    assert set(error) == {"error", "error_type"}
    return error


BAD_HEADERS = {
    "oversized": b"X-Big: " + b"a" * 20000 + b"\r\n",
    "line without a colon": b"X-Split a\r\n",
    "bare CR inside a line": b"X-Split: a\rb\r\n",
    "nul byte": b"X-Nul: a\x00b\r\n",
}


@pytest.mark.parametrize("header", list(BAD_HEADERS))
def test_unparsable_requests_get_the_error_shape(loaded, header):
    with serving(loaded, max_header_bytes=8192) as (url, _):
        raw = b"GET /health HTTP/1.1\r\nHost: x\r\n" + BAD_HEADERS[header] + b"\r\n"
        error = _shaped(_exchange(url, raw), 400)
        # Oversized headers not yet complete: the parser's own buffer limit.
        trickled = _shaped(_exchange(url, b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 9000), 400)
    assert error["error_type"] == "bad_request" and trickled["error_type"] == "bad_request"


def test_headers_that_never_finish_get_a_408(loaded):
    with serving(loaded, header_timeout_s=0.5) as (url, _):
        # A slowloris client: a byte every 50 ms, never the blank line that ends headers.
        answer = _exchange(url, b"POST /generate HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " * 200)
    error = _shaped(answer, 408)
    assert error == {"error": "request headers not received within 0.5 s", "error_type": "timeout"}


def test_the_header_deadline_does_not_cut_a_long_answer(loaded):
    with serving(loaded, header_timeout_s=0.3) as (url, state):
        step = state.engine.step
        state.engine.step = lambda: (time.sleep(0.02), step())
        body = json.dumps({"inputs": "Hi", "parameters": {"max_new_tokens": 60}}).encode()
        raw = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        raw += b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        answer = _exchange(url, raw)  # 60 steps of 20 ms: well past the header deadline
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["details"]["generated_tokens"] == 60


def test_mage_serve_runs_the_shaped_protocol(monkeypatch):
    """serve() hands uvicorn.run the shaped protocol with the settings' header limits."""
    from server.http_protocol import ShapedH11Protocol, serve
    from server.settings import ServerSettings

    seen = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **options: seen.update(options, app=app))
    serve("app", ServerSettings(header_timeout_s=2.5, max_header_bytes=4096, port=1234))
    assert seen["app"] == "app" and seen["port"] == 1234
    assert issubclass(seen["http"], ShapedH11Protocol) and seen["http"].header_timeout_s == 2.5
    assert seen["h11_max_incomplete_event_size"] == 4096
