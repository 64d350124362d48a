"""Shared fixtures: tiny random-weight stores, built once per session on CPU."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from model_store.loader import load_store
from tests.browser import chromium
from tests.common import build_tiny_store
from tests.http_server import running_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """Bone Soup store: circulant B (beta 0.7), alpha 0.2, LoRA value models, and
    Rewarded-Soup specialists."""
    return build_tiny_store(
        tmp_path_factory.mktemp("store") / "s", beta=0.7, alpha=0.2, specialists=True
    )


@pytest.fixture(scope="session")
def soup_store(tmp_path_factory):
    """Rewarded-Soup store: B = I, alpha 0."""
    return build_tiny_store(tmp_path_factory.mktemp("soup") / "s", beta=None, alpha=0.0)


@pytest.fixture(scope="session")
def standalone_store(tmp_path_factory):
    """B = I, alpha 0, standalone value models with dense heads."""
    return build_tiny_store(
        tmp_path_factory.mktemp("standalone") / "s",
        beta=None,
        value_kind="standalone",
        head_kind="dense",
    )


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    """A writable copy of the tiny store, for corrupting."""
    target = tmp_path / "store"
    shutil.copytree(tiny_store, target)
    return target


@pytest.fixture(scope="module")
def client_url(tiny_store):
    """A live server on the tiny store (16 new tokens at most), for the client tests."""
    with running_server(load_store(tiny_store, "cpu", "float32"), max_new_tokens=16) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module (skips, saying why, without one)."""
    with tempfile.TemporaryDirectory(prefix="mage-chromium-") as profile:
        driver = chromium(profile)
        try:
            yield driver
        finally:
            driver.quit()
