"""Structured output: a JSON schema or a regex constrains decoding (guidance.constrain, through
llguidance), after guidance and before sampling, in the same batch as free rows, through
OpenAI's `response_format` and TGI's `grammar`; what cannot be enforced is a 422 naming it."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import httpx
import jsonschema
import pytest

from guidance.constrain import GrammarCache, GrammarSpec, grammar_cache
from guidance.engine import Engine
from guidance.requests import GenerationRequest, SamplingParams, TokenEvent
from model_store.loader import load_store
from model_store.resources import demo_store_path
from server.settings import ServerSettings
from server.translate import Options, Prompt, build_request, compile_grammar
from tests.common import make_request
from tests.http_server import running_server

MODES = ("none", "explicit", "explicit-ensemble", "implicit", "implicit-ensemble")
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no"]},
            "score": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["answer", "score"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        },
        "required": ["name", "tags"],
        "additionalProperties": False,
    },
    {"type": "string", "maxLength": 4},
]
"""Schemas that force short outputs: a random model wanders inside anything open-ended."""
REGEXES = [r"[0-9]{3}-[a-z]{2,4}", r"(yes|no), [0-9]"]
MAX_NEW = 64


@pytest.fixture(scope="module")
def store(tiny_store):
    return load_store(tiny_store, "cpu", "float32")


def constrained(store, spec: GrammarSpec | None, **kwargs) -> GenerationRequest:
    request = make_request(store, "How do I bake bread?", **{"max_new": MAX_NEW} | kwargs)
    return dataclasses.replace(request, grammar=compile_grammar(spec, store))


def finished(events) -> TokenEvent:
    last = events[-1]
    assert isinstance(last, TokenEvent), last
    return last


def sampling(greedy: bool, seed: int) -> SamplingParams:
    return SamplingParams() if greedy else SamplingParams(temperature=1.5, top_p=0.95, seed=seed)


# --- the engine ----------------------------------------------------------------------------


def test_outputs_validate_in_every_mode_greedy_and_sampled_beside_free_rows(store):
    """Every schema in every guidance mode, greedy and sampled, and free rows, in one batch:
    each constrained output is complete JSON valid against its schema, and the free rows
    give exactly the tokens they give alone (the mask touches only its own row)."""
    requests, schemas, free = [], [], []
    for i, mode in enumerate(MODES):
        for greedy in (True, False):
            schema = SCHEMAS[(i + greedy) % len(SCHEMAS)]
            params = sampling(greedy, seed=i)
            requests.append(
                constrained(store, GrammarSpec("json", schema), mode=mode, sampling=params)
            )
            schemas.append(schema)
            free.append(constrained(store, None, mode=mode, sampling=params, max_new=8))
    outputs = Engine(store).run_all([*requests, *free])
    for schema, events in zip(schemas, outputs, strict=False):
        last = finished(events)
        assert last.details["finish_reason"] == "eos_token", last.generated_text
        assert not last.special  # it ended with the grammar, without spending a step on EOS
        jsonschema.validate(json.loads(last.generated_text), schema)
    free_outputs = Engine(store).run_all(free)  # the same free rows, no grammar beside them
    for beside, alone in zip(outputs[len(requests) :], free_outputs, strict=True):
        assert [e.id for e in beside] == [e.id for e in alone]


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_outputs_fullmatch(store, pattern, greedy):
    requests = [
        constrained(store, GrammarSpec("regex", pattern), mode=mode, sampling=sampling(greedy, 3))
        for mode in MODES
    ]
    for events in Engine(store).run_all(requests):
        last = finished(events)
        assert re.fullmatch(pattern, last.generated_text), last.generated_text
        assert last.details["finish_reason"] == "eos_token"


def test_logprobs_and_alternatives_are_of_the_constrained_distribution(store):
    """Like vLLM: log-probabilities are renormalised over the tokens the grammar allows, and
    no forbidden token is offered as an alternative. An object schema's first token can only
    be `{`: it has probability 1 and is the only alternative."""
    params = SamplingParams(top_n=5)
    json_events, events = Engine(store).run_all(
        [
            constrained(store, GrammarSpec("json", SCHEMAS[0]), sampling=params),
            constrained(store, GrammarSpec("regex", r"[0-9]{4}"), sampling=params),
        ]
    )
    assert [(t.text, t.logprob) for t in json_events[0].top_tokens] == [("{", 0.0)]
    assert json_events[0].logprob == 0.0
    for event in events[:4]:
        assert event.top_tokens and all(t.text.isdigit() for t in event.top_tokens)
        assert sum(math.exp(t.logprob) for t in event.top_tokens) <= 1 + 1e-5
        assert event.logprob == max(t.logprob for t in event.top_tokens)  # greedy


def test_a_vanishing_top_p_still_keeps_an_allowed_token(store):
    """top_p = 5e-324 is > 0 as the schema asks, but 0 in float32: the best token must still
    stay, or the row draws from nothing and takes token 0 (EOS here), which the grammar
    forbids (the fuzz test found it)."""
    params = SamplingParams(temperature=1.0, top_k=4, top_p=5e-324, typical_p=5e-324, seed=0)
    request = constrained(store, GrammarSpec("json", {}), sampling=params, max_new=3)
    last = finished(Engine(store).run_to_completion(request))
    assert last.generated_text and last.details["finish_reason"] in ("length", "eos_token")


def test_a_length_limited_output_is_a_prefix_of_valid_json(store):
    request = constrained(store, GrammarSpec("json", SCHEMAS[2]), max_new=4)
    last = finished(Engine(store).run_to_completion(request))
    assert last.details["finish_reason"] == "length"
    text, start = last.generated_text, '{"name":"'  # the only way the schema's JSON starts
    assert text[: len(start)] == start[: len(text)]


# --- compilation and its cache ---------------------------------------------------------------


def test_the_same_schema_compiles_once(store):
    """Requests with the same schema (in any key order or spacing) share one compiled
    grammar; another schema compiles anew."""
    settings = ServerSettings()
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    text = ' { "required" : ["x"], "properties": {"x": {"type": "integer"}}, "type": "object"}'
    vocab = store.model.get_output_embeddings().weight.shape[0]
    cache = grammar_cache(store.tokenizer, vocab, tuple(sorted(store.eos_ids)))
    hits, misses = cache.hits, cache.misses
    built = [
        build_request(
            Prompt(text="Hi"), Options(grammar=GrammarSpec("json", given)), store, settings
        )
        for given in (schema, text, schema)
    ]
    assert built[0].grammar is built[1].grammar is built[2].grammar
    assert (cache.hits - hits, cache.misses - misses) in ((2, 1), (3, 0))
    other = GrammarSpec("json", {**schema, "required": []})
    again = build_request(Prompt(text="Hi"), Options(grammar=other), store, settings)
    assert again.grammar is not built[0].grammar


def test_the_cache_is_bounded_least_recently_used_first(store):
    cache = GrammarCache(grammar_cache(store.tokenizer, 300, (0,)).tokenizer, max_entries=2)
    a, b, c = (GrammarSpec("regex", p) for p in ("a+", "b+", "c+"))
    first = cache.compile(a)
    cache.compile(b)
    assert cache.compile(a) is first  # a is now the most recent
    cache.compile(c)  # evicts b
    assert cache.compile(a) is first
    misses = cache.misses
    cache.compile(b)
    assert cache.misses == misses + 1


# --- HTTP -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url(store):
    with running_server(store, max_new_tokens=MAX_NEW) as url:
        yield url


def chat_body(response_format: dict, **extra) -> dict:
    messages = [{"role": "user", "content": "Is bread easy?"}]
    return {"messages": messages, "max_tokens": MAX_NEW, "response_format": response_format} | extra


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}


@pytest.mark.parametrize("schema", SCHEMAS[:3])
def test_openai_json_schema_answers_validate(url, schema):
    body = chat_body(json_schema_format(schema), n=2, temperature=1.0, seed=5)
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    for choice in answer["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_openai_json_object_on_both_routes_and_streamed(url):
    body = chat_body({"type": "json_object"}, max_tokens=MAX_NEW)
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    content = answer["choices"][0]["message"]["content"]
    if answer["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)
    assert content.startswith("{")
    streamed = httpx.post(
        f"{url}/v1/chat/completions", json=body | {"stream": True}, timeout=60
    ).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line[6:7] == "{"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == content
    completion = {
        "prompt": "Bread:",
        "max_tokens": MAX_NEW,
        "response_format": json_schema_format(SCHEMAS[0]),
    }
    answer = httpx.post(f"{url}/v1/completions", json=completion, timeout=60).json()
    jsonschema.validate(json.loads(answer["choices"][0]["text"]), SCHEMAS[0])


def test_the_openai_client_sends_a_schema(url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    answer = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Yes or no?"}],
        max_tokens=MAX_NEW,
        response_format=json_schema_format(SCHEMAS[0]),
        extra_body={"preference": [0.2, 0.8], "guidance": {"mode": "implicit"}},
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMAS[0])


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/"])
def test_tgi_grammar_json_and_regex_on_every_route(url, route):
    for grammar, check in [
        (
            {"type": "json", "value": SCHEMAS[0]},
            lambda t: jsonschema.validate(json.loads(t), SCHEMAS[0]),
        ),
        (
            {"type": "json", "value": json.dumps(SCHEMAS[1])},
            lambda t: jsonschema.validate(json.loads(t), SCHEMAS[1]),
        ),
        (
            {"type": "regex", "value": REGEXES[0]},
            lambda t: re.fullmatch(REGEXES[0], t) or pytest.fail(t),
        ),
    ]:
        parameters = {"grammar": grammar, "max_new_tokens": MAX_NEW, "do_sample": True, "seed": 2}
        body = {"inputs": "Bread", "parameters": parameters}
        response = httpx.post(f"{url}{route}", json=body, timeout=60)
        assert response.status_code == 200, response.text
        if route == "/generate_stream":
            events = [
                json.loads(line[5:])
                for line in response.text.splitlines()
                if line.startswith("data:")
            ]
            answer = events[-1]
        else:
            answer = response.json()
            answer = answer[0] if route == "/" else answer
        assert answer["details"]["finish_reason"] == "eos_token"
        check(answer["generated_text"])


BAD = [
    ({"type": "json", "value": {"type": "object", "properties": {"a": {"type": "foo"}}}}, "foo"),
    ({"type": "json", "value": {"not": {"type": "string"}}}, "not"),
    ({"type": "json", "value": {"$ref": "#/nowhere"}}, "nowhere"),
    ({"type": "json", "value": '{"type": "obj'}, "not valid JSON"),
    ({"type": "json", "value": "[1, 2]"}, "must be an object"),
    ({"type": "regex", "value": "a+("}, "unclosed group"),
]


@pytest.mark.parametrize(("grammar", "problem"), BAD)
def test_an_unusable_grammar_is_a_422_naming_the_problem(url, grammar, problem):
    body = {"inputs": "Bread", "parameters": {"grammar": grammar}}
    response = httpx.post(f"{url}/generate", json=body)
    assert response.status_code == 422
    error = response.json()
    assert error["error_type"] == "validation"
    assert "`grammar`" in error["error"] and problem in error["error"], error


@pytest.mark.parametrize(
    ("response_format", "problem"),
    [
        (json_schema_format({"type": "object", "properties": {"a": {"type": "foo"}}}), "foo"),
        (json_schema_format({"not": {}}), "not"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "name"),
        ({"type": "yaml"}, "type"),
    ],
)
def test_an_unusable_response_format_is_a_422_naming_it(url, response_format, problem):
    body = chat_body(response_format)
    response = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "response_format" in error["message"] and problem in error["message"], error


def test_a_regex_grammar_needs_text(url):
    body = {"inputs": "Bread", "parameters": {"grammar": {"type": "regex", "value": {"a": 1}}}}
    response = httpx.post(f"{url}/generate", json=body)
    assert response.status_code == 422 and "grammar" in response.json()["error"]


# --- the real tokenizer ----------------------------------------------------------------------


@pytest.mark.slow
def test_json_schema_on_the_demo_store():
    """SmolLM2's 49k-token vocabulary (multi-character JSON tokens) and chat template."""
    demo = load_store(demo_store_path(), "cpu", "float32")
    settings = ServerSettings()
    prompt = Prompt(messages=[{"role": "user", "content": "Is bread easy to bake? Rate it."}])
    requests = [
        build_request(
            prompt,
            Options(grammar=GrammarSpec("json", SCHEMAS[0]), max_new_tokens=MAX_NEW),
            demo,
            settings,
        ),
        build_request(prompt, Options(max_new_tokens=8), demo, settings),
    ]
    constrained_events, free_events = Engine(demo).run_all(requests)
    jsonschema.validate(json.loads(finished(constrained_events).generated_text), SCHEMAS[0])
    assert finished(free_events).details["generated_tokens"] <= 8
