"""Store loading hashes each weight file once per process, and still sees every change."""

from __future__ import annotations

import collections
import os
import shutil

import httpx
import pytest
from safetensors.torch import load_file, save_file

import model_store.validate as validate
from model_store.errors import StoreError
from model_store.validate import check_store
from tests.http_server import running_server


@pytest.fixture
def hashed(monkeypatch):
    """Counter of sha256_file calls per file name."""
    calls: collections.Counter[str] = collections.Counter()
    real = validate.sha256_file

    def counting(path):
        calls[path.resolve().as_posix()] += 1
        return real(path)

    monkeypatch.setattr(validate, "sha256_file", counting)
    return calls


@pytest.fixture
def fresh_store(tiny_store, tmp_path, monkeypatch):
    """A private copy (its own paths, so no other test's verification is reused); its files
    count as settled however recently written (RACY_SECONDS = -inf), as a store copied in a
    while ago would."""
    root = tmp_path / "store"
    shutil.copytree(tiny_store, root)
    monkeypatch.setattr(validate, "RACY_SECONDS", float("-inf"))
    return root


def test_serving_hashes_each_weight_file_once(fresh_store, hashed):
    # What `mage serve` does: check before binding, then the server loads the store.
    checked = check_store(fresh_store)
    with running_server(store=str(fresh_store), device="cpu", dtype="float32") as url:
        assert httpx.get(f"{url}/ready").status_code == 200
    expected = {(fresh_store / rel).resolve().as_posix() for rel in checked.manifest.checksums}
    assert set(hashed) == expected
    assert all(n == 1 for n in hashed.values()), hashed


def test_a_changed_file_is_hashed_again_and_refused(fresh_store, hashed):
    check_store(fresh_store)
    head = fresh_store / "values/helpful-head.safetensors"
    before = head.stat()
    tensors = load_file(str(head))
    tensors["out_bias"] += 1.0
    save_file(tensors, str(head), metadata={"kind": "tied"})
    # Even with size and mtime put back, the rewrite is another inode: hashed again.
    assert head.stat().st_size == before.st_size
    os.utime(head, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert head.stat().st_ino != before.st_ino
    with pytest.raises(StoreError, match="helpful-head.safetensors: checksum mismatch"):
        check_store(fresh_store)
    assert hashed[head.resolve().as_posix()] == 2


def test_recently_written_files_are_not_trusted(tiny_store, tmp_path, hashed):
    # Default RACY_SECONDS: a just-copied store may still change within its timestamp tick.
    root = tmp_path / "store"
    shutil.copytree(tiny_store, root)
    check_store(root)
    check_store(root)
    assert hashed and all(n == 2 for n in hashed.values())
