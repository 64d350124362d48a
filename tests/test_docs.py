"""The front door stays true: the docs build strictly, the README is short and its links
resolve, its architecture list is the served one, and no stale or outside words remain."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model_store.architectures import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT_SUFFIXES = {".md", ".py", ".toml", ".yaml", ".yml", ".sh", ".html", ".cfg", ".txt", ".jinja"}
TEXT_SUFFIXES |= {".json", ".jsonl"}  # store manifests, adapter configs, build reports
SKIPPED_DIRS = {".venv", ".git", "build", "dist", ".cache", ".pytest_cache", ".ruff_cache"}
STALE = re.compile(
    "|".join(
        [
            r"\bissues? #?\d+",  # issue numbers: the tracker is not part of the product
            r"\bthis\s+session\b",  # when a sentence was written, not what holds
            r"\bthis\s+(?:[\w-]+\s+){0,2}machine\b",  # where it was measured: say which machine
            r"\.\./shared\b",  # a path outside the repository
            r"\"/(?:work|home|root|Users)/",  # a machine-local path written into a file
        ]
    ),
    re.IGNORECASE,
)


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mkdocs", "build", "--strict"]
    command += ["--config-file", str(config), "--site-dir", str(site)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_the_docs_build_strictly(tmp_path):
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "serve-your-own-model" / "index.html").is_file()


def test_a_broken_link_fails_the_build(tmp_path):
    """The strict build is what catches drift: a link to a missing page must fail it."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "api.md"
    page.write_text(page.read_text() + "\nSee [gone](no-such-page.md).\n")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0 and "no-such-page.md" in result.stdout + result.stderr


def test_the_readme_is_short_and_its_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "the README links to the docs"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing


def test_every_docs_page_is_linked_from_the_readme_or_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if p not in nav] == []


def test_the_readme_lists_the_served_architectures():
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- architectures:", 1)[1].split("-->", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"`(\w+)`", block) == list(ARCHITECTURES)


def _candidate_paths() -> list[Path]:
    """What a commit could carry: git's tracked and untracked-but-not-ignored files (so run
    folders and other ignored outputs, which hold machine paths by nature, are not read);
    every file under the root where git is unavailable."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True, text=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return list(ROOT.rglob("*"))
    return [ROOT / name for name in listed.split("\0") if name]


def _text_files() -> list[Path]:
    files = []
    for path in _candidate_paths():
        if any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in path.parts):
            continue
        if path.is_file() and (
            path.suffix in TEXT_SUFFIXES or path.name in ("Makefile", "Dockerfile")
        ):
            files.append(path)
    return files


@pytest.mark.parametrize(
    "pattern",
    ["issue 9", "Issue 11", "this session", "this\n2-core machine", "../shared/seed", '"/work/x'],
)
def test_the_stale_word_check_catches(pattern):
    assert STALE.search(f"as {pattern} said")


def test_no_stale_or_outside_words_in_the_repository():
    this_file = Path(__file__).resolve()
    found = []
    for path in _text_files():
        if path == this_file:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in STALE.finditer(text):  # on the whole text: a phrase may wrap lines
            line = text.count("\n", 0, match.start()) + 1
            found.append(f"{path.relative_to(ROOT)}:{line}: {match.group(0)!r}")
    assert not found, "\n".join(found)


def test_the_settings_table_lists_every_setting():
    from server.settings import ServerSettings

    text = (ROOT / "docs" / "settings-and-metrics.md").read_text(encoding="utf-8")
    first_cells = re.findall(r"^\| (`--[^|]+)\|", text, re.M)
    flags = {flag for cell in first_cells for flag in re.findall(r"`(--[a-z-]+)`", cell)}
    assert flags == {"--" + name.replace("_", "-") for name in ServerSettings.model_fields}
