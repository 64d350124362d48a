"""Each request option is declared once: the shared sampling fields live in
server.schemas.SamplingOptions and the settings-bounded types (max tokens, stop lists, prompt
texts) in server.schemas.limits; the TGI and OpenAI bodies and the engine's SamplingParams
derive from them, so no route can drift from another."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import httpx
import pytest

from guidance.requests import SamplingParams
from model_store.loader import load_store
from server.openai_schemas import openai_body_types
from server.schemas import SAMPLING_FIELDS, SamplingOptions, request_body_type
from server.settings import ServerSettings
from server.translate import Options, Prompt, build_request
from tests.http_server import running_server

SERVER = Path(__file__).resolve().parents[1] / "server"
OVERRIDES = {("openai_schemas.py", "Common", "temperature")}
"""Re-typed on purpose: OpenAI allows temperature 0 (greedy), TGI does not."""


@pytest.fixture(scope="module")
def loaded(tiny_store):
    return load_store(tiny_store, "cpu", "float32")


SETTINGS = ServerSettings(max_new_tokens=77, max_stop_sequences=3, max_input_tokens=50)
"""Limits unlike the defaults, so a route that ignores one of them shows."""


def _tgi_bodies(settings: ServerSettings = SETTINGS) -> tuple[type, type]:
    union = typing.get_args(request_body_type(settings))[0]
    text, chat = (typing.get_args(member)[0] for member in typing.get_args(union))
    return text, chat


def _tgi_parameters() -> type:
    return _tgi_bodies()[0].model_fields["parameters"].annotation


def _schema(model: type, name: str) -> dict:
    return model.model_json_schema()["properties"][name]


@pytest.mark.parametrize("body", ["tgi", "chat", "completions"])
def test_every_route_takes_the_shared_sampling_fields_as_declared(body):
    chat, completions = openai_body_types(SETTINGS)
    model = {"tgi": _tgi_parameters(), "chat": chat, "completions": completions}[body]
    for name in SAMPLING_FIELDS:
        if body != "tgi" and name == "temperature":
            continue  # OVERRIDES
        assert _schema(model, name) == _schema(SamplingOptions, name), name


def _core(schema: dict) -> dict:
    """A field's JSON schema without the words and defaults that differ by route."""
    return {k: v for k, v in schema.items() if k not in ("title", "description", "default")}


def _member(schema: dict, index: int) -> dict:
    return _core(schema["anyOf"][index])


def test_the_settings_bounded_fields_are_the_same_on_every_route():
    """max_new_tokens and max_tokens, the stop lists, the prompts and the message texts take
    the same bounds from the settings on both APIs."""
    text, chat = _tgi_bodies()
    tgi = _tgi_parameters()
    openai_chat, completions = openai_body_types(SETTINGS)
    message = chat.model_fields["messages"].annotation.__args__[0]
    openai_message = openai_chat.model_fields["messages"].annotation.__args__[0]
    max_new = _core(_schema(tgi, "max_new_tokens"))
    assert _member(_schema(tgi, "max_new_tokens"), 0)["maximum"] == 77
    for model, name in [
        (openai_chat, "max_tokens"),
        (openai_chat, "max_completion_tokens"),
        (completions, "max_tokens"),
    ]:
        assert _core(_schema(model, name)) == max_new, name
    stops = _core(_schema(tgi, "stop"))
    assert stops["maxItems"] == 3
    assert _member(_schema(completions, "stop"), 1) == stops
    assert _member(_schema(openai_chat, "stop"), 1) == stops
    prompt = _core(_schema(text, "inputs"))
    assert prompt["maxLength"] == 50 * 32
    assert _member(_schema(completions, "prompt"), 0) == prompt
    content = _core(_schema(message, "content"))
    assert _member(_schema(openai_message, "content"), 0) == content
    top_n = _core(_schema(tgi, "top_n_tokens"))
    assert _core(_schema(openai_chat, "top_logprobs")) == top_n
    assert _core(_schema(completions, "logprobs")) == top_n


def test_every_shared_field_reaches_the_engine_by_its_name(loaded):
    """SamplingParams, the engine's frozen form, has each shared field under the same name,
    and a value given at the edge is the value the engine gets."""
    engine_fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(SAMPLING_FIELDS) <= engine_fields
    given = {
        "temperature": 0.7,
        "top_k": 5,
        "top_p": 0.9,
        "typical_p": 0.8,
        "repetition_penalty": 1.2,
        "seed": 11,
    }
    assert set(given) == set(SAMPLING_FIELDS)  # a new field needs a value here
    for name, value in given.items():
        options = Options(sampling=SamplingOptions.model_validate({name: value}))
        request = build_request(Prompt(text="Hi"), options, loaded, ServerSettings())
        assert getattr(request.sampling, name) == value, name


def test_no_shared_field_is_declared_a_second_time():
    declared = []
    for path in sorted(SERVER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name != "SamplingOptions":
                for statement in node.body:
                    target = getattr(statement, "target", None)
                    if isinstance(statement, ast.AnnAssign) and isinstance(target, ast.Name):
                        if target.id in SAMPLING_FIELDS:
                            declared.append((path.name, node.name, target.id))
    assert set(declared) == OVERRIDES


def test_the_same_sampling_request_gives_the_same_tokens_on_every_route(loaded):
    with running_server(loaded) as url:
        _same_tokens_on_every_route(url)


def _same_tokens_on_every_route(url: str) -> None:
    sampling = {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "typical_p": 0.95, "seed": 3}
    sampling["repetition_penalty"] = 1.3
    tgi = httpx.post(
        f"{url}/generate",
        json={"inputs": "Hi", "parameters": {**sampling, "max_new_tokens": 12}},
        timeout=30,
    ).json()
    openai = httpx.post(
        f"{url}/v1/completions",
        json={"prompt": "Hi", **sampling, "max_tokens": 12},
        timeout=30,
    ).json()
    assert openai["choices"][0]["text"] == tgi["generated_text"]
    greedy = httpx.post(
        f"{url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 12}}, timeout=30
    ).json()
    assert greedy["generated_text"] != tgi["generated_text"]  # the sampling fields took effect
