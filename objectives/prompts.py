"""Prompts: the project's prompt set in ``data/prompts/{train,validation,test}.jsonl``
(installed as the data package ``mage_data.prompts``; see model_store/resources.py), or a
user's own JSONL file, wherever a command takes a split."""

from __future__ import annotations

import json
from pathlib import Path

from model_store.resources import prompts_dir

SPLITS = ("train", "validation", "test")
_ALIASES = {"val": "validation", "dev": "validation"}


def prompts_path(split: str) -> Path:
    """The JSONL file of `split`: a split name of the project's set, or a path to a file of
    one's own (any name ending in .jsonl, or an existing file)."""
    if split.endswith(".jsonl") or Path(split).is_file():
        path = Path(split)
        if not path.is_file():
            raise ValueError(f"{path}: prompt file does not exist")
        return path
    name = _ALIASES.get(split, split)
    if name not in SPLITS:
        raise ValueError(
            f"unknown prompt split {split!r}; expected one of {', '.join(SPLITS)} "
            'or a .jsonl file of {"prompt": ...} lines'
        )
    return prompts_dir() / f"{name}.jsonl"


def load_prompts(split: str) -> list[dict]:
    """The prompts of one split, in file order, as ``{"id": str, "prompt": str}`` dicts.

    ``split`` is ``"train"``, ``"validation"`` (alias ``"val"``/``"dev"``), ``"test"``, or a
    JSONL file with one ``{"prompt": str}`` object per line (``"id"`` optional: the file
    name and line number by default). Raises ``ValueError`` for an unknown split or a
    malformed line (naming file and line).
    """
    path = prompts_path(split)
    records: list[dict] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc})") from exc
            if isinstance(record, dict) and "id" not in record:
                record["id"] = f"{path.stem}-{lineno}"
            if (
                not isinstance(record, dict)
                or not isinstance(record.get("id"), str)
                or not isinstance(record.get("prompt"), str)
                or not record["prompt"].strip()
            ):
                raise ValueError(f"{path}:{lineno}: expected {{'prompt': str, 'id': str}}")
            records.append(record)
    return records
