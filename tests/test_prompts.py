"""Tests of the project's prompt set and its loader."""

from __future__ import annotations

import pytest

from training.prompts import SPLITS, load_prompts


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {name: load_prompts(name) for name in SPLITS}


def test_each_split_loads(splits):
    sizes = {name: len(records) for name, records in splits.items()}
    # >= 100 test prompts: the comparison's paired bootstrap intervals are over prompts
    assert sizes["train"] >= 150 and sizes["validation"] >= 30 and sizes["test"] >= 100
    total = sum(sizes.values())
    assert 0.55 <= sizes["train"] / total <= 0.8
    for records in splits.values():
        for record in records:
            assert set(record) == {"id", "prompt"}
            assert isinstance(record["id"], str) and record["id"]
            prompt = record["prompt"]
            assert prompt == prompt.strip() and 10 <= len(prompt) <= 300


def test_ids_unique_across_splits(splits):
    ids = [r["id"] for records in splits.values() for r in records]
    assert len(ids) == len(set(ids))


def test_no_prompt_duplicated_within_or_across_splits(splits):
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    seen: dict[str, str] = {}
    for records in splits.values():
        for record in records:
            key = norm(record["prompt"])
            assert key not in seen, f"{record['id']} duplicates {seen[key]}"
            seen[key] = record["id"]


def test_aliases_and_unknown_split():
    assert load_prompts("val") == load_prompts("validation")
    with pytest.raises(ValueError, match="unknown prompt split 'training'"):
        load_prompts("training")
