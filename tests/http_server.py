"""Run the real app under uvicorn on a loopback port, in a thread, for HTTP tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import uvicorn

from server.app import create_app
from server.http_protocol import uvicorn_config
from server.settings import ServerSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(loaded=None, wait_ready: bool = True, **settings):
    """Yield the base URL of a live server; `loaded` is a LoadedStore or None (then
    settings['store'] is loaded in the background)."""
    with serving(loaded, wait_ready, **settings) as (url, _):
        yield url


@contextlib.contextmanager
def serving(loaded=None, wait_ready: bool = True, **settings):
    """Like running_server, but yields (url, the app's ServingState)."""
    port = free_port()
    config = ServerSettings(port=port, **settings)
    app = create_app(config, store=loaded)
    config = config.model_copy(update={"host": "127.0.0.1", "log_level": "warning"})
    server = uvicorn.Server(uvicorn_config(app, config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    if wait_ready:
        while time.monotonic() < deadline:
            if httpx.get(f"{url}/ready").status_code == 200:
                break
            time.sleep(0.05)
    try:
        yield url, app.state.serving
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def metric(url: str, name: str) -> float:
    """Sum of every sample of one metric (all label sets) from /metrics."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head == name or head.startswith(name + "{"):
                total += float(value)
    return total


def wait_for(predicate, seconds: float = 20.0) -> bool:
    """Poll `predicate` until it holds (True) or `seconds` pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False
