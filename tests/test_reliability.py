"""Requests nobody waits for: a dropped non-streaming client stops its generation within a
step, a request that passes its deadline in the queue leaves the queue at once, and every
request is counted exactly once."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time

import httpx
import pytest

from guidance.engine import Engine, EngineConfig, EngineObserver
from guidance.requests import ErrorEvent, RequestHandle
from model_store.loader import load_store
from tests.common import make_request
from tests.http_server import metric, serving, wait_for

STEP_DELAY_S = 0.02
"""Each engine step is slowed by this much in the HTTP tests, so a 240-token generation
lasts seconds whatever the machine: what is tested is who stops it, not how fast it runs."""


@pytest.fixture(scope="module")
def loaded(tiny_store):
    return load_store(tiny_store, "cpu", "float32")


def slow_steps(state) -> None:
    step = state.engine.step

    def slowed() -> None:
        time.sleep(STEP_DELAY_S)
        step()

    state.engine.step = slowed


def _generated(state) -> int:
    """Tokens generated so far by the running request (the metric counts them at the end)."""
    return sum(seq.generated for seq in list(state.engine.decoding.members))


ROUTES = {
    "/generate": {"inputs": "How do I bake bread?", "parameters": {"max_new_tokens": 240}},
    "/v1/completions": {"prompt": "How do I bake bread?", "max_tokens": 240},
}


def _send_raw(url: str, path: str, payload: dict) -> socket.socket:
    """A non-streaming POST over a raw socket, so the test can drop the connection."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(payload).encode()
    sock = socket.create_connection((host, int(port)))
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("path", list(ROUTES))
def test_a_dropped_non_streaming_client_stops_its_generation(loaded, path):
    with serving(loaded, max_new_tokens=512) as (url, state):
        slow_steps(state)
        sock = _send_raw(url, path, ROUTES[path])
        assert wait_for(lambda: _generated(state) >= 5)
        assert metric(url, "mage_running_requests") == 1
        sock.close()  # the client gives up while tokens are flowing
        at_close = _generated(state)
        assert wait_for(lambda: metric(url, "mage_running_requests") == 0)
        generated = metric(url, "mage_generated_tokens_total")  # counted as it finished
        # Noticed at the request's next event: within a step or two, not 240 tokens later.
        assert generated - at_close <= 3, (at_close, generated)
        assert metric(url, 'mage_requests_total{outcome="cancelled"}') == 1
        assert metric(url, 'mage_requests_total{outcome="success"}') == 0


class Outcomes(EngineObserver):
    def __init__(self) -> None:
        self.outcomes: list[str] = []

    def finished(self, outcome: str, seconds: float, generated: int, running: int) -> None:
        self.outcomes.append(outcome)


def test_a_request_past_its_deadline_leaves_the_queue_at_once(loaded):
    observer = Outcomes()
    engine = Engine(loaded, EngineConfig(max_running=1), observer)
    events: dict[str, list] = {"long": [], "late": []}
    long = make_request(loaded, "Hi", max_new=40, name="long")
    late = dataclasses.replace(
        make_request(loaded, "Hi", max_new=4, name="late"), deadline=time.monotonic() - 1.0
    )
    engine.submit(RequestHandle(long, events["long"].append, time.monotonic()))
    engine.step()  # the long request takes the only slot
    engine.submit(RequestHandle(late, events["late"].append, time.monotonic()))
    assert engine.queue_size == 1  # waiting behind it, already past its deadline
    engine.step()
    assert engine.queue_size == 0 and engine.running == 1  # gone from the queue, not admitted
    assert events["late"] == [ErrorEvent("request exceeded its deadline", "timeout")]
    while engine._busy():
        engine.step()
    assert sorted(observer.outcomes) == ["success", "timeout"]  # each counted once


def test_a_cancelled_queued_request_leaves_the_queue_at_once(loaded):
    """A client that goes away while queued frees its queue place (mage_queue_size, the
    autoscaler's signal) at the next step, not when a slot would have taken it."""
    observer, ignore = Outcomes(), lambda event: None
    engine = Engine(loaded, EngineConfig(max_running=1), observer)
    engine.submit(RequestHandle(make_request(loaded, "Hi", max_new=40), ignore, time.monotonic()))
    engine.step()  # the only slot is taken
    gone = RequestHandle(make_request(loaded, "Hi", max_new=4), ignore, time.monotonic())
    engine.submit(gone)
    gone.cancel()
    engine.step()
    assert engine.queue_size == 0 and engine.running == 1
    assert observer.outcomes == ["cancelled"]


def test_the_http_layer_never_counts_what_the_engine_counts(loaded, caplog):
    """Every request sent is one sample of mage_requests_total, whichever side ends it:
    some finish, some pass their deadline running, some in the queue. A healthy engine
    answers each deadline itself, so the HTTP layer's fallback never speaks."""
    caplog.set_level(logging.WARNING, logger="mage.server")
    with serving(loaded, max_running=1, request_timeout_s=0.6) as (url, state):
        slow_steps(state)
        payloads = [{"inputs": "Hi", "parameters": {"max_new_tokens": n}} for n in (2, 240, 240)]
        payloads += [{"prompt": "Hi", "max_tokens": 240, "n": 2}]
        answers: list[int] = []

        def send(payload: dict) -> None:
            path = "/v1/completions" if "prompt" in payload else "/generate"
            answers.append(httpx.post(f"{url}{path}", json=payload, timeout=30).status_code)

        send(payloads[0])  # alone: it finishes
        threads = [threading.Thread(target=send, args=(p,)) for p in payloads[1:]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(answers) == [200, 504, 504, 504]
        assert wait_for(lambda: metric(url, "mage_running_requests") == 0)
        assert wait_for(lambda: metric(url, "mage_queue_size") == 0)
        assert metric(url, "mage_requests_total") == len(payloads)
        assert metric(url, 'mage_requests_total{outcome="timeout"}') == 3
        assert metric(url, 'mage_requests_total{outcome="cancelled"}') == 0
    assert "no answer from the engine" not in caplog.text


def test_a_request_the_http_layer_gives_up_on_is_counted_once(loaded):
    """An engine whose steps outlast the deadline and its grace: the HTTP layer answers 504
    and counts the timeout, and the engine, finishing the request later, counts nothing."""
    with serving(loaded, request_timeout_s=0.2) as (url, state):
        step = state.engine.step
        state.engine.step = lambda: (time.sleep(0.8), step())  # > 0.2 s deadline + 0.5 s grace
        finished, finish = threading.Event(), state.engine._finish_handle
        state.engine._finish_handle = lambda *a: (finish(*a), finished.set())
        payload = {"inputs": "Hi", "parameters": {"max_new_tokens": 3}}
        response = httpx.post(f"{url}/generate", json=payload, timeout=30)
        assert response.status_code == 504 and response.json()["error_type"] == "timeout"
        assert finished.wait(30)  # the engine has ended the request too, and counted or not
        assert metric(url, "mage_requests_total") == 1
        assert metric(url, 'mage_requests_total{outcome="timeout"}') == 1
