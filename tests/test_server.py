"""The HTTP API end to end over a real loopback socket."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from model_store.loader import load_store
from tests.common import build_tiny_store
from tests.http_server import metric, running_server, wait_for


@pytest.fixture(scope="module")
def server(tiny_store):
    with running_server(load_store(tiny_store, "cpu", "float32")) as url:
        yield url


def body(**parameters) -> dict:
    return {"inputs": "How do I bake bread?", "parameters": {"max_new_tokens": 6, **parameters}}


def sse_events(response: httpx.Response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
    return events


def test_health_ready_info(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server}/ready").status_code == 200
    info = httpx.get(f"{server}/info").json()
    assert info["objectives"] == ["helpful", "harmless"]
    assert info["combination_matrix"] == [[0.7, 0.3], [0.3, 0.7]]
    assert info["alpha"] == 0.2 and "explicit" in info["guidance_modes"]
    assert info["limits"]["max_new_tokens"] == 512


def test_generate_and_stream_agree(server):
    request = body(preference={"helpful": 1.0}, guidance={"mode": "explicit", "gamma": 2.0})
    final = httpx.post(f"{server}/generate", json=request, timeout=30).json()
    assert final["details"]["finish_reason"] == "length"
    assert final["details"]["generated_tokens"] == 6
    assert final["details"]["preference"] == [1.0, 0.0]
    assert final["details"]["lambda"] == pytest.approx([1.75, -0.75])
    assert final["details"]["guidance"] == {"mode": "explicit", "gamma": 2.0}
    with httpx.stream("POST", f"{server}/generate_stream", json=request, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert len(events) == 6
    assert all(set(e["token"]) == {"id", "text", "logprob", "special"} for e in events)
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == final["generated_text"]
    assert "".join(e["token"]["text"] for e in events) == final["generated_text"]
    assert events[-1]["details"]["merge_cache_hit"] is True  # the /generate call built it


def test_chat_messages_use_the_template(server):
    response = httpx.post(
        f"{server}/generate",
        timeout=30,
        json={"messages": [{"role": "user", "content": "Hi"}], "parameters": {"max_new_tokens": 2}},
    )
    assert response.status_code == 200
    # <|user|> Hi <|end|> <|assistant|>: special tokens plus the content
    assert response.json()["details"]["prompt_tokens"] >= 4


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (body(max_new_tokens=9000), "`max_new_tokens` must be <= 512. Given: 9000"),
        (body(temperature=0), "`temperature` must be >= 0.01. Given: 0"),
        (body(top_p=1.5), "`top_p` must be <= 1. Given: 1.5"),
        (body(top_k=0), "`top_k` must be >= 1. Given: 0"),
        (body(preference=[1, 2, 3]), "`preference` must have 2 weights"),
        (body(preference=[1, -1]), "`preference.1` must be >= 0. Given: -1"),
        (body(preference={"funny": 1}), "unknown objective"),
        (body(preference=[0, 0]), "must not all be zero"),
        (body(guidance={"mode": "telepathy"}), "`guidance.mode` must be one of"),
        (body(guidance={"gamma": -1}), "`guidance.gamma` must be >= 0. Given: -1"),
        (body(stop=["a", "b", "c", "d", "e"]), "`stop` must have at most 4 items. Given: 5"),
        (body(colour="red"), "parameters.colour: Extra inputs are not permitted"),
        ({"inputs": "", "parameters": {}}, "`inputs` cannot be empty"),
        ({"inputs": "x", "messages": [{"role": "user", "content": "x"}]}, "exactly one of"),
        ({"inputs": "word " * 3000}, "`inputs` must have at most 2048 tokens. Given: "),
        ({"inputs": "x", "parameters": {"max_new_tokens": 256}}, "`max_new_tokens` must be <= 256"),
    ],
)
def test_bad_requests_get_422_with_a_message(server, payload, message):
    response = httpx.post(f"{server}/generate", json=payload, timeout=30)
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"
    assert message in response.json()["error"]


def test_malformed_json_is_422(server):
    response = httpx.post(
        f"{server}/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json() == {
        "error": "invalid request: body is not valid JSON",
        "error_type": "validation",
    }


def test_mode_missing_from_store_is_422(tmp_path):
    store = load_store(build_tiny_store(tmp_path / "s", value_kind=None), "cpu", "float32")
    with running_server(store) as url:
        response = httpx.post(f"{url}/generate", json=body(guidance={"mode": "explicit"}))
    assert response.status_code == 422
    assert "not available in this store" in response.json()["error"]


def test_not_ready_is_503(tmp_path, caplog):
    with running_server(None, wait_ready=False, store=str(tmp_path / "missing")) as url:
        assert wait_for(lambda: "failed" in httpx.get(f"{url}/ready").text)
        ready = httpx.get(f"{url}/ready")
        generate = httpx.post(f"{url}/generate", json=body())
        health = httpx.get(f"{url}/health")
    assert health.status_code == 503  # never ready: liveness fails too, so the pod restarts
    assert (
        health.json()["error"]
        == "unhealthy: the model store failed to load (the server log says why)"
    )
    assert ready.status_code == 503 and ready.json() == {
        "error": "not ready: the model store failed to load (the server log says why)",
        "error_type": "unavailable",
    }  # no filesystem path for unauthenticated clients: the reason is in the log
    assert f"{tmp_path / 'missing'}: store folder does not exist" in caplog.text
    assert generate.status_code == 503 and generate.json()["error_type"] == "unavailable"


def test_disconnect_frees_the_engine(tiny_store):
    with running_server(load_store(tiny_store, "cpu", "float32")) as url:
        long = body(max_new_tokens=200)
        with httpx.stream("POST", f"{url}/generate_stream", json=long, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert metric(url, "mage_running_requests") == 1
            assert next(lines) == ""  # SSE event separator; the stream is still open
        # the client closed the connection mid-stream
        assert wait_for(lambda: metric(url, "mage_running_requests") == 0)
        assert wait_for(lambda: metric(url, 'mage_requests_total{outcome="cancelled"}') == 1)
        assert metric(url, "mage_generated_tokens_total") < 200


def test_full_queue_answers_429(tiny_store):
    store = load_store(tiny_store, "cpu", "float32")
    with running_server(store, max_queue=1, max_running=1) as url:
        long = body(max_new_tokens=200)
        with httpx.stream("POST", f"{url}/generate_stream", json=long, timeout=30) as first:
            first_lines = first.iter_lines()  # kept alive: closing it closes the response
            assert next(first_lines).startswith("data: ")
            with httpx.stream("POST", f"{url}/generate_stream", json=long, timeout=30) as second:
                assert second.status_code == 200  # accepted, waiting in the queue
                assert metric(url, "mage_queue_size") == 1
                assert metric(url, "mage_running_requests") == 1
                third = httpx.post(f"{url}/generate", json=body(), timeout=30)
                assert third.status_code == 429
                assert third.json()["error_type"] == "overloaded"
                assert third.headers["retry-after"] == "1"  # seconds, as RFC 9110 has it
        assert wait_for(
            lambda: (
                metric(url, "mage_running_requests") == 0 and metric(url, "mage_queue_size") == 0
            )
        )
        assert metric(url, 'mage_requests_total{outcome="overloaded"}') == 1


def test_deadline_ends_request_with_error(tiny_store):
    store = load_store(tiny_store, "cpu", "float32")
    with running_server(store, request_timeout_s=0.2) as url:
        long = body(max_new_tokens=240)
        response = httpx.post(f"{url}/generate", json=long, timeout=30)
        assert response.status_code == 504
        assert response.json()["error_type"] == "timeout"
        with httpx.stream("POST", f"{url}/generate_stream", json=long, timeout=30) as stream:
            lines = list(stream.iter_lines())
        assert "event: error" in lines
        error = json.loads(next(x for x in reversed(lines) if x.startswith("data: "))[6:])
        assert error == {"error": "request exceeded its deadline", "error_type": "timeout"}


def test_metrics_are_exposed(server):
    httpx.post(f"{server}/generate", json=body(), timeout=30)
    text = httpx.get(f"{server}/metrics").text
    for name in (
        "mage_requests_total",
        "mage_request_duration_seconds_bucket",
        "mage_queue_time_seconds_bucket",
        "mage_time_to_first_token_seconds_bucket",
        "mage_inter_token_latency_seconds_bucket",
        "mage_generated_tokens_total",
        "mage_queue_size",
        "mage_running_requests",
        "mage_merge_cache_hits_total",
        "mage_merge_cache_misses_total",
        "mage_merge_cache_evictions_total",
        "mage_merge_latency_seconds_bucket",
    ):
        assert name in text, name
    assert metric(server, 'mage_requests_total{outcome="success"}') >= 1
    labels = set(re.findall(r'[{,](\w+)="', text))
    assert labels <= {"outcome", "le"}  # low cardinality: never a preference or prompt
