"""Tests of the project's prompt set and its loader."""

from __future__ import annotations

import json

import pytest

from objectives.prompts import SPLITS, load_prompts


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


def test_a_users_jsonl_file_is_a_split(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "first"}\n\n{"id": "x", "prompt": "second"}\n')
    assert load_prompts(str(path)) == [
        {"prompt": "first", "id": "mine-1"},
        {"id": "x", "prompt": "second"},
    ]
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match=r"mine.jsonl:2: expected"):
        load_prompts(str(path))
    with pytest.raises(ValueError, match="missing.jsonl: prompt file does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_printed_metrics_are_strict_json():
    from training.common import strict_json

    text = strict_json({"rank_acc": float("nan"), "curve": [1.0, float("inf")], "n": 3})
    assert text == '{"rank_acc": null, "curve": [1.0, null], "n": 3}'
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
