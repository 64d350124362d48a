"""A training run killed mid-write must resume: every file a resumed run reads back is written
whole or not at all (`training.common.write_whole`), never torn."""

from __future__ import annotations

import json
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest

from training.common import write_whole
from training.sampling import Sample, load_samples, save_samples
from training.scored import save_scored


def _half_then_die(self, text, *args, **kwargs):
    """Path.write_text as a kill mid-write leaves it: half the text, then the process "dies"."""
    with open(self, "w", encoding="utf-8") as handle:
        handle.write(text[: len(text) // 2])
    raise OSError("killed mid-write")


@pytest.fixture
def killed_mid_write(monkeypatch):
    monkeypatch.setattr(pathlib.Path, "write_text", _half_then_die)


def _samples(n: int) -> list[Sample]:
    return [Sample(i, f"p{i}", [1, 2], [3, i], f"r{i}", greedy=False, reward=0.5) for i in range(n)]


def test_write_whole_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "state.json"
    write_whole(path, '{"a": 1}\n')
    write_whole(path, '{"a": 2}\n')
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_a_kill_mid_write_leaves_the_old_file(tmp_path, killed_mid_write):
    path = tmp_path / "state.json"
    with open(path, "w") as handle:
        handle.write('{"a": 1}\n')
    with pytest.raises(OSError):
        write_whole(path, json.dumps({"a": list(range(100))}))
    assert json.loads(path.read_text()) == {"a": 1}


def test_sample_and_score_caches_survive_a_kill(tmp_path, monkeypatch):
    samples_path, scored_path = tmp_path / "samples.jsonl", tmp_path / "scored.jsonl"
    save_samples(_samples(2), samples_path)
    save_scored(scored_path, _samples(2), np.zeros((2, 2)))
    before = (samples_path.read_text(), scored_path.read_text())

    monkeypatch.setattr(pathlib.Path, "write_text", _half_then_die)
    with pytest.raises(OSError):
        save_samples(_samples(50), samples_path)
    with pytest.raises(OSError):
        save_scored(scored_path, _samples(50), np.ones((50, 2)))
    assert (samples_path.read_text(), scored_path.read_text()) == before
    monkeypatch.undo()
    assert len(load_samples(samples_path)) == 2


def test_the_arm_runs_initial_scores_are_absent_after_a_kill(tmp_path, monkeypatch):
    """The ARM value run keeps the base's pair scores (a full pass) for a resumed run: a torn
    file would make every resume fail to parse it; an absent one is recomputed."""
    from training import value_arm

    monkeypatch.setattr(value_arm, "load_base", lambda *args: (None, None))
    monkeypatch.setattr(value_arm, "arm_scores", lambda *args: {"pair_loss": 0.7, "rank_acc": 0.5})
    config = SimpleNamespace(run=SimpleNamespace(base="base", batch_size=2), beta=0.1)
    cache = tmp_path / "initial_scores.json"

    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "write_text", _half_then_die)
        with pytest.raises(OSError):
            value_arm._initial_scores(config, [], cache, "cpu")
    assert not cache.exists()
    assert value_arm._initial_scores(config, [], cache, "cpu")["rank_acc"] == 0.5
    assert json.loads(cache.read_text())["pair_loss"] == 0.7
