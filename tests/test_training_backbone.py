"""Backbone training (Eq. 11-12) with TRL's GRPO over LoRA on the tiny random Llama, on CPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from model_store.adapters import load_lora_adapter
from model_store.builder import circulant_backbone_weights
from tests.common import write_tiny_base
from training.backbone import BackboneTrainConfig, train_backbone

pytest.importorskip("trl", minversion="1.16", reason="backbone training uses TRL's GRPOTrainer")

LENGTH = "tests.test_training_backbone:length_reward"
VOWELS = "tests.test_training_backbone:vowel_reward"


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Cheap reward with spread on random text: response length, capped, in [0, 1]."""
    return [min(len(r), 40) / 40.0 for r in responses]


def vowel_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A second cheap objective: share of vowels among the response's characters."""
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


def broken_reward(prompts: list[str], responses: list[str]) -> list[float]:
    raise RuntimeError("scorer exploded")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bb-base") / "base"
    write_tiny_base(path)
    return path


def _config(base: Path, out: Path, steps: int) -> BackboneTrainConfig:
    return BackboneTrainConfig(
        base=base,
        rewards=[LENGTH, VOWELS],
        weights=[0.7, 0.3],
        out=out,
        steps=steps,
        kl=0.05,
        lr=1e-2,
        rank=4,
        lora_alpha=8,
        prompts_per_step=2,
        num_generations=2,
        max_completion_length=6,
        max_prompts=8,
        save_steps=1,
        progress=False,
    )


@pytest.fixture(scope="module")
def first_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("bb-run") / "out"
    return out, train_backbone(_config(base, out, steps=2))


def test_backbone_adapter_is_trained_and_loads(first_run):
    out, result = first_run
    assert result.global_step == 2 and result.steps_run == 2 and result.resumed_from is None
    adapter = load_lora_adapter(result.adapter_dir, "bb", torch.float32)
    assert {m.rsplit(".", 1)[-1] for m in adapter.modules} == {"q_proj", "v_proj"}
    # PEFT initialises B = 0: a non-zero B means the policy moved away from the base.
    assert all(f.lora_b.abs().max() > 0 for f in adapter.modules.values())
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config.get("modules_to_save")
    assert not list(result.adapter_dir.glob("*.bin"))


def test_backbone_logs_per_reward_means_and_kl(first_run):
    out, result = first_run
    assert set(result.reward_means) == {LENGTH, VOWELS}
    assert all(0.0 <= v <= 1.0 for v in result.reward_means.values())
    lines = [json.loads(line) for line in (out / "log.jsonl").open()]
    assert [entry["step"] for entry in lines] == [1, 2]
    for entry in lines:
        h = 0.7 * entry[f"rewards/{LENGTH}/mean"] + 0.3 * entry[f"rewards/{VOWELS}/mean"]
        assert entry["reward"] == pytest.approx(h, abs=1e-5)  # h_i = w_i^T r (Eq. 11)
        assert "kl" in entry


def test_backbone_resume_continues(first_run, base, tmp_path):
    import shutil

    out, _ = first_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    result = train_backbone(_config(base, copy, steps=3))
    assert result.resumed_from == copy / "checkpoints" / "checkpoint-2"
    assert result.steps_run == 1 and result.global_step == 3
    state = json.loads((copy / "checkpoints/checkpoint-3/trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_backbone_rerun_of_a_finished_run_trains_no_more(first_run, base, tmp_path):
    """A build run again (everything resumes) must not add a step to a finished backbone:
    the adapter comes from the last checkpoint, unchanged."""
    import shutil

    from safetensors.torch import load_file

    out, first = first_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    result = train_backbone(_config(base, copy, steps=2))
    assert result.steps_run == 0 and result.global_step == 2
    assert result.resumed_from == copy / "checkpoints" / "checkpoint-2"
    assert not (copy / "checkpoints" / "checkpoint-3").exists()
    assert len((copy / "log.jsonl").read_text().splitlines()) == 2
    trained = load_file(first.adapter_dir / "adapter_model.safetensors")
    again = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert trained.keys() == again.keys() and all(trained[k].equal(again[k]) for k in trained)


def test_backbone_resume_refuses_other_weights(first_run, base, tmp_path):
    import shutil

    from training.common import TrainingError

    out, _ = first_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    config = _config(base, copy, steps=3)
    config.weights = [0.3, 0.7]
    with pytest.raises(TrainingError, match="weights"):
        train_backbone(config)


def _cli(argv: list[str]) -> int:
    from training.cli import add_train_commands

    parser = argparse.ArgumentParser(prog="mage")
    add_train_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


TINY = ["--steps", "1", "--max-prompts", "4", "--num-generations", "2"]
TINY += ["--max-completion-length", "4", "--rank", "2", "--no-progress", "--lr", "1e-2"]


def test_train_backbones_writes_a_valid_store(base, tmp_path, capsys):
    from model_store.validate import check_store

    store = tmp_path / "store"
    rc = _cli(
        ["train", "backbones", "--base", str(base), "--rewards", f"{LENGTH},{VOWELS}"]
        + ["--beta", "0.7", "--store", str(store)]
        + TINY
    )
    assert rc == 0, capsys.readouterr().err
    checked = check_store(store)
    manifest = checked.manifest
    assert manifest.objectives == [LENGTH, VOWELS] and manifest.beta == 0.7
    weights = circulant_backbone_weights([LENGTH, VOWELS], 0.7)
    assert [b.weights for b in manifest.backbones] == weights
    assert Path(checked.base_path) == base.resolve()
    assert not list(store.rglob("checkpoint-*"))  # training state stays outside the store
    assert (tmp_path / "store-work").is_dir()
    from model_store.costs import read_store_costs

    costs = read_store_costs(store)["backbones"]  # each backbone's training, for mage eval
    assert len(costs) == 2 and all(c["steps"] == 1 and c["cpu_s"] > 0 for c in costs.values())


def test_train_backbone_cli_trains_one(base, tmp_path, capsys):
    out = tmp_path / "one"
    rc = _cli(
        ["train", "backbone", "--base", str(base), "--rewards", f"{LENGTH},{VOWELS}"]
        + ["--weights", "0.7,0.3", "--out", str(out)]
        + TINY
    )
    assert rc == 0, capsys.readouterr().err
    assert "reward means" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--rewards", f"{LENGTH},{VOWELS}", "--weights", "0.5,0.6"], "--weights"),
        (["--rewards", f"{LENGTH},{VOWELS}", "--weights", "1"], "--weights"),
        (["--rewards", f"{LENGTH},{VOWELS}"], "--weights"),
        (["--rewards", "no-such-reward"], "no-such-reward"),
        (["--rewards", LENGTH, "--kl", "0"], "--kl"),
    ],
)
def test_train_backbone_cli_errors(base, tmp_path, capsys, extra, needle):
    rc = _cli(["train", "backbone", "--base", str(base), "--out", str(tmp_path / "o")] + extra)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err


def test_train_backbone_cli_missing_base(tmp_path, capsys):
    missing = tmp_path / "missing-base"
    rc = _cli(
        ["train", "backbone", "--base", str(missing), "--rewards", LENGTH]
        + ["--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and str(missing) in err


def test_train_backbones_cli_bad_beta(base, tmp_path, capsys):
    rc = _cli(
        ["train", "backbones", "--base", str(base), "--rewards", f"{LENGTH},{VOWELS}"]
        + ["--beta", "0.3", "--store", str(tmp_path / "s")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--beta" in err


def test_train_backbone_cli_reward_failure_is_reported(base, tmp_path, capsys):
    rc = _cli(
        ["train", "backbone", "--base", str(base), "--out", str(tmp_path / "o")]
        + ["--rewards", "tests.test_training_backbone:broken_reward"]
        + TINY
    )
    err = capsys.readouterr().err
    assert rc == 2 and "scorer exploded" in err and "Traceback" not in err
