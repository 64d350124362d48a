"""`mage serve` refuses to start on folders it cannot use: exit 2 and one line, no traceback.

The container case: a read-only root filesystem with $HOME mounted for another user (or not at
all) leaves MAGE_CACHE_DIR unwritable, and the demo store's GGUF base must be converted there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli.main import main

ROOT = Path(__file__).resolve().parents[1]
DEMO_STORE = ROOT / "demo" / "store"


def serve_with_cache(cache: Path, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setenv("MAGE_CACHE_DIR", str(cache))
    code = main(["serve", "--store", str(DEMO_STORE), "--port", "1"])
    return code, capsys.readouterr().err


def assert_one_line_exit_2(code: int, err: str, path: Path) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mage serve: cannot start: ")
    assert str(path) in lines[0]
    assert "MAGE_CACHE_DIR" in lines[0] and "HOME" in lines[0]
    assert "Traceback" not in err


def test_cache_folder_that_cannot_be_created(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "home"
    blocker.write_text("a file where the cache folder's parent should be")
    code, err = serve_with_cache(blocker / ".cache" / "mage", monkeypatch, capsys)
    assert_one_line_exit_2(code, err, blocker)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cache_folder_without_write_permission(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir(mode=0o555)  # like a tmpfs mounted at $HOME for root
    try:
        code, err = serve_with_cache(home / ".cache" / "mage", monkeypatch, capsys)
    finally:
        home.chmod(0o755)
    assert_one_line_exit_2(code, err, home / ".cache")
    assert "Permission denied" in err


def test_existing_cache_folder_without_write_permission_fails_before_converting(
    tmp_path, monkeypatch
):
    """An existing folder this user may not write in is refused at once (as root: a folder
    whose permission check is made to fail), not after the minutes of a GGUF conversion."""
    from model_store import gguf

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(gguf.os, "access", lambda path, mode: Path(path) != cache / "bases")
    (cache / "bases").mkdir()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted into a folder it cannot write")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", no_conversion)
    monkeypatch.setenv("MAGE_CACHE_DIR", str(cache))
    with pytest.raises(PermissionError) as info:
        gguf.packaged_base(gguf.SMOLLM2_PACKAGE, gguf.SMOLLM2_FILE)
    assert info.value.filename == str(cache / "bases")
