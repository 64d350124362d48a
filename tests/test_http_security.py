"""API keys and CORS: what needs a key, how a missing one is answered, and that keys never
show up in settings reprs or logs."""

from __future__ import annotations

import logging

import httpx
import pytest

import cli.main
from model_store.loader import load_store
from server.settings import ServerSettings
from tests.http_server import metric, running_server

KEYS = ["key-one-3f9a", "key-two-77c1"]
GENERATE = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}


@pytest.fixture(scope="module")
def loaded(tiny_store):
    return load_store(tiny_store, "cpu", "float32")


@pytest.fixture(scope="module")
def keyed(loaded):
    with running_server(loaded, api_key=KEYS) as url:
        yield url


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/generate"),
        ("POST", "/generate_stream"),
        ("GET", "/info"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/"),
        ("POST", "/"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
    ],
)
def test_routes_need_a_key(keyed, method, path):
    message = "missing or invalid API key: send the header `Authorization: Bearer <key>`"
    for headers in ({}, bearer("wrong"), {"Authorization": KEYS[0]}, {"Authorization": "Basic x"}):
        response = httpx.request(method, f"{keyed}{path}", json=GENERATE, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert response.headers["www-authenticate"] == "Bearer"
        if path.startswith("/v1/"):  # OpenAI's error shape on its routes
            assert response.json() == {
                "error": {
                    "message": message,
                    "type": "authentication_error",
                    "param": None,
                    "code": "unauthorized",
                }
            }
        else:
            assert response.json() == {"error": message, "error_type": "unauthorized"}


def test_every_configured_key_works(keyed):
    for key in KEYS:
        response = httpx.post(f"{keyed}/generate", json=GENERATE, headers=bearer(key), timeout=30)
        assert response.status_code == 200, response.text
        assert httpx.get(f"{keyed}/docs", headers=bearer(key)).status_code == 200
    # "bearer" is case-insensitive (RFC 9110 auth schemes)
    assert httpx.get(f"{keyed}/info", headers={"Authorization": f"bearer {KEYS[1]}"}).is_success


def test_probes_and_metrics_stay_open(keyed):
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{keyed}{path}").status_code == 200, path
    assert metric(keyed, 'mage_requests_total{outcome="unauthorized"}') >= 1


def test_metrics_can_require_the_key(loaded):
    with running_server(loaded, api_key=KEYS, metrics_require_key=True) as url:
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers=bearer(KEYS[0])).status_code == 200
        assert httpx.get(f"{url}/ready").status_code == 200


def test_openapi_declares_the_bearer_scheme(keyed):
    spec = httpx.get(f"{keyed}/openapi.json", headers=bearer(KEYS[0])).json()
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    generate = spec["paths"]["/generate"]["post"]
    assert generate["security"] == [{"bearer": []}] and "401" in generate["responses"]
    assert spec["paths"]["/health"]["get"]["security"] == []


def test_keys_come_from_env_and_repeated_flags_and_are_never_printed(monkeypatch, caplog):
    monkeypatch.setenv("MAGE_API_KEY", "alpha-secret, beta-secret")
    settings = ServerSettings()
    assert [k.get_secret_value() for k in settings.api_key] == ["alpha-secret", "beta-secret"]
    assert "alpha-secret" not in repr(settings) and "alpha-secret" not in str(settings)
    monkeypatch.delenv("MAGE_API_KEY")
    seen = {}
    monkeypatch.setattr("model_store.validate.check_store", lambda path: None)
    # mage serve runs uvicorn.run(app, **options): capture, never bind.
    monkeypatch.setattr(
        "uvicorn.run", lambda app, **options: seen.update(settings=app.state.serving.settings)
    )
    caplog.set_level(logging.DEBUG)
    argv = ["serve", "--store", "x", "--api-key", "flag-one", "--api-key", "flag-two"]
    argv += ["--cors-origins", "https://a.example,https://b.example", "--metrics-require-key"]
    assert cli.main.main(argv) == 0
    parsed = seen["settings"]
    assert [k.get_secret_value() for k in parsed.api_key] == ["flag-one", "flag-two"]
    assert parsed.cors_origins == ["https://a.example", "https://b.example"]
    assert parsed.metrics_require_key is True
    assert "flag-one" not in repr(parsed) and "flag-one" not in caplog.text


def test_keys_are_not_logged_by_the_server(loaded, caplog):
    caplog.set_level(logging.DEBUG)
    with running_server(loaded, api_key=KEYS) as url:
        httpx.post(f"{url}/generate", json=GENERATE, headers=bearer(KEYS[0]), timeout=30)
        httpx.post(f"{url}/generate", json=GENERATE, headers=bearer("guess-" + KEYS[1]))
    assert all(key not in caplog.text for key in KEYS)


def test_cors_is_off_by_default(loaded):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with running_server(loaded) as url:
        response = httpx.options(f"{url}/generate", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
        assert response.status_code == 405 and response.json()["error_type"] == "method_not_allowed"
        simple = httpx.get(f"{url}/health", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in simple.headers


def test_cors_origins_turn_it_on_even_with_keys(loaded):
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with running_server(loaded, cors_origins=["https://app.example"], api_key=KEYS) as url:
        # The browser's preflight carries no key; it must still be answered.
        response = httpx.options(f"{url}/generate", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        refused = httpx.get(f"{url}/info", headers={"Origin": "https://app.example"})
        assert refused.status_code == 401  # and the browser may read why:
        assert refused.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(f"{url}/generate", headers={**preflight, "Origin": "https://evil"})
        assert "access-control-allow-origin" not in other.headers
