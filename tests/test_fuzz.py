"""Property-based fuzzing of the whole HTTP API from its own /openapi.json, in every
`make test` (benchmarks/fuzz.py runs the same checks with many more examples)."""

from __future__ import annotations

from benchmarks.fuzz import body_problems, fuzz
from model_store.loader import load_store
from tests.http_server import running_server

EXAMPLES = 120
"""Per operation and mode (schema-valid, schema-violating): five generating operations (TGI's
three, OpenAI's two), about 1200 requests, 20-30 s on an otherwise idle 2-core CPU,
1-2 minutes when other jobs share it."""


def test_checks_catch_what_they_are_for():
    # Without these the fuzz test below could pass against a broken server.
    assert body_problems(500, "application/json", b'{"error": "x", "error_type": "y"}')
    assert body_problems(422, "application/json", b'{"detail": []}')
    assert body_problems(200, "application/json", b'{"logprob": NaN}')
    assert body_problems(200, "text/event-stream", b'data: {"logprob": -Infinity}\n\n')
    assert body_problems(200, "text/event-stream", b'event: error\ndata: {"detail": "x"}\n\n')
    assert body_problems(500, "text/plain", b"Internal Server Error")
    ok = b'data: {"token": {"logprob": null}}\n\n'
    ok += b'event: error\ndata: {"error": "x", "error_type": "timeout"}\n\n'
    assert body_problems(200, "text/event-stream", ok) == []
    assert (
        body_problems(422, "application/json", b'{"error": "x", "error_type": "validation"}') == []
    )
    # /v1 routes: OpenAI's shape, and only it
    openai = b'{"error": {"message": "x", "type": "invalid_request_error", "param": null, '
    openai += b'"code": "validation"}}'
    assert body_problems(422, "application/json", openai, openai=True) == []
    assert body_problems(422, "application/json", openai)
    assert body_problems(422, "application/json", b'{"error": "x", "error_type": "v"}', openai=True)
    assert body_problems(200, "text/event-stream", b'data: {"error": "x"}\n\n', openai=True)
    assert body_problems(200, "text/event-stream", b"data: [DONE]\n\n", openai=True) == []


def test_fuzzed_requests_get_documented_strict_answers(tiny_store):
    store = load_store(tiny_store, "cpu", "float32")
    # A key, so that every request also passes the auth middleware; short generations.
    with running_server(store, max_new_tokens=3, api_key=["fuzz-key"]) as url:
        report = fuzz(url, EXAMPLES, api_key="fuzz-key", derandomize=True)
    assert report.failures == [], "\n".join(report.failures[:5])
    summary = report.summary()
    assert summary["requests"] >= 4 * EXAMPLES
    assert summary["status_codes"].get("200", 0) >= EXAMPLES // 2  # generation really ran
    assert summary["status_codes"].get("422", 0) >= EXAMPLES  # and bad bodies were sent
