"""A preference changed while its request runs (guidance.steering, server.steering).

The engine's tokens are checked against computations that never go through the engine's
change path: the Batch API driven by hand (prefill and decode under plan A, then plan B on
the same KV) and whole transformers models with PEFT-merged weights sharing one KV cache
(a model merged for mu_A computes the prefix, one merged for mu_B continues from it).
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from transformers import DynamicCache

from guidance.batch import Batch
from guidance.engine import Engine, EngineConfig
from guidance.plan import build_plan, round_preference
from guidance.requests import ErrorEvent, GenerationRequest, RequestHandle, SamplingParams
from guidance.steering import change_refused
from merging import get_merge_method
from model_store.loader import load_store
from model_store.value_head import load_value_head
from tests.http_server import serving
from tests.test_batch import peft_merged

KEYS = ["key-one", "key-two"]

MODES = ("none", "explicit", "explicit-ensemble", "implicit", "implicit-ensemble")
PROMPT = "How do I bake bread?"
MU_A, MU_B = (0.9, 0.1), (0.05, 0.95)
MAX_NEW = 10


@pytest.fixture(scope="module")
def engine(tiny_store):
    return Engine(load_store(tiny_store, "cpu", "float32"))


def request(store, mode: str, mu=MU_A, name: str = "r", max_new: int = MAX_NEW):
    ids = store.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    mu = torch.tensor(mu, dtype=torch.float64)
    return GenerationRequest(name, tuple(ids), mu, mode, 1.0, SamplingParams(), max_new)


def run_changing(engine: Engine, requests, changes: dict[int, list[tuple[int, tuple]]]):
    """Run requests offline; request i gets preference mu once it has k tokens, for each
    (k, mu) in changes[i] (k = 0: before it is admitted). The events per request."""
    events: list[list] = [[] for _ in requests]
    handles: list[RequestHandle] = []
    for i, req in enumerate(requests):

        def record(event, i=i) -> None:
            events[i].append(event)
            for k, mu in changes.get(i, []):
                if len(events[i]) == k:
                    handles[i].change_preference(torch.tensor(mu, dtype=torch.float64))

        handles.append(RequestHandle(req, record, time.monotonic()))
        for k, mu in changes.get(i, []):
            if k == 0:
                handles[i].change_preference(torch.tensor(mu, dtype=torch.float64))
        engine.submit(handles[i], bounded=False)
    while engine._busy():
        engine.step()
    return events


class Member:
    def __init__(self, plan) -> None:
        self.plan, self.gamma = plan, 1.0


def switched_batch(store, mode: str, prompt: list[int], k: int) -> list[int]:
    """Greedy tokens from the Batch API by hand: the prompt prefilled and the first k tokens
    chosen under plan A; then the member's plan is B on the same KV (the token fed next is
    the first forward under B, and so the (k+1)-th token the first chosen under B)."""
    plan_a, plan_b = (
        build_plan(
            store, mode, round_preference(torch.tensor(mu, dtype=torch.float64)), "bone-soup"
        )
        for mu in (MU_A, MU_B)
    )
    member, batch = Member(plan_a), Batch(store)
    batch.start([member], [prompt])
    outputs = batch.prefill(batch.prefill_left)
    tokens: list[int] = []
    while True:
        tokens.append(int(batch.scores(outputs)[0].argmax()))
        if len(tokens) == MAX_NEW:
            return tokens
        if len(tokens) == k:
            member.plan = plan_b
            batch._layout = None  # by hand: the layout is rebuilt from the members' plans
        outputs = batch.decode([tokens[-1]])


def switched_transformers(root, store, mode: str, prompt: list[int], k: int) -> list[int]:
    """The same from whole transformers models: each row of the guided score (Eq. 25) is a
    PEFT-merged model for mu_A until k tokens are chosen, then one merged for mu_B that
    continues the KV cache the first one filled."""
    manifest, matrix = store.checked.manifest, store.checked.combination_matrix
    backbones = [b.path for b in manifest.backbones]
    values = [s.path for s in manifest.guidance.explicit]
    heads = [load_value_head(root / s.head) for s in manifest.guidance.explicit]
    base = peft_merged(root, [], [])

    def rows_for(mu):
        coefficients = get_merge_method("bone-soup").coefficients(
            matrix, torch.tensor(mu, dtype=torch.float64), manifest.alpha
        )
        policy = peft_merged(root, backbones, coefficients.tolist())
        rows = {"policy": policy}
        if mode == "implicit":
            rows["base"] = base
        if mode == "explicit":
            rows["value"] = peft_merged(root, values, list(mu))
        return rows

    models = rows_for(MU_A), rows_for(MU_B)
    caches = {name: DynamicCache() for name in models[0]}

    def score(new: list[int], switched: bool) -> torch.Tensor:
        mu = MU_B if switched else MU_A
        out = {
            name: model(torch.tensor([new]), cache=caches[name], output_hidden_states=True)
            for name, model in models[switched].items()
        }
        logp = {name: torch.log_softmax(o.logits[0, -1].float(), -1) for name, o in out.items()}
        if mode == "implicit":  # pi* is the policy's own merge (Eq. 23)
            return logp["policy"] + (logp["policy"] - logp["base"])
        if mode == "explicit":  # one value model merged with mu, heads mixed by mu (Eq. 24)
            hidden = out["value"].hidden_states[-1][0, -1:]
            embedding = models[switched]["value"].get_output_embeddings().weight
            value = sum(w * head(hidden, embedding)[0] for w, head in zip(mu, heads, strict=True))
            return logp["policy"] + value
        return logp["policy"]

    tokens: list[int] = []
    new = prompt
    with torch.no_grad():
        while len(tokens) < MAX_NEW:
            tokens.append(int(score(new, switched=len(tokens) >= k).argmax()))
            new = [tokens[-1]]
    return tokens


@pytest.mark.parametrize("mode", MODES)
def test_a_change_at_token_k_continues_the_old_kv_under_the_new_preference(engine, mode):
    store, k = engine.store, 3
    req = request(store, mode)
    (events,) = run_changing(engine, [req], {0: [(k, MU_B)]})
    tokens = [e.id for e in events]
    assert tokens == switched_batch(store, mode, list(req.prompt_ids), k)
    (plain,) = run_changing(engine, [req], {})
    assert tokens[:k] == [e.id for e in plain][:k]  # before k: the old preference's own
    assert tokens != [e.id for e in plain]  # and the change moved what follows
    details = events[-1].details
    assert [p["from_token"] for p in details["preferences"]] == [0, k]
    assert [p["preference"] for p in details["preferences"]] == [list(MU_A), list(MU_B)]
    assert details["preference"] == list(MU_B)  # the top level: the one in effect at the end
    assert details["lambda"] == details["preferences"][1]["lambda"]


@pytest.mark.parametrize("mode", ("none", "explicit", "implicit"))
def test_the_switch_equals_peft_merged_models_sharing_one_kv_cache(engine, tiny_store, mode):
    store, k = engine.store, 4
    req = request(store, mode)
    (events,) = run_changing(engine, [req], {0: [(k, MU_B)]})
    expected = switched_transformers(tiny_store, store, mode, list(req.prompt_ids), k)
    assert [e.id for e in events] == expected


def test_a_change_before_admission_is_the_new_preference_from_the_start(engine):
    store = engine.store
    (changed,) = run_changing(engine, [request(store, "explicit")], {0: [(0, MU_B)]})
    (direct,) = run_changing(engine, [request(store, "explicit", mu=MU_B)], {})
    assert [e.id for e in changed] == [e.id for e in direct]
    assert changed[-1].details["preferences"] == [
        {"from_token": 0, "preference": list(MU_B), "lambda": direct[-1].details["lambda"]}
    ]


def test_a_change_during_a_chunked_prefill_waits_for_the_first_decode(tiny_store):
    """The prompt's KV is computed under one preference (the one the prefix cache files it
    under): a change sent mid-prefill applies from the first decode step, token 1."""
    engine = Engine(load_store(tiny_store, "cpu", "float32"), EngineConfig(prefill_tokens=2))
    req = request(engine.store, "explicit")
    events: list = []
    handle = RequestHandle(req, events.append, time.monotonic())
    engine.submit(handle, bounded=False)
    engine.step()
    assert engine.prefilling is not None and engine.prefilling.prefill_left > 0
    handle.change_preference(torch.tensor(MU_B, dtype=torch.float64))
    while engine._busy():
        engine.step()
    assert [e.id for e in events] == switched_batch(
        engine.store, "explicit", list(req.prompt_ids), 1
    )
    assert [p["from_token"] for p in events[-1].details["preferences"]] == [0, 1]


def test_batch_neighbours_are_untouched_and_the_latest_change_wins(engine):
    """Another request in the same batch decodes as if alone; two changes before the
    engine's next step: only the second applies; a later change adds another entry."""
    store = engine.store
    requests = [request(store, "implicit", name="a"), request(store, "explicit", name="b")]
    changes = {1: [(2, (0.5, 0.5)), (2, MU_B), (6, MU_A)]}  # at 2: (0.5, 0.5), then mu_B
    events = run_changing(engine, requests, changes)
    (alone,) = run_changing(engine, [requests[0]], {})
    assert [e.id for e in events[0]] == [e.id for e in alone]
    assert events[0][-1].details["preferences"] == alone[-1].details["preferences"]
    steered = events[1][-1].details["preferences"]
    assert [(p["from_token"], p["preference"]) for p in steered] == [
        (0, list(MU_A)),
        (2, list(MU_B)),
        (6, list(MU_A)),
    ]


def test_what_cannot_change_is_refused_by_name(standalone_store, engine):
    standalone = load_store(standalone_store, "cpu", "float32")
    assert "explicit-ensemble" in change_refused(standalone, request(standalone, "explicit"))
    assert change_refused(standalone, request(standalone, "explicit-ensemble")) is None
    assert change_refused(engine.store, request(engine.store, "explicit")) is None
    # Refused changes are never applied, even if one reaches the engine.
    offline = Engine(standalone)
    (events,) = run_changing(offline, [request(standalone, "explicit")], {0: [(2, MU_B)]})
    assert not isinstance(events[-1], ErrorEvent)
    assert [p["from_token"] for p in events[-1].details["preferences"]] == [0]


# --- over HTTP -------------------------------------------------------------------------


class Gate:
    """Holds the engine thread inside the first token it emits (its metrics hook), until
    released: a change sent meanwhile applies from the request's second token on, however
    fast the engine is."""

    def __init__(self, engine: Engine) -> None:
        self.inner, self.engine = engine.observer, engine
        self.entered, self.released = threading.Event(), threading.Event()
        engine.observer = self

    def token(self, seconds_since_last: float, first: bool) -> None:
        self.inner.token(seconds_since_last, first)
        if first and not self.released.is_set():
            self.entered.set()
            self.released.wait(30)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        self.engine.observer = self.inner


@pytest.fixture(scope="module")
def live(tiny_store):
    with serving(load_store(tiny_store, "cpu", "float32"), api_key=KEYS) as (url, state):
        yield url, state.engine


def auth(key: str = KEYS[0]) -> dict:
    return {"Authorization": f"Bearer {key}"}


def change(url: str, request_id: str, preference, key: str = KEYS[0]) -> httpx.Response:
    path = f"{url}/v1/requests/{request_id}/preference"
    return httpx.post(path, json={"preference": preference}, headers=auth(key), timeout=30)


def tgi_body(max_new: int = 6, mode: str = "explicit") -> dict:
    guidance = {"mode": mode}
    parameters = {"preference": list(MU_A), "guidance": guidance, "max_new_tokens": max_new}
    return {"inputs": PROMPT, "parameters": parameters}


def sse(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_a_streaming_answer_follows_a_change_and_lists_it(live):
    url, engine = live
    with Gate(engine) as gate:
        with httpx.stream(
            "POST", f"{url}/generate_stream", json=tgi_body(), headers=auth(), timeout=60
        ) as response:
            request_id = response.headers["x-request-id"]  # sent before the first token
            assert gate.entered.wait(30)
            answer = change(url, request_id, {"harmless": 19, "helpful": 1})
            assert answer.status_code == 202
            assert answer.json() == {
                "id": request_id,
                "object": "request.preference",
                "preference": [0.05, 0.95],
                "requests": 1,
            }
            gate.released.set()
            events = sse(response)
    details = events[-1]["details"]
    assert [(p["from_token"], p["preference"]) for p in details["preferences"]] == [
        (0, list(MU_A)),
        (1, list(MU_B)),
    ]
    assert change(url, request_id, list(MU_A)).status_code == 404  # finished


def test_a_client_id_steers_a_non_streaming_answer(live):
    """/generate's header comes with the answer: a client that wants to steer it names it."""
    url, engine = live
    with Gate(engine) as gate, ThreadPoolExecutor(1) as pool:
        headers = {**auth(), "X-Request-Id": "my-request.1"}
        pending = pool.submit(
            httpx.post, f"{url}/generate", json=tgi_body(), headers=headers, timeout=60
        )
        assert gate.entered.wait(30)
        assert change(url, "my-request.1", list(MU_B), key=KEYS[1]).status_code == 404
        assert change(url, "my-request.1", list(MU_B)).status_code == 202
        gate.released.set()
        answer = pending.result()
    assert answer.headers["x-request-id"] == "my-request.1"
    preferences = answer.json()["details"]["preferences"]
    assert [p["from_token"] for p in preferences] == [0, 1]


def test_all_choices_of_an_openai_request_change_together(live):
    url, engine = live
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 5,
        "n": 2,
        "temperature": 1.0,
        "seed": 3,
        "stream": True,
        "preference": list(MU_A),
    }
    with Gate(engine) as gate:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=auth(), timeout=60
        ) as response:
            request_id = response.headers["x-request-id"]
            assert request_id.startswith("chatcmpl-")
            assert gate.entered.wait(30)
            answer = change(url, request_id, list(MU_B))
            assert answer.status_code == 202 and answer.json()["requests"] == 2
            gate.released.set()
            chunks = [c for c in sse_chunks(response) if "mage" in c]
    assert {c["id"] for c in chunks} == {request_id}
    assert len(chunks) == 2  # each choice's last chunk
    for chunk in chunks:
        preferences = chunk["mage"]["preferences"]
        assert [(p["from_token"], p["preference"]) for p in preferences] == [
            (0, list(MU_A)),
            (1, list(MU_B)),
        ]


def sse_chunks(response: httpx.Response) -> list[dict]:
    lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


def test_unknown_ids_and_bad_preferences_get_the_error_shape(live):
    url, _ = live
    unknown = change(url, "never-was", list(MU_B))
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert error["code"] == "not_found" and error["param"] == "request_id"
    assert "never-was" in error["message"]
    for bad in ([-1, 2], [0, 0], {"nope": 1.0}, [1, 0, 0], "0.5,0.5", [float("nan"), 1]):
        path = f"{url}/v1/requests/never-was/preference"
        text = json.dumps({"preference": bad})  # NaN as JSON's NaN literal
        answer = httpx.post(path, content=text, headers=auth(), timeout=30)
        assert answer.status_code == 422, bad
        assert answer.json()["error"]["code"] == "validation"
    extra = httpx.post(
        f"{url}/v1/requests/never-was/preference",
        json={"preference": [1, 0], "guidance": {"mode": "none"}},
        headers=auth(),
        timeout=30,
    )
    assert extra.status_code == 422  # only the preference changes
    assert httpx.post(f"{url}/v1/requests/x/preference", json={}).status_code == 401


def test_every_answer_carries_its_request_id(live):
    url, _ = live
    chat = {"model": "t", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    text = {"model": "t", "prompt": "Hi", "max_tokens": 2}
    for path, body, stream in (
        ("/generate", tgi_body(2), False),
        ("/generate_stream", tgi_body(2), True),
        ("/", {**tgi_body(2), "stream": False}, False),
        ("/", {**tgi_body(2), "stream": True}, True),
        ("/v1/chat/completions", chat, False),
        ("/v1/chat/completions", {**chat, "stream": True}, True),
        ("/v1/completions", text, False),
        ("/v1/completions", {**text, "stream": True}, True),
    ):
        with httpx.stream("POST", url + path, json=body, headers=auth(), timeout=60) as answer:
            made = answer.headers["x-request-id"]
            assert re.fullmatch(r"((chatcmpl|cmpl)-)?[0-9a-f]{32}", made), path
            answers = sse_chunks(answer) if stream else [json.loads(answer.read())]
        if path.startswith("/v1/"):
            assert {a["id"] for a in answers} == {made}, path
        headers = {**auth(), "X-Request-Id": "trace:42"}
        given = httpx.post(url + path, json={**body, "stream": False}, headers=headers, timeout=60)
        assert given.headers["x-request-id"] == "trace:42", path
        if path.startswith("/v1/"):
            assert given.json()["id"] == "trace:42"
    odd = httpx.post(url + "/generate", json=tgi_body(2), headers={**auth(), "X-Request-Id": "a b"})
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])  # replaced, not refused
    assert "x-request-id" in httpx.get(f"{url}/health").headers
    assert "x-request-id" in httpx.get(f"{url}/info").headers  # a 401 carries one too


def test_a_mode_that_cannot_change_is_a_409(standalone_store):
    with serving(load_store(standalone_store, "cpu", "float32")) as (url, state):
        with Gate(state.engine) as gate, ThreadPoolExecutor(1) as pool:
            headers = {"X-Request-Id": "fixed"}
            pending = pool.submit(
                httpx.post, f"{url}/generate", json=tgi_body(), headers=headers, timeout=60
            )
            assert gate.entered.wait(30)
            refused = httpx.post(
                f"{url}/v1/requests/fixed/preference", json={"preference": [0, 1]}, timeout=30
            )
            gate.released.set()
            assert pending.result().status_code == 200
    assert refused.status_code == 409
    assert "explicit-ensemble" in refused.json()["error"]["message"]


def test_the_playground_sliders_steer_a_streaming_answer_in_chromium(tiny_store, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with serving(load_store(tiny_store, "cpu", "float32")) as (url, state):
        wait = WebDriverWait(browser, 60)
        browser.get(f"{url}/")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        max_tokens = browser.find_element(By.ID, "max-tokens")
        max_tokens.clear()
        max_tokens.send_keys("8")
        answer = browser.find_element(By.ID, "answer")
        with Gate(state.engine) as gate:
            browser.find_element(By.ID, "send").click()
            wait.until(lambda d: answer.get_attribute("data-request-id"))  # headers came
            assert gate.entered.wait(30)  # the engine holds its first token
            browser.find_element(By.ID, "pref-main-slider").send_keys(Keys.HOME)  # mu = (1, 0)
            wait.until(lambda d: answer.get_attribute("data-steered") == "1")
            gate.released.set()
            wait.until(lambda d: answer.get_attribute("data-done") == "true")
        meta = browser.find_element(By.ID, "answer-meta").text
    assert answer.get_attribute("data-tokens") == "8"
    assert "changed while streaming" in meta and "μ = (1.00, 0.00) from token 1" in meta
    # lambda and mu at the end are the new preference's; the start and the change are listed
    assert meta.startswith("λ = (1.75, -0.75) · μ = (1.00, 0.00)")
    assert "started at μ = (0.50, 0.50)" in meta
