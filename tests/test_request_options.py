"""Each request option is declared once: the shared sampling fields live in
server.schemas.SamplingOptions, and the TGI and OpenAI bodies and the engine's options derive
from it, so no route can drift from another."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import httpx
import pytest

from model_store.loader import load_store
from server.openai_schemas import openai_body_types
from server.schemas import SAMPLING_FIELDS, SamplingOptions, request_body_type
from server.settings import ServerSettings
from tests.http_server import running_server

SERVER = Path(__file__).resolve().parents[1] / "server"
OVERRIDES = {("openai_schemas.py", "Common", "temperature")}
"""Re-typed on purpose: OpenAI allows temperature 0 (greedy), TGI does not."""


def _tgi_parameters() -> type:
    union = typing.get_args(request_body_type(ServerSettings()))[0]
    text_body = typing.get_args(typing.get_args(union)[0])[0]
    return text_body.model_fields["parameters"].annotation


def _schema(model: type, name: str) -> dict:
    return model.model_json_schema()["properties"][name]


@pytest.mark.parametrize("body", ["tgi", "chat", "completions"])
def test_every_route_takes_the_shared_sampling_fields_as_declared(body):
    chat, completions = openai_body_types(ServerSettings())
    model = {"tgi": _tgi_parameters(), "chat": chat, "completions": completions}[body]
    for name in SAMPLING_FIELDS:
        if body != "tgi" and name == "temperature":
            continue  # OVERRIDES
        assert _schema(model, name) == _schema(SamplingOptions, name), name


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


@pytest.fixture(scope="module")
def url(tiny_store):
    with running_server(load_store(tiny_store, "cpu", "float32")) as url:
        yield url


def test_the_same_sampling_request_gives_the_same_tokens_on_every_route(url):
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
