"""Data shipped with the package: the demo store and the prompt set.

In a checkout they live in ``demo/store`` and ``data/prompts``; ``pip install .`` installs
them as the data packages ``mage_data.demo_store`` and ``mage_data.prompts`` (see
pyproject.toml), so `mage serve` without ``--store`` and the training/evaluation prompts work
from an installed package too. Both are namespace packages (no ``__init__.py``: the store
folder holds only the store), so they are found with ``find_spec`` rather than
``importlib.resources.files``, which on Python 3.11 cannot read a namespace package that an
editable install maps to a folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEMO_STORE_PACKAGE = "mage_data.demo_store"
PROMPTS_PACKAGE = "mage_data.prompts"
_CHECKOUT = Path(__file__).resolve().parents[1]


def package_folder(package: str) -> Path | None:
    """The folder of an installed (namespace) data package, or None if not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:  # the parent `mage_data` is absent
        return None
    for entry in (spec.submodule_search_locations or []) if spec else []:
        if Path(entry).is_dir():
            return Path(entry)
    return None


def _shipped(package: str, checkout_relative: str, marker: str) -> Path:
    """The installed data package's folder, else the source checkout's; `marker` must exist."""
    for folder in (package_folder(package), _CHECKOUT / checkout_relative):
        if folder is not None and (folder / marker).is_file():
            return folder
    raise FileNotFoundError(
        f"{package} is not installed and {_CHECKOUT / checkout_relative} has no {marker}"
    )


def demo_store_path() -> Path:
    """The embedded demo store (`mage serve` without --store serves it)."""
    return _shipped(DEMO_STORE_PACKAGE, "demo/store", "mage_store.json")


def prompts_dir() -> Path:
    """The project's prompt set: {train,validation,test}.jsonl."""
    return _shipped(PROMPTS_PACKAGE, "data/prompts", "test.jsonl")
