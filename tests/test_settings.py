"""Settings come from MAGE_* environment variables, and CLI flags override them."""

from __future__ import annotations

import cli.main
from server.settings import ServerSettings


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("MAGE_MAX_QUEUE", "7")
    monkeypatch.setenv("MAGE_DEVICE", "cpu")
    settings = ServerSettings()
    assert settings.max_queue == 7 and settings.device == "cpu"


def test_cli_flags_override_environment(monkeypatch, tiny_store):
    monkeypatch.setenv("MAGE_MAX_QUEUE", "7")
    monkeypatch.setenv("MAGE_PORT", "9999")
    seen = {}

    def fake_run(app, **options):  # mage serve runs uvicorn.run(app, **options): never bind
        seen.update(host=options["host"], port=options["port"], settings=app.state.serving.settings)

    monkeypatch.setattr("uvicorn.run", fake_run)
    argv = ["serve", "--store", str(tiny_store), "--max-queue", "3", "--request-timeout-s", "2.5"]
    assert cli.main.main(argv) == 0
    settings = seen["settings"]
    assert settings.max_queue == 3 and settings.request_timeout_s == 2.5
    assert seen["port"] == 9999  # from the environment, no flag given
