"""Autoregressive reward model training (GenARM/PARM) on the tiny random Llama, offline on CPU."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from tests.common import write_tiny_base
from tests.test_training_value import REWARD  # longer responses win: a planted preference
from tests.test_training_value import _config as value_config
from training.sampling import Sample
from training.value_arm import (
    ArmTrainConfig,
    arm_rewards,
    pair_loss,
    ranked_pairs,
    train_arm_value,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("arm-base") / "base"
    write_tiny_base(path)
    return path


def _config(base, out, epochs: int = 3) -> ArmTrainConfig:
    """The tied value model's test run (6 + 3 prompts x 4 responses), as an ARM."""
    return ArmTrainConfig(replace(value_config(base, out, epochs), device="cpu"), beta=0.5)


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("arm-run") / "out"
    return out, train_arm_value(_config(base, out))


def test_training_lowers_the_pairwise_loss_on_a_planted_preference(trained):
    out, result = trained
    m = result.metrics
    assert m["kind"] == "arm" and m["beta"] == 0.5 and m["train_pairs"] > 10
    assert m["final_train_pair_loss"] < m["initial_train_pair_loss"] - 0.05
    assert m["final_train_rank_acc"] > m["initial_train_rank_acc"]
    assert result.steps_run == m["steps"] and m["history"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert m["validation"]["pairs"] > 0 and 0.0 <= m["validation"]["rank_acc"] <= 1.0


def test_the_trl_route_computes_the_arm_loss(trained, base):
    """ReferenceFreeDPOTrainer's loss on a batch equals -log sigmoid(beta [log pi_r(y_w) -
    log pi_r(y_l)]) computed directly from the trained model (no reference term)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from training.runs import RunLog
    from training.sampling import load_samples
    from training.value_arm import _trainer

    out, result = trained
    samples = load_samples(out / "samples-train.jsonl")
    pairs = ranked_pairs(samples)[:4]
    rows = [
        {
            "prompt_ids": samples[w].prompt_ids,
            "chosen_ids": samples[w].response_ids,
            "rejected_ids": samples[lost].response_ids,
        }
        for w, lost in pairs
    ]
    config = _config(base, out)
    trainer = _trainer(config, rows, 1, 1, RunLog(out))
    trained_lora = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(trainer.model, trained_lora)
    trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
    rewards = arm_rewards(trainer.model, samples, config.beta, 4, torch.device("cpu"))
    assert trl_loss == pytest.approx(pair_loss(rewards, pairs), abs=1e-4)


def test_a_finished_run_called_again_does_not_retrain(trained, base):
    out, result = trained
    again = train_arm_value(_config(base, out))
    assert again.steps_run == 0 and again.metrics == result.metrics


def test_a_resumed_run_reuses_the_base_scores_it_kept(trained, base, monkeypatch):
    """The base's pass over every training pair runs once per folder: a resume (here, a run
    whose metrics are gone) reads it back instead of loading the base again for it."""
    import training.value_arm as arm

    out, result = trained
    kept = json.loads((out / "initial_scores.json").read_text())
    assert kept["pair_loss"] == result.metrics["initial_train_pair_loss"]
    calls = []
    monkeypatch.setattr(arm, "arm_scores", lambda *a, **k: calls.append(a[1]) or kept)
    (out / "metrics.json").rename(out / "metrics.moved")
    try:
        train_arm_value(_config(base, out))
    finally:
        (out / "metrics.moved").replace(out / "metrics.json")
    train_samples = 6 * 4
    assert [len(s) for s in calls if len(s) == train_samples] == [train_samples]  # after only


def test_resume_refuses_another_beta(trained, base):
    from training.common import TrainingError

    out, _ = trained
    with pytest.raises(TrainingError, match="beta"):
        train_arm_value(replace(_config(base, out), beta=0.2))


def test_ranked_pairs_put_the_higher_reward_first_and_skip_ties():
    def sample(prompt: int, reward: float) -> Sample:
        return Sample(prompt, "p", [1], [2], "r", False, reward)

    samples = [sample(0, 0.1), sample(0, 0.9), sample(0, 0.9), sample(1, 0.5), sample(2, 1.0)]
    assert ranked_pairs(samples) == [(1, 0), (2, 0)]
    wide = [sample(0, 0.5), sample(0, 0.1), sample(0, 0.9), sample(1, 0.0), sample(1, 0.3)]
    assert ranked_pairs(wide, per_prompt=1) == [(2, 1), (4, 3)]  # the widest gap a prompt
    assert ranked_pairs(wide, per_prompt=2) == [(2, 1), (0, 1), (4, 3)]
    assert len(ranked_pairs(wide)) == 4
    assert math.isnan(pair_loss([0.0] * 5, []))
    assert pair_loss([0.0, 1.0], [(1, 0)]) == pytest.approx(-math.log(1 / (1 + math.exp(-1))))


def test_value_compare_ranks_both_kinds_on_the_same_held_out_pairs(trained, base, tmp_path):
    """A tied value model trained on the very same samples, and the ARM, each scored by the
    helper on the validation pairs: the same pair count, and each kind's accuracy equal to
    what its own training run measured on those pairs."""
    import shutil

    from training.value import train_value_model
    from training.value_compare import compare_ranking

    out, arm = trained
    tied_out = tmp_path / "tied"
    tied_out.mkdir()
    for name in ("samples-train.jsonl", "samples-val.jsonl"):
        shutil.copy(out / name, tied_out / name)
    tied = train_value_model(replace(_config(base, out).run, out=tied_out, epochs=1))
    rows = compare_ranking(base, out / "samples-val.jsonl", [tied_out, out], device="cpu")
    assert [row["kind"] for row in rows] == ["tied", "arm"]
    assert rows[0]["pairs"] == rows[1]["pairs"] == arm.metrics["validation"]["pairs"] > 0
    assert rows[0]["rank_acc"] == pytest.approx(tied.metrics["validation"]["rank_acc_final"])
    assert rows[1]["rank_acc"] == pytest.approx(arm.metrics["validation"]["rank_acc"])


def test_cli_trains_an_arm_value_and_compares(base, tmp_path, capsys):
    from cli.main import main as mage

    out = tmp_path / "arm"
    common = ["--base", str(base), "--device", "cpu", "--no-progress"]
    argv = ["train", "value", "--kind", "arm", "--beta", "0.5", *common]
    argv += ["--objective", REWARD, "--out", str(out), "--max-prompts", "3"]
    argv += ["--max-val-prompts", "2", "--epochs", "1", "--max-new-tokens", "6"]
    assert mage(argv) == 0
    printed = capsys.readouterr().out
    assert "pairwise loss" in printed and "kind 'arm', beta 0.5" in printed
    assert mage(["train", "value", "--kind", "arm", "--beta", "-1", *argv[6:]]) == 2
    assert "--beta must be a finite number > 0" in capsys.readouterr().err
    samples = str(out / "samples-val.jsonl")
    compare = ["train", "value-compare", "--base", str(base), "--samples", samples]
    assert mage([*compare, "--run", str(out), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "arm"
    assert mage([*compare, "--run", str(tmp_path), "--device", "cpu"]) == 2
    assert "not a finished `mage train value` run" in capsys.readouterr().err


def test_pairs_per_prompt_trains_on_the_widest_pairs_only(trained, base, tmp_path):
    """--pairs-per-prompt 1: one training pair a prompt (6 prompts here), fewer steps; the
    folder of a run with every pair refuses to resume under the cap."""
    import shutil

    from training.common import TrainingError

    out, full = trained
    run = tmp_path / "capped"
    run.mkdir()
    for name in ("samples-train.jsonl", "samples-val.jsonl"):  # the same responses
        shutil.copy(out / name, run / name)
    capped = train_arm_value(replace(_config(base, run, epochs=1), pairs_per_prompt=1))
    assert capped.metrics["train_pairs"] == 6 and capped.metrics["pairs_per_prompt"] == 1
    assert capped.metrics["validation"]["pairs"] == full.metrics["validation"]["pairs"]
    with pytest.raises(TrainingError, match="pairs_per_prompt"):
        train_arm_value(replace(_config(base, out), pairs_per_prompt=1))
