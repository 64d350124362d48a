"""The serving engine under concurrency: one batched forward per step for mixed preferences,
modes and merge methods, joins and leaves, chunked prefill, admission limits, and faults
that stay with their request."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

import guidance.engine as engine_module
from guidance.engine import Engine, EngineConfig, QueueFullError
from guidance.requests import (
    ErrorEvent,
    GenerationRequest,
    RequestHandle,
    SamplingParams,
    TokenEvent,
)
from model_store.loader import load_store
from tests.common import make_request

MODES = ("none", "explicit", "explicit-ensemble", "implicit", "implicit-ensemble")
PROMPTS = (
    "How do I bake bread?",
    "Hi",
    "Tell me a long story about a dragon and a knight",
    "naïve café",
    "Merge and guide",
)


@pytest.fixture(scope="module")
def store(tiny_store):
    return load_store(tiny_store, "cpu", "float32")


request = make_request


def ids_of(events) -> list[int]:
    assert isinstance(events[-1], TokenEvent), events[-1]
    return [event.id for event in events]


def alone(store, req: GenerationRequest) -> list[int]:
    return ids_of(Engine(store).run_to_completion(req))


def mixed_requests(store) -> list[GenerationRequest]:
    """Eight requests: eight preferences, every mode, two merge methods, five prompt lengths."""
    mus = [(1.0, 0.0), (0.9, 0.1), (0.7, 0.3), (0.55, 0.45), (0.4, 0.6), (0.2, 0.8), (0.1, 0.9)]
    mus.append((0.0, 1.0))
    return [
        request(
            store,
            PROMPTS[i % len(PROMPTS)],
            mu,
            MODES[i % len(MODES)],
            max_new=4 + i,
            method="rewarded-soup" if i == 3 else "bone-soup",
            gamma=2.0,
            name=f"r{i}",
        )
        for i, mu in enumerate(mus)
    ]


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_preferences_equal_each_request_alone(store, mode):
    mus = [(1.0, 0.0), (0.3, 0.7), (0.5, 0.5), (0.0, 1.0), (0.8, 0.2)]
    reqs = [request(store, p, mu, mode, gamma=2.0) for p, mu in zip(PROMPTS, mus, strict=True)]
    together = Engine(store).run_all(reqs)
    assert [ids_of(events) for events in together] == [alone(store, r) for r in reqs]


def test_mixed_modes_and_merge_methods_in_one_batch(store):
    reqs = mixed_requests(store)
    together = Engine(store).run_all(reqs)
    assert [ids_of(events) for events in together] == [alone(store, r) for r in reqs]


def count_base_forwards(store, monkeypatch) -> list[int]:
    """Record the rows of every forward of the shared base."""
    decoder = store.model.get_decoder()
    calls: list[int] = []
    original = decoder.forward

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", counted)
    return calls


def test_one_base_forward_per_decode_step(store, monkeypatch):
    reqs = mixed_requests(store)[:5]  # modes none .. implicit-ensemble: 1+2+3+2+4 rows
    engine = Engine(store)
    for req in reqs:
        engine.submit(RequestHandle(req, lambda e: None, time.monotonic()))
    engine.step()  # admits all five and prefills them together
    calls = count_base_forwards(store, monkeypatch)
    engine.step()
    assert calls == [12]  # every sequence's every row in one forward


def test_joins_and_leaves_mid_generation(store):
    """Requests arrive while others decode and finish at different lengths; a neighbour is
    cancelled; nobody's tokens change."""
    reqs = mixed_requests(store)
    engine = Engine(store)
    events: dict[str, list] = {r.request_id: [] for r in reqs}
    handles = {}

    def submit(req):
        handles[req.request_id] = RequestHandle(
            req, events[req.request_id].append, time.monotonic()
        )
        engine.submit(handles[req.request_id])

    for req in reqs[:3]:
        submit(req)
    for _ in range(3):
        engine.step()
    submit(reqs[3])
    submit(reqs[4])
    engine.step()
    handles["r4"].cancel()  # a neighbour leaves mid-generation
    for _ in range(2):
        engine.step()
    for req in reqs[5:]:
        submit(req)
    while engine._busy():
        engine.step()
    for req in reqs:
        if req.request_id == "r4":
            assert not events["r4"] or events["r4"][-1].details is None  # cut off, no final
            continue
        assert ids_of(events[req.request_id]) == alone(store, req), req.request_id


def test_seeded_sampling_is_reproducible_whatever_the_batch(store):
    sampled = request(
        store, PROMPTS[0], (0.4, 0.6), "explicit", 10, SamplingParams(1.3, 40, 0.9, seed=11)
    )
    lone = alone(store, sampled)
    neighbours = [
        request(store, PROMPTS[1], (1, 0), "implicit", 6),
        request(store, PROMPTS[2], (0.2, 0.8), "none", 9, SamplingParams(0.7, seed=3)),
    ]
    together = Engine(store).run_all([neighbours[0], sampled, neighbours[1]])
    assert ids_of(together[1]) == lone
    other_seed = request(
        store, PROMPTS[0], (0.4, 0.6), "explicit", 10, SamplingParams(1.3, 40, 0.9, seed=12)
    )
    assert alone(store, other_seed) != lone


def test_chunked_prefill_keeps_running_streams_going(store):
    """A long prompt is prefilled in chunks under the budget while a stream decodes."""
    config = EngineConfig(prefill_tokens=8)
    engine = Engine(store, config)
    short = request(store, "Hi", (0.5, 0.5), "none", 100)
    long = request(store, " ".join(PROMPTS * 3), (0.2, 0.8), "explicit", 5)
    stream: list = []
    engine.submit(RequestHandle(short, stream.append, time.monotonic()))
    engine.step()  # short prefilled, first token
    other: list = []
    engine.submit(RequestHandle(long, other.append, time.monotonic()))
    steps_until_first = 0
    while not other:
        engine.step()
        steps_until_first += 1
    prompt_rows = 2 * len(long.prompt_ids)  # explicit: policy + value row
    assert steps_until_first >= prompt_rows // 8  # it really was chunked
    assert len(stream) >= steps_until_first  # one token of the stream per step meanwhile
    while engine._busy():
        engine.step()
    assert ids_of(stream) == alone(store, short)
    assert ids_of(other) == alone(store, long)


def test_standalone_value_models_share_one_lane_per_model(standalone_store, monkeypatch):
    store = load_store(standalone_store, "cpu", "float32")
    reqs = [
        request(store, PROMPTS[0], (0.6, 0.4), "explicit-ensemble", 6, gamma=3.0),
        request(store, PROMPTS[1], (0.3, 0.7), "explicit-ensemble", 6, gamma=3.0),
        request(store, PROMPTS[2], (0.3, 0.7), "explicit", 6, gamma=3.0),
    ]
    together = Engine(store).run_all(reqs)
    assert [ids_of(events) for events in together] == [alone(store, r) for r in reqs]
    engine = Engine(store)
    for req in reqs[:2]:
        engine.submit(RequestHandle(req, lambda e: None, time.monotonic()))
    engine.step()
    calls = {i: 0 for i in range(2)}
    for i, model in enumerate(store.standalone_values):
        decoder = model.get_decoder()
        original = decoder.forward

        def counted(*args, _i=i, _f=original, **kwargs):
            calls[_i] += 1
            assert kwargs["input_ids"].shape[0] == 2  # both sequences in one forward
            return _f(*args, **kwargs)

        monkeypatch.setattr(decoder, "forward", counted)
    engine.step()
    assert calls == {0: 1, 1: 1}


# --- admission ------------------------------------------------------------------------------
def test_capacity_is_queue_plus_running(store):
    engine = Engine(store, EngineConfig(max_queue=4, max_running=2))
    accepted, refused = 0, 0
    for _ in range(24):
        try:
            engine.submit(RequestHandle(request(store, "Hi", max_new=2), lambda e: None, 0.0))
            accepted += 1
        except QueueFullError:
            refused += 1
    assert (accepted, refused) == (6, 18)
    while engine._busy():
        engine.step()
    engine.submit(RequestHandle(request(store, "Hi", max_new=2), lambda e: None, 0.0))  # room again


def test_kv_budget_delays_admission_and_refuses_what_never_fits(store):
    first = request(store, "Hi", (0.5, 0.5), "none", 6)
    second = request(store, "Hi", (0.1, 0.9), "none", 6)
    need = len(first.prompt_ids) + 6  # one row each
    engine = Engine(store, EngineConfig(kv_budget_tokens=need + 3))
    order: list[str] = []
    for req in (first, second):
        engine.submit(RequestHandle(req, lambda e, n=req.request_id: order.append(n), 0.0))
    engine.step()
    assert engine.running == 1 and engine.queue_size == 1  # the second waits for room
    while engine._busy():
        engine.step()
    assert len(order) == 12
    too_big = request(store, "Hi", max_new=need + 10)
    (error,) = Engine(store, EngineConfig(kv_budget_tokens=need)).run_to_completion(too_big)
    assert isinstance(error, ErrorEvent) and error.error_type == "validation"
    assert "KV budget" in error.message


# --- faults ---------------------------------------------------------------------------------
def test_a_failing_plan_fails_only_its_request(store, monkeypatch):
    original = engine_module.build_plan

    def flaky(store_, mode, mu, method, **kwargs):
        if abs(float(mu[0]) - 0.55) < 1e-9:
            raise RuntimeError("injected plan failure")
        return original(store_, mode, mu, method, **kwargs)

    monkeypatch.setattr(engine_module, "build_plan", flaky)
    reqs = mixed_requests(store)
    results = Engine(store).run_all(reqs)
    for req, events in zip(reqs, results, strict=True):
        if req.request_id == "r3":  # mu = (0.55, 0.45)
            assert isinstance(events[-1], ErrorEvent) and events[-1].error_type == "generation"
            assert "injected plan failure" in events[-1].message
        else:
            monkeypatch.setattr(engine_module, "build_plan", original)
            assert ids_of(events) == alone(store, req)
            monkeypatch.setattr(engine_module, "build_plan", flaky)


def test_a_failing_prefill_fails_only_its_request(store, monkeypatch):
    marker = store.tokenizer("Merge", add_special_tokens=False)["input_ids"][0]
    decoder = store.model.get_decoder()
    original = decoder.forward

    def broken(*args, **kwargs):
        if (kwargs["input_ids"] == marker).any():
            raise ValueError("injected forward failure")
        return original(*args, **kwargs)

    reqs = mixed_requests(store)
    expected = {r.request_id: alone(store, r) for r in reqs}
    monkeypatch.setattr(decoder, "forward", broken)
    results = Engine(store).run_all(reqs)
    for req, events in zip(reqs, results, strict=True):
        if marker in req.prompt_ids:
            assert isinstance(events[-1], ErrorEvent) and "injected" in events[-1].message
        else:
            assert ids_of(events) == expected[req.request_id]
    assert any(marker in r.prompt_ids for r in reqs)


def test_a_failing_decode_forward_fails_that_batch_and_the_engine_carries_on(store, monkeypatch):
    decoder = store.model.get_decoder()
    original = decoder.forward
    failures = []

    def once(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == 1 and not failures:
            failures.append(1)
            raise RuntimeError("injected decode failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", once)
    engine = Engine(store)
    results = engine.run_all(mixed_requests(store)[:3])
    assert all(isinstance(events[-1], ErrorEvent) for events in results)
    after = request(store, PROMPTS[0], (0.3, 0.7), "implicit")
    assert ids_of(engine.run_to_completion(after)) == alone(store, after)


def test_non_finite_guided_scores_fail_the_request_not_the_batch(store):
    overflow = request(store, PROMPTS[0], (0.5, 0.5), "explicit", 4, gamma=1e308)
    fine = request(store, PROMPTS[1], (0.5, 0.5), "explicit", 4)
    bad, good = Engine(store).run_all([overflow, fine])
    assert isinstance(bad[-1], ErrorEvent) and "not finite" in bad[-1].message
    assert not any(isinstance(e, TokenEvent) for e in bad)
    assert ids_of(good) == alone(store, fine)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_reports_a_dead_or_stalled_engine(store, monkeypatch):
    engine = Engine(store, EngineConfig(stall_timeout_s=0.2))
    entered, release = threading.Event(), threading.Event()

    def stuck() -> None:
        entered.set()
        release.wait(5)

    monkeypatch.setattr(engine, "step", stuck)
    engine.start()
    assert engine.health() is None
    engine.submit(RequestHandle(request(store, "Hi"), lambda e: None, time.monotonic()))
    assert entered.wait(5)  # the engine thread is inside a step that does not return
    assert engine.health() is None  # not yet past stall_timeout_s
    engine.heartbeat -= 1.0  # its last loop turn now lies 1 s back: as if 1 s had passed
    assert "no step" in engine.health()
    release.set()
    engine.stop()

    dying = Engine(store)

    def crash():
        raise SystemExit("injected")  # not an Exception: ends the thread

    monkeypatch.setattr(dying, "step", crash)
    dying.start()
    dying.submit(RequestHandle(request(store, "Hi"), lambda e: None, time.monotonic()))
    dying._thread.join(timeout=5)
    assert dying.health() == "the engine thread has stopped"


def test_end_of_document_tokens_join_the_eos_set(store):
    import copy

    tokenizer = copy.deepcopy(store.tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    widened = dataclasses.replace(store, tokenizer=tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in widened.eos_ids
    assert store.eos_ids < widened.eos_ids


def test_an_eos_token_ends_generation_unless_ignored(store):
    free = request(store, PROMPTS[0], (0.3, 0.7), "none", 6)
    first = ids_of(Engine(store).run_to_completion(free))[0]
    engine = Engine(store)
    engine.eos_ids = engine.eos_ids | {first}
    (event,) = engine.run_to_completion(free)
    assert event.id == first and event.details["finish_reason"] == "eos_token"
    ignoring = engine.run_to_completion(dataclasses.replace(free, ignore_eos=True))
    assert len(ignoring) == 6 and ignoring[-1].details["finish_reason"] == "length"


class PollCounter(threading.Event):
    """The engine's wake event, counting its idle polls: an idle loop turn waits on it once."""

    def __init__(self) -> None:
        super().__init__()
        self.polls, self._target, self._reached = 0, None, threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.polls += 1
        if self._target is not None and self.polls >= self._target:
            self._reached.set()
        return super().wait(timeout)

    def after(self, more: int) -> threading.Event:
        """Set once `more` further polls have happened."""
        self._target = self.polls + more
        return self._reached


def test_freed_memory_goes_back_to_the_os_when_the_batch_drains(store, monkeypatch):
    """The engine returns freed KV buffers (malloc_trim) once the batch drains, not on every
    idle poll: without it, the server's RSS ratchets up with the largest batch it has seen."""
    import guidance.engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module, "return_free_memory", lambda: calls.append(1))
    engine = Engine(store)
    engine._wake = wake = PollCounter()
    engine.start()
    try:
        done = threading.Event()

        def on_event(event):
            if isinstance(event, ErrorEvent) or event.generated_text is not None:
                done.set()

        engine.submit(RequestHandle(request(store, "Hi"), on_event, time.monotonic()))
        assert done.wait(30)
        assert wake.after(5).wait(30)  # five idle polls since the request finished
        assert len(calls) == 1
    finally:
        engine.stop()
