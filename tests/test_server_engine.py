"""The engine seen through HTTP: probes, burst capacity, disconnects and metric values."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

from model_store.loader import load_store
from tests.http_server import metric, running_server, serving


@pytest.fixture(scope="module")
def loaded(tiny_store):
    return load_store(tiny_store, "cpu", "float32")


def body(max_new_tokens: int = 4, **parameters) -> dict:
    parameters = {"max_new_tokens": max_new_tokens, **parameters}
    return {"inputs": "How do I bake bread?", "parameters": parameters}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_fails_probes_and_queued_requests(loaded):
    with serving(loaded) as (url, state):
        assert httpx.get(f"{url}/health").status_code == 200
        assert metric(url, "mage_engine_alive") == 1
        engine = state.engine

        def crash():
            raise SystemExit("injected engine death")  # escapes the loop's guard

        engine.step = crash
        response = httpx.post(f"{url}/generate", json=body(), timeout=10)
        assert response.status_code == 503
        assert response.json()["error_type"] == "unavailable"
        assert "engine thread has stopped" in response.json()["error"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "engine" in health.json()["error"]
        assert httpx.get(f"{url}/ready").status_code == 503
        assert metric(url, "mage_engine_alive") == 0
        refused = httpx.post(f"{url}/generate", json=body(), timeout=10)
        assert refused.status_code == 503  # refused at once, not queued


def test_burst_at_four_times_capacity_gets_only_429s_beyond_it(loaded):
    with serving(loaded, max_queue=4, max_running=2) as (url, state):
        # Hold the engine until the burst is in: a fast engine would otherwise finish early
        # requests before the last ones arrive, and admit more than its capacity in all.
        release = threading.Event()
        step = state.engine.step
        state.engine.step = lambda: release.wait(30) and step()
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            futures = [
                pool.submit(httpx.post, f"{url}/generate", json=body(16), timeout=60)
                for _ in range(24)
            ]
            deadline = time.monotonic() + 30
            while sum(f.done() for f in futures) < 18 and time.monotonic() < deadline:
                time.sleep(0.02)
            release.set()
            answers = [f.result() for f in futures]
        assert sorted(a.status_code for a in answers) == [200] * 6 + [429] * 18
        refused = [a for a in answers if a.status_code == 429]
        assert all(a.headers["retry-after"] == "1" for a in refused)
        assert all(a.json()["error_type"] == "overloaded" for a in refused)
        assert httpx.get(f"{url}/health").status_code == 200  # healthy after the burst
        assert httpx.post(f"{url}/generate", json=body(), timeout=30).status_code == 200


def test_two_hundred_dropped_streams_free_every_slot(loaded):
    with running_server(loaded, max_running=4) as url:
        for cut_after in range(1, 6):  # 200 streams, each dropped after 1 to 5 events
            for _ in range(40):
                with httpx.stream(
                    "POST", f"{url}/generate_stream", json=body(40), timeout=30
                ) as response:
                    seen = 0
                    for line in response.iter_lines():
                        seen += line.startswith("data:")
                        if seen >= cut_after:
                            break
        for _ in range(50):  # the engine notices a cancel at its next step
            if metric(url, "mage_running_requests") == 0:
                break
            time.sleep(0.1)
        assert metric(url, "mage_running_requests") == 0
        assert httpx.post(f"{url}/generate", json=body(), timeout=30).status_code == 200


def test_metric_values_after_known_traffic(loaded):
    with running_server(loaded) as url:
        mus = ([0.1, 0.9], [0.1, 0.9], [0.7, 0.3])
        for mu in mus:
            response = httpx.post(f"{url}/generate", json=body(5, preference=mu), timeout=30)
            assert response.json()["details"]["generated_tokens"] == 5
        bad = httpx.post(f"{url}/generate", json=body(5, preference=[0, 0]), timeout=30)
        assert bad.status_code == 422
        with httpx.stream("POST", f"{url}/generate_stream", json=body(3), timeout=30) as stream:
            events = [json.loads(x[6:]) for x in stream.iter_lines() if x.startswith("data:")]
        assert len(events) == 3
        assert metric(url, "mage_generated_tokens_total") == 18
        assert metric(url, 'mage_requests_total{outcome="success"}') == 4
        assert metric(url, 'mage_requests_total{outcome="validation"}') == 1
        assert metric(url, "mage_time_to_first_token_seconds_count") == 4
        assert metric(url, "mage_inter_token_latency_seconds_count") == 14
        # misses: (0.1, 0.9), (0.7, 0.3) and the stream's default (0.5, 0.5); one hit
        assert metric(url, "mage_merge_cache_misses_total") == 3
        assert metric(url, "mage_merge_cache_hits_total") == 1
        assert metric(url, "mage_merge_latency_seconds_count") == 4
        assert metric(url, "mage_running_requests") == 0
        assert metric(url, "mage_queue_size") == 0
