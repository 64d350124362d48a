"""Loader for the project's prompt set in ``data/prompts/{train,validation,test}.jsonl``
(installed as the data package ``mage_data.prompts``; see model_store/resources.py)."""

from __future__ import annotations

import json

from model_store.resources import prompts_dir

SPLITS = ("train", "validation", "test")
_ALIASES = {"val": "validation", "dev": "validation"}


def load_prompts(split: str) -> list[dict]:
    """The prompts of one split, in file order, as ``{"id": str, "prompt": str}`` dicts.

    ``split`` is ``"train"``, ``"validation"`` (alias ``"val"``/``"dev"``) or ``"test"``.
    Raises ``ValueError`` for an unknown split or a malformed line (naming file and line).
    """
    name = _ALIASES.get(split, split)
    if name not in SPLITS:
        raise ValueError(f"unknown prompt split {split!r}; expected one of {', '.join(SPLITS)}")
    path = prompts_dir() / f"{name}.jsonl"
    records: list[dict] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc})") from exc
            if (
                not isinstance(record, dict)
                or not isinstance(record.get("id"), str)
                or not isinstance(record.get("prompt"), str)
                or not record["prompt"].strip()
            ):
                raise ValueError(f"{path}:{lineno}: expected {{'id': str, 'prompt': str}}")
            records.append(record)
    return records
