"""`mage serve` in a child process for the benchmarks, with its memory read from /proc."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A `mage serve` child on a free loopback port (quiet logs, offline)."""

    def __init__(self, store: str, flags: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "cli.main", "serve", "--store", store]
        command += ["--port", str(self.port), "--log-level", "warning", *flags]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"mage serve exited with {self.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise TimeoutError("the server did not become ready")

    def memory_mib(self, field: str = "VmRSS") -> float:
        """VmRSS (resident now) or VmHWM (peak since the last reset_peak)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@contextlib.contextmanager
def serving(store: str, flags: list[str]) -> Iterator[ServerProcess]:
    """A ready server for the block, stopped after it."""
    server = ServerProcess(store, flags)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
