"""The HTTP edge: every bad input gets a 4xx {error, error_type}, strictly typed
and bounded by the schema; body limits; deadlines the engine cannot stretch."""

from __future__ import annotations

import httpx
import pytest

from model_store.loader import load_store
from tests.http_server import metric, running_server

MAX_INPUT_TOKENS = 64
CHAR_LIMIT = MAX_INPUT_TOKENS * 32  # server.schemas.CHARS_PER_TOKEN_BOUND


@pytest.fixture(scope="module")
def loaded(tiny_store):
    return load_store(tiny_store, "cpu", "float32")


@pytest.fixture(scope="module")
def server(loaded):
    with running_server(loaded, max_input_tokens=MAX_INPUT_TOKENS, max_new_tokens=16) as url:
        yield url


def post(url: str, payload=None, content: bytes | None = None, **kwargs) -> httpx.Response:
    if content is not None:
        kwargs["headers"] = {"content-type": "application/json", **kwargs.get("headers", {})}
        return httpx.post(f"{url}/generate", content=content, timeout=30, **kwargs)
    return httpx.post(f"{url}/generate", json=payload, timeout=30, **kwargs)


def params(**parameters) -> dict:
    return {"inputs": "Hi", "parameters": {"max_new_tokens": 2, **parameters}}


def assert_error(response: httpx.Response, status: int, kind: str, text: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}, body
    assert body["error_type"] == kind and text in body["error"], body


# --- 1, 4, 7: ranges and strict types, from the schema ---------------------------------


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        (
            {"do_sample": True, "seed": 1180591620717411303424},
            "`seed` must be < 18446744073709551616. Given: 1180591620717411303424",
        ),
        ({"seed": -1}, "`seed` must be >= 0"),
        ({"guidance": {"gamma": 1e308}, "do_sample": True}, "`guidance.gamma` must be <= 100"),
        ({"temperature": 1e-300}, "`temperature` must be >= 0.01. Given: 1e-300"),
        ({"temperature": 1e300}, "`temperature` must be <= 100"),
        ({"top_k": 10**7}, "`top_k` must be <= 1000000"),
        ({"top_p": 0}, "`top_p` must be > 0"),
        ({"temperature": True}, "`temperature` must be a number. Given: true"),
        ({"max_new_tokens": True}, "`max_new_tokens` must be an integer. Given: true"),
        ({"max_new_tokens": "4"}, '`max_new_tokens` must be an integer. Given: "4"'),
        ({"max_new_tokens": 2.5}, "`max_new_tokens` must be an integer. Given: 2.5"),
        ({"do_sample": "yes"}, "`do_sample` must be true or false"),
        ({"preference": "helpful"}, "`preference` must be a list of weights or an {objective"),
        ({"preference": {"helpful": -1}}, "`preference.helpful` must be >= 0"),
        ({"guidance": {"mode": "telepathy"}}, "`guidance.mode` must be one of"),
        ({"merge_method": "average"}, "`merge_method` must be one of"),
        ({"stop": [""]}, "`stop.0` cannot be empty"),
        ({"stop": ["x" * 257]}, "`stop.0` must have at most 256 characters"),
    ],
)
def test_out_of_range_and_coerced_parameters_are_422(server, parameters, message):
    assert_error(post(server, params(**parameters)), 422, "validation", message)


def test_boundaries_and_json_integers_for_floats_are_accepted(server):
    accepted = params(do_sample=True, seed=2**64 - 1, temperature=1, top_p=1, top_k=1000000)
    accepted["parameters"]["max_new_tokens"] = 2.0  # an integer in JSON (Schema)
    accepted["parameters"]["guidance"] = {"gamma": 100}
    response = post(server, accepted)
    assert response.status_code == 200, response.text
    assert response.json()["details"]["seed"] == 2**64 - 1


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_numbers_are_422(server, literal):
    content = b'{"inputs":"Hi","parameters":{"temperature":' + literal + b"}}"
    assert_error(post(server, content=content), 422, "validation", "`temperature` must be")


def test_preference_near_the_float_maximum_is_normalised(server):
    response = post(server, params(preference=[1e308, 1e308]))
    assert response.status_code == 200, response.text
    assert response.json()["details"]["preference"] == [0.5, 0.5]


# --- 2, 7: text and messages --------------------------------------------------------------


def test_lone_surrogates_are_422_in_inputs_messages_and_raw_utf8(server):
    assert_error(
        post(server, content=b'{"inputs":"\\ud800abc"}'),
        422,
        "validation",
        "`inputs` must be valid Unicode text (lone surrogate at character 0)",
    )
    chat = b'{"messages":[{"role":"user","content":"ok \\udfff"}]}'
    assert_error(post(server, content=chat), 422, "validation", "`messages.0.content` must be")
    # The same surrogate as raw (invalid) UTF-8 bytes, which json.loads lets through.
    raw = b'{"inputs":"\xed\xa0\x80abc"}'
    assert_error(post(server, content=raw), 422, "validation", "must be valid Unicode")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"messages": []}, "`messages` cannot be empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "`messages.0.role` must be one of"),
        (
            {"messages": [{"role": "user", "content": "x", "name": "bob"}]},
            "messages.0.name: Extra inputs are not permitted",
        ),
        ({"messages": [{"role": "user"}]}, "`messages.0.content` is required"),
        ({}, "give exactly one of `inputs` or `messages`"),
        ([], "give exactly one of `inputs` or `messages`"),
        ({"inputs": 5}, "`inputs` must be a string. Given: 5"),
        ({"inputs": "x", "parameters": []}, "`parameters` must be an object"),
        ({"inputs": "x", "extra": 1}, "extra: Extra inputs are not permitted"),
    ],
)
def test_body_shape_errors_are_422(server, payload, message):
    assert_error(post(server, payload), 422, "validation", message)


def test_prompt_length_limit_says_at_most_and_accepts_the_limit(server, loaded):
    prompt = "The quick brown fox jumps over the lazy dog."
    n = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    with running_server(loaded, max_input_tokens=n) as url:
        assert post(url, {"inputs": prompt, "parameters": {"max_new_tokens": 1}}).status_code == 200
    with running_server(loaded, max_input_tokens=n - 1) as url:
        assert_error(
            post(url, {"inputs": prompt}),
            422,
            "validation",
            f"`inputs` must have at most {n - 1} tokens. Given: {n}",
        )


def test_long_text_is_refused_by_length_before_tokenising(loaded, monkeypatch):
    import server.translate

    tokenised = []
    real = server.translate.tokenize_prompt
    monkeypatch.setattr(
        server.translate, "tokenize_prompt", lambda *a, **k: tokenised.append(1) or real(*a, **k)
    )
    with running_server(loaded, max_input_tokens=MAX_INPUT_TOKENS, max_body_bytes=16 << 20) as url:
        huge = post(url, {"inputs": "word " * 2_000_000})  # 10 MB
        assert_error(huge, 422, "validation", f"`inputs` must have at most {CHAR_LIMIT} characters")
        assert tokenised == []  # refused by its length: tokenising 10 MB would take many seconds
        assert post(url, {"inputs": "word", "parameters": {"max_new_tokens": 1}}).status_code == 200
        assert tokenised == [1]  # the hook sees what is tokenised
        chat = {"messages": [{"role": "user", "content": "a" * CHAR_LIMIT}] * 2}
        assert_error(
            post(url, chat),
            422,
            "validation",
            f"`messages` must have at most {CHAR_LIMIT} characters in all",
        )


# --- 5: body byte limit -------------------------------------------------------------------


def test_body_over_the_byte_limit_is_413_before_parsing(loaded):
    with running_server(loaded, max_body_bytes=2048) as url:
        not_even_json = b"{" * 4096  # 413, not 422: the body was never parsed
        response = post(url, content=not_even_json)
        assert_error(response, 413, "payload_too_large", "larger than 2048 bytes")

        def chunks():  # no Content-Length: chunked transfer, counted as it arrives
            for _ in range(8):
                yield b" " * 1024

        chunked = post(url, content=chunks())
        assert "content-length" not in chunked.request.headers
        assert_error(chunked, 413, "payload_too_large")
        assert post(url, params()).status_code == 200  # a small body still goes through
        assert metric(url, 'mage_requests_total{outcome="payload_too_large"}') == 2


# --- 6: nothing leaves outside the error shape --------------------------------------------


def test_unreadable_bodies_are_422_in_the_error_shape(server):
    assert post(server, content=b'{"inputs":"\xff\xfe"}').json() == {
        "error": "invalid request: body is not valid UTF-8",
        "error_type": "validation",
    }
    deep = post(server, content=b"[" * 3000 + b"]" * 3000)
    assert deep.json() == {
        "error": "invalid request: body is nested too deeply",
        "error_type": "validation",
    }
    text = post(server, content=b"hello", headers={"content-type": "text/plain"})
    assert_error(text, 422, "validation", "exactly one of `inputs` or `messages`")


def test_unknown_routes_and_methods_use_the_error_shape(server):
    assert_error(httpx.get(f"{server}/nope"), 404, "not_found", "GET /nope")
    wrong_method = httpx.get(f"{server}/generate")
    assert_error(wrong_method, 405, "method_not_allowed")
    assert wrong_method.headers["allow"] == "POST"


def test_unexpected_exception_is_500_internal_and_counted(server, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("/secret/path exploded")

    monkeypatch.setattr("server.relay.build_request", explode)
    before = metric(server, 'mage_requests_total{outcome="internal"}')
    response = post(server, params())
    assert response.json() == {"error": "internal server error", "error_type": "internal"}
    assert response.status_code == 500
    assert metric(server, 'mage_requests_total{outcome="internal"}') == before + 1


# --- 10: the OpenAPI schema says what is accepted ------------------------------------------


def test_openapi_describes_the_accepted_bodies_and_answers(server):
    spec = httpx.get(f"{server}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    body = spec["paths"]["/generate"]["post"]["requestBody"]
    assert body["required"] is True
    refs = [
        v["$ref"].rsplit("/", 1)[-1] for v in body["content"]["application/json"]["schema"]["oneOf"]
    ]
    assert refs == ["TextBody", "ChatBody"]
    text, chat = schemas["TextBody"], schemas["ChatBody"]
    assert text["required"] == ["inputs"] and chat["required"] == ["messages"]
    assert text["additionalProperties"] is False and chat["additionalProperties"] is False
    assert text["properties"]["inputs"]["maxLength"] == CHAR_LIMIT
    assert chat["properties"]["messages"]["minItems"] == 1
    assert schemas["Message"]["properties"]["role"]["enum"] == ["system", "user", "assistant"]
    parameters = schemas["Parameters"]["properties"]
    assert parameters["max_new_tokens"]["anyOf"][0]["maximum"] == 16  # the server's setting
    temperature = parameters["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0.01, 100.0)
    seed = parameters["seed"]["anyOf"][0]["exclusiveMaximum"]
    assert seed == 2**64 and isinstance(seed, int)  # exact: not 1.8446744073709552e+19
    assert parameters["merge_method"]["anyOf"][0]["enum"] == [
        "bone-soup",
        "rewarded-soup",
        "direct",
        "ric",
    ]
    assert "description" in parameters["seed"]  # docstrings reach the schema
    guidance = schemas["GuidanceParameters"]["properties"]
    assert "explicit-ensemble" in guidance["mode"]["anyOf"][0]["enum"]
    assert guidance["gamma"]["anyOf"][0]["maximum"] == 100.0
    generate = spec["paths"]["/generate"]["post"]["responses"]
    for status in ("413", "422", "429", "500", "503", "504"):
        schema = generate[status]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/ErrorBody"), status
    assert "Retry-After" in generate["429"]["headers"]
    stream = spec["paths"]["/generate_stream"]["post"]["responses"]["200"]["content"]
    assert list(stream) == ["text/event-stream"]
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics)[0].startswith("text/plain; version=")
    assert "HTTPValidationError" not in schemas  # FastAPI's {detail} shape is never sent


# --- 11: the HTTP layer keeps the deadline, whatever the engine does ----------------------


def test_deadline_holds_when_the_engine_never_answers(loaded, monkeypatch):
    # An engine whose thread never runs: requests are queued and never see an event.
    monkeypatch.setattr("guidance.engine.Engine.start", lambda self: None)
    monkeypatch.setattr("guidance.engine.Engine.stop", lambda self: None)
    with running_server(loaded, request_timeout_s=0.3) as url:
        response = post(url, params())  # without the HTTP deadline: a client timeout at 30 s
        assert response.json() == {
            "error": "request exceeded its deadline",
            "error_type": "timeout",
        }
        assert response.status_code == 504
        with httpx.stream("POST", f"{url}/generate_stream", json=params(), timeout=30) as stream:
            assert stream.status_code == 200
            lines = list(stream.iter_lines())
        assert lines[:2] == [
            "event: error",
            'data: {"error": "request exceeded its deadline", "error_type": "timeout"}',
        ]
        assert metric(url, 'mage_requests_total{outcome="timeout"}') == 2
