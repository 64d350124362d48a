"""Optional extras: which `mage` subcommands need one, and a plain message when it is missing.

`pip install .` installs the server only; training and evaluation dependencies are the
extras ``[train]`` and ``[eval]`` of pyproject.toml (tests/test_install.py keeps the two in
step). A subcommand whose extra is not installed says which one to install instead of
failing with a traceback.
"""

from __future__ import annotations

import argparse
import importlib

DISTRIBUTION = "mage-server"

EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "train": ("trl", "datasets", "vaderSentiment", "tqdm"),
    "eval": ("moocore", "matplotlib", "tqdm", "vaderSentiment"),
}
"""Import names of each extra's packages (its declared dependencies in pyproject.toml)."""

COMMAND_EXTRAS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("train",): ("train",),
    ("store", "build-demo"): ("train",),
    ("eval",): ("eval",),
    ("tune", "alpha"): ("eval",),
    ("tune", "gamma"): ("eval",),
    ("tune", "beta"): ("train", "eval"),
}
"""Subcommand (as typed, without options) -> the extras it needs; absent ones need none."""


def command_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The subcommand words of parsed `mage` arguments, e.g. ("tune", "beta")."""
    words = [args.command]
    for attr in ("store_command", "tune_command", "train_command"):
        if getattr(args, attr, None):
            words.append(getattr(args, attr))
    return tuple(words)


def extras_for(command: tuple[str, ...]) -> tuple[str, ...]:
    """The extras a subcommand needs (the longest matching prefix in COMMAND_EXTRAS)."""
    for length in range(len(command), 0, -1):
        if command[:length] in COMMAND_EXTRAS:
            return COMMAND_EXTRAS[command[:length]]
    return ()


def install_hint(extras: tuple[str, ...]) -> str:
    """The pip command that installs `extras`."""
    return f"pip install '{DISTRIBUTION}[{','.join(extras)}]'"


def missing_message(command: tuple[str, ...], modules: list[str]) -> str:
    """What `mage <command>` prints when `modules` of its extras cannot be imported."""
    extras = extras_for(command) or tuple(
        sorted({e for e, mods in EXTRA_MODULES.items() for m in modules if m in mods})
    )
    names = ", ".join(modules)
    label = " and ".join(f"'{e}'" for e in extras)
    return (
        f"mage {' '.join(command)}: needs the {label} extra{'s' if len(extras) > 1 else ''} "
        f"(missing: {names}); install with: {install_hint(extras)}"
    )


def missing_modules(extras: tuple[str, ...]) -> list[str]:
    """The import names of `extras` that cannot be imported, in declaration order."""
    missing: list[str] = []
    for module in dict.fromkeys(m for extra in extras for m in EXTRA_MODULES[extra]):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def extra_module(exc: ModuleNotFoundError) -> str | None:
    """The top-level import name if `exc` is about a package of some extra, else None."""
    top = (exc.name or "").split(".")[0]
    return top if any(top in mods for mods in EXTRA_MODULES.values()) else None
