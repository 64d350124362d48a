"""Requests nobody waits for: a dropped non-streaming client stops its generation within a
step, a request that passes its deadline in the queue leaves the queue at once, one abandoned
mid-prefill leaves without harming the others, and every request is counted exactly once,
with gauges read from the engine's own state."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time

import httpx
import pytest

import guidance.engine as engine_module
from guidance.batch import Batch
from guidance.engine import DEADLINE_PASSED, Engine, EngineConfig, EngineObserver, QueueFullError
from guidance.requests import (
    ErrorEvent,
    GenerationRequest,
    RequestHandle,
    SamplingParams,
    TokenEvent,
)
from model_store.loader import load_store
from server.relay import submit_all
from tests.common import make_request
from tests.http_server import metric, serving, wait_for
from tests.simulation import Clock

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


# --- a request abandoned mid-prefill, refused fan-outs, gauges from the engine's state ---------


def _no_engine_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mage.engine" and r.levelno >= 40]


def _long_request(loaded, tokens: int, **changes) -> GenerationRequest:
    """A prompt of `tokens` tokens (the tiny model has 256 positions)."""
    base = make_request(loaded, "Merge and guide", mode="implicit-ensemble", max_new=16, name="b")
    words = loaded.tokenizer(" ".join(f"river{k} mountain{k % 7}" for k in range(60)))
    prompt = tuple(words["input_ids"][:tokens])
    assert len(prompt) == tokens
    return dataclasses.replace(base, prompt_ids=prompt, **changes)


@pytest.mark.parametrize("how", ["cancelled", "timeout"])
def test_a_request_abandoned_mid_prefill_leaves_the_others_running(loaded, caplog, how):
    """The whole prefilling group is gone (its client left, or its deadline passed) while
    its prompt is half prefilled: it leaves, and the running request goes on as if alone."""
    caplog.set_level(logging.ERROR, logger="mage.engine")
    clock, observer = Clock(), Outcomes()
    engine = Engine(loaded, EngineConfig(prefill_tokens=8, clock=clock), observer)
    a = make_request(loaded, "Once upon a time", mode="none", max_new=30, name="a")
    events: dict[str, list] = {"a": [], "b": []}
    engine.submit(RequestHandle(a, events["a"].append, clock()))
    for _ in range(5):
        engine.step()
    b = _long_request(loaded, 64, deadline=clock() + 5.5 if how == "timeout" else None)
    handle = RequestHandle(b, events["b"].append, clock())
    engine.submit(handle)
    engine.step()
    assert engine.prefilling is not None and engine.prefilling.prefill_left > 0  # mid-prefill
    if how == "cancelled":
        handle.cancel()
    else:
        clock.now += 10.0
    for _ in range(100):
        if not engine._busy():
            break
        engine.step()
    alone = Engine(loaded).run_to_completion(a)
    assert [e.id for e in events["a"]] == [e.id for e in alone]
    assert [e.logprob for e in events["a"]] == pytest.approx([e.logprob for e in alone], abs=1e-4)
    assert events["b"] == ([] if how == "cancelled" else [ErrorEvent(DEADLINE_PASSED, "timeout")])
    assert sorted(observer.outcomes) == sorted([how, "success"])
    assert engine.running == engine.queue_size == engine.kv_bytes() == 0
    assert _no_engine_errors(caplog) == []


def test_a_client_gone_during_a_long_prefill_does_not_end_another_stream(loaded, caplog):
    """The HTTP reproducer: stream A runs; B sends a long prompt and closes its socket while
    the prompt is being prefilled in small chunks. A streams to its end."""
    caplog.set_level(logging.ERROR, logger="mage.engine")
    with serving(loaded, prefill_tokens=2, max_new_tokens=512) as (url, state):
        slow_steps(state)
        stream = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 120}}
        stream["parameters"]["guidance"] = {"mode": "none"}
        long_ids = _long_request(loaded, 100).prompt_ids
        long = {"inputs": loaded.tokenizer.decode(long_ids), "parameters": {"max_new_tokens": 16}}
        finals: list[dict] = []

        def run_a() -> None:
            with httpx.stream("POST", f"{url}/generate_stream", json=stream, timeout=60) as a:
                lines = [line for line in a.iter_lines() if line.startswith("data:")]
            finals.append(json.loads(lines[-1].removeprefix("data:")))

        thread = threading.Thread(target=run_a)
        thread.start()
        assert wait_for(lambda: _generated(state) >= 5)
        sock = _send_raw(url, "/generate", long)
        assert wait_for(lambda: (group := state.engine.prefilling) is not None and group.cursor)
        sock.close()  # gone with its prompt half prefilled
        thread.join(60)
        assert finals and finals[0]["details"]["generated_tokens"] == 120, finals
        assert wait_for(lambda: metric(url, 'mage_requests_total{outcome="cancelled"}') == 1)
        assert metric(url, 'mage_requests_total{outcome="success"}') == 1
        assert metric(url, "mage_requests_total") == 2
        assert wait_for(lambda: metric(url, "mage_running_requests") == 0)
    assert _no_engine_errors(caplog) == []


def test_a_refused_fan_out_is_counted_once_by_whoever_refuses_it(loaded):
    """Queued choices of a request refused half-way are dropped without a count of their
    own: the 429 is that request's one outcome."""
    observer = Outcomes()
    engine = Engine(loaded, EngineConfig(max_queue=0, max_running=1), observer)
    ignore = lambda event: None  # noqa: E731
    request = make_request(loaded, "Hi", max_new=4)
    choices = [RequestHandle(request, ignore, time.monotonic(), counted=i == 0) for i in range(2)]
    with pytest.raises(QueueFullError):
        submit_all(engine, choices)
    assert choices[0].cancelled.is_set()
    while engine._busy():
        engine.step()
    assert observer.outcomes == []
    assert engine.queue_size == engine.running == 0


def test_outcomes_and_gauges_add_up_after_fan_outs_and_refusals(loaded):
    """One n=2 request leaves the running gauge at 0; a fan-out refused half-way is one
    `overloaded` outcome, and the gauges return to 0 when the server is idle."""
    with serving(loaded, max_running=1, max_queue=3) as (url, state):
        small = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "n": 2, "max_tokens": 4})
        assert small.status_code == 200
        assert wait_for(lambda: metric(url, "mage_requests_total") == 1)
        assert metric(url, "mage_running_requests") == 0
        slow_steps(state)
        answers: list[int] = []
        big = {"prompt": "Hi", "n": 3, "max_tokens": 40}
        thread = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{url}/v1/completions", json=big, timeout=60).status_code
            )
        )
        thread.start()
        assert wait_for(lambda: state.engine._accepted == 3)  # 3 of the 4 places
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "n": 2})
        assert refused.status_code == 429  # its first choice was queued, its second refused
        thread.join(60)
        assert answers == [200]
        assert wait_for(lambda: metric(url, "mage_running_requests") == 0)
        assert metric(url, "mage_queue_size") == metric(url, "mage_kv_cache_bytes") == 0
        assert metric(url, 'mage_requests_total{outcome="success"}') == 2
        assert metric(url, 'mage_requests_total{outcome="overloaded"}') == 1
        assert metric(url, "mage_requests_total") == 3


# --- faults stay with the request they belong to ------------------------------------------


def _same_as_alone(loaded, request, events) -> None:
    alone = Engine(loaded).run_to_completion(request)
    assert isinstance(events[-1], TokenEvent) and events[-1].details is not None, events[-1]
    assert [e.id for e in events] == [e.id for e in alone]
    assert [e.logprob for e in events] == pytest.approx([e.logprob for e in alone], abs=1e-4)


def test_a_request_whose_sampling_breaks_fails_alone(loaded, monkeypatch):
    """The batched guide-and-sample pass fails because of one request's row: that pass is
    retried request by request, and only the request whose row breaks fails."""
    original = engine_module.choose_tokens

    def broken(scores, params, *args, **kwargs):
        if any(p.top_k == 7 for p in params):
            raise RuntimeError("injected sampling failure")
        return original(scores, params, *args, **kwargs)

    monkeypatch.setattr(engine_module, "choose_tokens", broken)
    bad = make_request(loaded, "Hi", sampling=SamplingParams(temperature=1.0, top_k=7, seed=1))
    good = [make_request(loaded, p, mode=m) for p, m in (("Hi", "none"), ("Merge", "implicit"))]
    results = Engine(loaded).run_all([good[0], bad, good[1]])
    assert isinstance(results[1][-1], ErrorEvent) and "injected" in results[1][-1].message
    monkeypatch.setattr(engine_module, "choose_tokens", original)
    for request, events in zip(good, (results[0], results[2]), strict=True):
        _same_as_alone(loaded, request, events)


def test_a_failure_freeing_an_abandoned_prefill_harms_no_other_request(loaded, monkeypatch):
    """Freeing the KV of a request abandoned mid-prefill raises: that is its own
    bookkeeping, so the running request goes on as if alone and the engine drains to 0."""
    original, failures = Batch.keep, []

    def keep_failing_once(self, index):
        if self.prefill_left and not failures:
            failures.append(index)
            raise RuntimeError("injected bookkeeping failure")
        return original(self, index)

    observer = Outcomes()
    engine = Engine(loaded, EngineConfig(prefill_tokens=8), observer)
    a = make_request(loaded, "Once upon a time", mode="none", max_new=20, name="a")
    events: list[list] = [[], []]
    engine.submit(RequestHandle(a, events[0].append, time.monotonic()))
    while not engine.decoding:  # a's prompt is prefilled in chunks too
        engine.step()
    gone = RequestHandle(_long_request(loaded, 60), events[1].append, time.monotonic())
    engine.submit(gone)
    engine.step()
    assert engine.prefilling is not None and engine.prefilling.prefill_left
    monkeypatch.setattr(Batch, "keep", keep_failing_once)
    gone.cancel()
    while engine._busy():
        engine.step()
    monkeypatch.setattr(Batch, "keep", original)
    assert failures == [[]] and events[1] == []
    _same_as_alone(loaded, a, events[0])
    assert sorted(observer.outcomes) == ["cancelled", "success"]
    assert engine.running == engine.queue_size == engine.kv_bytes() == engine._accepted == 0


def test_a_callback_that_raises_ends_only_its_own_request(loaded):
    """The HTTP side's callback of one request raises: that request ends, the others go
    on, and the engine's count of accepted requests returns to 0."""
    requests = [make_request(loaded, "Hi", name=f"r{i}") for i in range(3)]
    events: list[list] = [[], [], []]

    def broken(event) -> None:
        raise RuntimeError("injected callback failure")

    engine = Engine(loaded)
    for i, request in enumerate(requests):
        engine.submit(RequestHandle(request, broken if i == 1 else events[i].append, 0.0))
    while engine._busy():
        engine.step()
    for i in (0, 2):
        _same_as_alone(loaded, requests[i], events[i])
    assert engine._accepted == engine.running == 0


def test_after_a_failed_shared_step_the_engine_serves_the_next_request(loaded, monkeypatch):
    """A failure outside every per-request guard reaches the engine loop's catch-all: the
    requests running then fail, and the engine thread carries on."""
    engine = Engine(loaded)
    original, failures = engine._forward, []

    def forward_failing_once():
        if not failures:
            failures.append(1)
            raise RuntimeError("injected shared failure")
        return original()

    monkeypatch.setattr(engine, "_forward", forward_failing_once)
    engine.start()
    try:
        first, second = [], []
        request = make_request(loaded, "Hi", max_new=4)
        engine.submit(RequestHandle(request, first.append, time.monotonic()))
        assert wait_for(lambda: bool(first))
        assert isinstance(first[-1], ErrorEvent) and "injected shared failure" in first[-1].message
        engine.submit(RequestHandle(request, second.append, time.monotonic()))
        assert wait_for(lambda: bool(second) and second[-1].details is not None)
        _same_as_alone(loaded, request, second)
    finally:
        engine.stop()
