"""Explicit value model training (Eq. 16) on the tiny random Llama, offline on CPU."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model_store.adapters import load_lora_adapter
from model_store.value_head import load_value_head
from tests.common import write_tiny_base
from training.sampling import SamplingSettings
from training.value import ValueTrainConfig, train_value_model

REWARD = "tests.test_training_value:length_reward"


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A cheap reward with spread on random text: response length, capped, in [0, 1]."""
    return [min(len(r), 40) / 40.0 for r in responses]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("value-base") / "base"
    write_tiny_base(path)
    return path


def _config(base: Path, out: Path, epochs: int) -> ValueTrainConfig:
    return ValueTrainConfig(
        base=base,
        objective=REWARD,
        out=out,
        max_train_prompts=6,
        max_val_prompts=3,
        sampling=SamplingSettings(samples_per_prompt=4, max_new_tokens=10),
        epochs=epochs,
        batch_size=4,
        lr=1e-2,
        rank=4,
        lora_alpha=8,
        progress=False,
    )


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """Exports its last epoch (best_epoch off), so the checks below measure what training
    reached; the best-epoch export has tests of its own."""
    out = tmp_path_factory.mktemp("value-run") / "out"
    return out, train_value_model(replace(_config(base, out, epochs=2), best_epoch=False))


def test_training_lowers_mse_and_reports_metrics(trained):
    out, result = trained
    m = result.metrics
    assert m["final_train_mse"] < 0.5 * m["initial_train_mse"]
    assert m["epoch"] == 2  # the last
    val = m["validation"]
    assert val["responses"] == 3 * 4 and val["pairs"] > 0
    for key in ("rank_acc_final", "rank_acc_mean"):
        assert 0.0 <= val[key] <= 1.0
    assert json.loads((out / "metrics.json").read_text())["final_train_mse"] == pytest.approx(
        m["final_train_mse"]
    )
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    samples = [json.loads(line) for line in (out / "samples-train.jsonl").open()]
    assert len(samples) == 6 * 4 and sum(s["greedy"] for s in samples) == 6
    assert all(s["reward"] == length_reward([], [s["response"]])[0] for s in samples)


def test_saved_model_loads_and_matches_training_values(trained, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.sampling import load_samples
    from training.value import TiedHeadModule, evaluate

    out, result = trained
    head = load_value_head(result.head_path)
    adapter = load_lora_adapter(result.adapter_dir, "value", torch.float32)
    assert adapter.modules and all(f.lora_b.abs().sum() > 0 for f in adapter.modules.values())
    assert "model.layers.0.self_attn.q_proj" in adapter.modules

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), result.adapter_dir
    )
    model.eval()
    embedding = model.get_base_model().get_output_embeddings().weight
    assert head.kind == "tied" and head.vocab_size == embedding.shape[0]
    assert head.hidden_size == embedding.shape[1]

    # Reloaded adapter + head reproduce the validation MSE measured at the end of training.
    tied = TiedHeadModule(head.hidden_size, head.vocab_size, std=0.0, seed=0)
    with torch.no_grad():
        for name, param in tied.named_parameters():
            param.copy_(head.tensors[name])
    val = load_samples(out / "samples-val.jsonl")
    again = evaluate(model, tied, val, 4, torch.device("cpu"))
    assert again["mse"] == pytest.approx(result.metrics["validation"]["mse"], rel=1e-4)

    # The full-vocabulary head the server calls gives the same V[y_t] as training's gather.
    sample = val[0]
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    start, n = len(sample.prompt_ids), len(sample.response_ids)
    with torch.no_grad():
        hidden = model.get_base_model().get_decoder()(input_ids=ids).last_hidden_state[0]
        rows = hidden[start - 1 : start - 1 + n]
        full = head(rows, embedding)  # (n, vocab)
        tokens = torch.tensor(sample.response_ids)
        gathered = tied.token_values(rows, embedding, tokens)
    assert full.shape == (n, embedding.shape[0])
    torch.testing.assert_close(full[torch.arange(n), tokens], gathered, rtol=1e-4, atol=1e-5)


def test_resume_continues_from_last_epoch(trained, base, tmp_path):
    out, first = trained
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = (copy / "samples-train.jsonl").stat().st_mtime_ns
    result = train_value_model(_config(base, copy, epochs=3))
    assert result.resumed_from == copy / "checkpoints" / "epoch-2"
    assert result.epochs_run == 1
    assert [h["epoch"] for h in result.metrics["history"]] == [1, 2, 3]
    # by default the exported epoch is the best on validation (the last may overfit)
    best = max(result.metrics["history"], key=lambda h: (h["val_rank_acc_final"], h["epoch"]))
    assert result.metrics["epoch"] == best["epoch"]
    assert result.metrics["initial_train_mse"] == first.metrics["initial_train_mse"]
    assert (copy / "samples-train.jsonl").stat().st_mtime_ns == before  # samples reused
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["epoch-2", "epoch-3"]
    assert not [p for p in copy.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]


def test_a_finished_run_called_again_keeps_its_export_without_rescoring(
    trained, base, tmp_path, monkeypatch
):
    """A resumed build calls every finished value model again: it returns the metrics it
    wrote, without scoring the samples again (minutes on CPU); a missing export is redone."""
    import training.value as value

    out, first = trained
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    config = replace(_config(base, copy, epochs=2), best_epoch=False)

    def no_scoring(*args, **kwargs):
        raise AssertionError("a finished export was scored again")

    with monkeypatch.context() as patch:
        patch.setattr(value, "evaluate", no_scoring)
        again = train_value_model(config)
    assert again.epochs_run == 0 and again.metrics["epoch"] == 2
    assert again.metrics["validation"] == first.metrics["validation"]
    shutil.rmtree(copy / "adapter")
    redone = train_value_model(config)
    assert (copy / "adapter" / "adapter_model.safetensors").is_file()
    assert redone.metrics["validation"]["rank_acc_final"] == pytest.approx(
        first.metrics["validation"]["rank_acc_final"]
    )


def test_best_validation_epoch_is_exported_and_its_checkpoint_spared():
    from training.value import best_epoch, pruned_epochs

    history = [{"epoch": e, "val_rank_acc_final": a} for e, a in [(1, 0.6), (2, 0.75), (3, 0.7)]]
    assert best_epoch(history) == 2
    assert best_epoch([*history, {"epoch": 4, "val_rank_acc_final": 0.75}]) == 4  # tie: later
    assert best_epoch([{"epoch": 1, "train_loss": 1.0}]) is None  # no validation split
    assert pruned_epochs([1, 2, 3, 4, 5], keep=2, spare=2) == [1, 3]
    assert pruned_epochs([1, 2, 3], keep=2, spare=3) == [1]
    assert pruned_epochs([1, 2, 3], keep=0, spare=None) == []


def test_a_finished_run_exports_its_best_validation_epoch(trained, base, tmp_path):
    """Epoch 1 made the best on validation: a re-run exports epoch 1's adapter and head, not
    the last epoch's; with best_epoch off it exports the last."""
    from safetensors.torch import load_file

    out, _ = trained
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    state_path = copy / "checkpoints" / "epoch-2" / "state.json"
    state = json.loads(state_path.read_text())
    state["history"][0]["val_rank_acc_final"] = 1.0
    state_path.write_text(json.dumps(state))
    adapter_of = {
        e: load_file(copy / "checkpoints" / f"epoch-{e}" / "adapter/adapter_model.safetensors")
        for e in (1, 2)
    }
    for best, exported in ((True, 1), (False, 2)):
        result = train_value_model(replace(_config(base, copy, epochs=2), best_epoch=best))
        assert result.epochs_run == 0 and result.metrics["epoch"] == exported
        got = load_file(result.adapter_dir / "adapter_model.safetensors")
        for name, tensor in adapter_of[exported].items():
            torch.testing.assert_close(got[name], tensor)
        head = load_file(result.head_path)
        saved = load_file(copy / "checkpoints" / f"epoch-{exported}" / "head.safetensors")
        torch.testing.assert_close(head["proj"], saved["proj"])


def test_optimizer_checkpoint_is_safetensors_and_resumes_exactly(tmp_path):
    """An optimizer saved mid-run and loaded into a fresh one takes the same next step as
    the uninterrupted run (Adam's moments and step count survive), with no pickle written."""
    from training.optimizer_state import load_optimizer, save_optimizer

    def run(param, optim, steps):
        for _ in range(steps):
            optim.zero_grad()
            (param**2).sum().backward()
            optim.step()

    torch.manual_seed(0)
    start = torch.randn(5)
    straight = torch.nn.Parameter(start.clone())
    optim = torch.optim.AdamW([straight], lr=0.1)
    run(straight, optim, 3)
    save_optimizer(optim, tmp_path, {"epoch": 3})
    snapshot = straight.detach().clone()
    run(straight, optim, 2)

    resumed = torch.nn.Parameter(snapshot)
    fresh = torch.optim.AdamW([resumed], lr=0.1)
    assert load_optimizer(fresh, tmp_path) == {"epoch": 3}
    run(resumed, fresh, 2)
    torch.testing.assert_close(resumed.detach(), straight.detach(), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.safetensors", "state.json"]


def test_resume_refuses_other_settings(trained, base, tmp_path):
    from training.common import TrainingError

    out, _ = trained
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    config = _config(base, copy, epochs=3)
    config.seed = 7
    with pytest.raises(TrainingError, match="seed"):
        train_value_model(config)


def _cli(argv: list[str]) -> int:
    from training.cli import add_train_commands

    parser = argparse.ArgumentParser(prog="mage")
    add_train_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_value_errors_name_the_problem(tmp_path, base, capsys):
    missing = tmp_path / "nope"
    assert (
        _cli(
            [
                "train",
                "value",
                "--base",
                str(missing),
                "--objective",
                "brevity",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
    assert (
        _cli(
            [
                "train",
                "value",
                "--base",
                str(base),
                "--objective",
                "no-such-reward",
                "--out",
                str(tmp_path / "o2"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no-such-reward" in err and "Traceback" not in err


def test_cli_value_trains(tmp_path, base, capsys):
    out = tmp_path / "cli"
    rc = _cli(
        [
            "train",
            "value",
            "--base",
            str(base),
            "--objective",
            REWARD,
            "--out",
            str(out),
            "--epochs",
            "1",
            "--max-prompts",
            "2",
            "--max-val-prompts",
            "2",
            "--samples-per-prompt",
            "2",
            "--max-new-tokens",
            "4",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "train MSE" in capsys.readouterr().out
    assert load_value_head(out / "head.safetensors").kind == "tied"


def test_learning_curve_reuses_the_samples_on_fewer_prompts(trained, base, tmp_path, capsys):
    """`mage train value-curve`: the same responses, first N training prompts per point."""
    from cli.main import main as mage

    out, _ = trained
    args = ["train", "value-curve", "--base", str(base), "--objective", REWARD]
    args += ["--samples", str(out), "--out", str(tmp_path / "curve")]
    args += ["--epochs", "1", "--rank", "2", "--lora-alpha", "4", "--no-progress"]
    assert mage([*args, "--sizes", "2,6"]) == 0
    rows = json.loads((tmp_path / "curve/curve.json").read_text())
    assert [r["prompts"] for r in rows] == [2, 6] and [r["responses"] for r in rows] == [8, 24]
    assert all(0.0 <= r["rank_acc_final"] <= 1.0 and r["pairs"] > 0 for r in rows)
    small = [json.loads(x) for x in (tmp_path / "curve/prompts-2/samples-train.jsonl").open()]
    full = [json.loads(x) for x in (out / "samples-train.jsonl").open()]
    assert small == full[:8]  # not sampled again
    assert mage([*args, "--sizes", "99"]) == 2
    assert "sizes must be in [1, 6]" in capsys.readouterr().err
