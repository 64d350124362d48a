"""`mage store assemble` and `mage store rehash`: a store from adapters trained elsewhere
(a real TRL output folder, a plain PEFT folder, a `mage train value` layout), holding only
what serving reads, checked before it is put in place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from cli.main import main as mage
from guidance.engine import Engine
from guidance.requests import TokenEvent
from model_store.builder import random_value_head, write_random_lora, write_value_head
from model_store.loader import load_store
from model_store.manifest import MANIFEST_NAME, StoreManifest
from tests.common import make_request
from tests.tiny_architectures import write_tiny_base


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """A tiny Qwen2 base; a TRL SFT run's output folder (final adapter, two checkpoints,
    training_args.bin and optimizer pickles); a plain PEFT adapter; a value model folder laid
    out as `mage train value --out` writes it, with its leftovers."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    root = tmp_path_factory.mktemp("parts")
    write_tiny_base(root / "base", "qwen2")
    model = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    tokenizer = AutoTokenizer.from_pretrained(str(root / "base"))
    data = Dataset.from_list([{"text": "How do I bake bread? Mix flour, water and salt."}] * 8)
    config = SFTConfig(
        output_dir=str(root / "trl-run"),
        max_steps=2,
        save_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    lora = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.train()
    trainer.save_model()
    base = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    write_random_lora(base, root / "peft-adapter", rank=2, seed=1, std=0.3)
    for objective, seed in (("helpful", 2), ("harmless", 3)):
        out = root / f"value-{objective}"
        write_random_lora(base, out / "adapter", rank=2, seed=seed, std=0.3)
        head = random_value_head(base.config.hidden_size, base.config.vocab_size, seed=seed)
        write_value_head(head, out / "head.safetensors")
        (out / "metrics.json").write_text("{}")
        (out / "checkpoints/epoch-1").mkdir(parents=True)
        save_file({"x": torch.zeros(1)}, str(out / "checkpoints/epoch-1/head.safetensors"))
    return root


def _assemble(parts: Path, out: Path, *extra: str) -> int:
    return mage(
        [
            "store",
            "assemble",
            str(out),
            "--base",
            str(parts / "base"),
            "--objectives",
            "helpful,harmless",
            "--beta",
            "0.7",
            "--backbone",
            str(parts / "trl-run"),
            "--backbone",
            str(parts / "peft-adapter"),
            "--value",
            f"helpful={parts / 'value-helpful'}",
            "--value",
            f"harmless={parts / 'value-harmless'}",
            "--alpha",
            "0.2",
            *extra,
        ]
    )


def test_assembles_a_servable_store_from_trl_and_peft_folders(parts, tmp_path, capsys):
    out = tmp_path / "store"
    assert _assemble(parts, out, "--defaults", '{"guidance_mode": "explicit", "gamma": 0.5}') == 0
    assert "it validates" in capsys.readouterr().out
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "backbones/harmless/adapter_config.json",
        "backbones/harmless/adapter_model.safetensors",
        "backbones/helpful/adapter_config.json",
        "backbones/helpful/adapter_model.safetensors",
        MANIFEST_NAME,
        "values/harmless-head.safetensors",
        "values/harmless/adapter_config.json",
        "values/harmless/adapter_model.safetensors",
        "values/helpful-head.safetensors",
        "values/helpful/adapter_config.json",
        "values/helpful/adapter_model.safetensors",
    ]  # no checkpoint-*, training_args.bin, optimizer or RNG pickles, READMEs, metrics
    trained = load_file(str(parts / "trl-run/adapter_model.safetensors"))
    assert load_file(str(out / "backbones/helpful/adapter_model.safetensors")).keys() == (
        trained.keys()
    )
    manifest = StoreManifest.model_validate_json((out / MANIFEST_NAME).read_text())
    assert [b.weights for b in manifest.backbones] == [[0.7, 0.3], [0.3, 0.7]]
    assert manifest.alpha == 0.2 and manifest.defaults.gamma == 0.5
    assert set(manifest.checksums) == {f for f in files if f.endswith(".safetensors")}
    assert mage(["store", "validate", str(out)]) == 0
    engine = Engine(load_store(out, "cpu", "float32"))
    [events] = engine.run_all([make_request(engine.store, "How do I bake", (0.2, 0.8), "explicit")])
    assert isinstance(events[-1], TokenEvent)


def test_a_folder_of_trainer_checkpoints_only_names_them(parts, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(parts / "trl-run", run)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / name).unlink()
    args = ["store", "assemble", str(tmp_path / "s"), "--base", str(parts / "base")]
    assert mage([*args, "--objectives", "a", "--backbone", str(run)]) == 2
    err = capsys.readouterr().err
    assert "only trainer checkpoints (checkpoint-1, checkpoint-2)" in err
    assert f"e.g. {run / 'checkpoint-2'}" in err
    assert not (tmp_path / "s").exists()


def test_a_store_that_fails_its_check_is_never_put_in_place(parts, tmp_path, capsys):
    # An adapter trained on GPT-2 targets c_attn, which the Qwen2 base does not have.
    other = tmp_path / "other-base"
    write_tiny_base(other, "gpt2")
    foreign = tmp_path / "foreign"
    write_random_lora(AutoModelForCausalLM.from_pretrained(str(other)), foreign, rank=2)
    out = tmp_path / "store"
    args = ["store", "assemble", str(out), "--base", str(parts / "base"), "--objectives", "a"]
    assert mage([*args, "--backbone", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "c_attn" in err and "adapter_model.safetensors" in err
    assert not out.exists() and not list(tmp_path.glob(".store*"))


def test_refuses_a_non_empty_folder_without_force(parts, tmp_path, capsys):
    out = tmp_path / "store"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _assemble(parts, out) == 2
    assert "exists and is not empty (pass --force" in capsys.readouterr().err
    assert _assemble(parts, out, "--force") == 0
    assert not (out / "notes.txt").exists()


def test_from_keeps_a_store_and_changes_what_the_flags_say(parts, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert _assemble(parts, first) == 0
    assert mage(["store", "assemble", str(second), "--from", str(first), "--alpha", "0.5"]) == 0
    old = json.loads((first / MANIFEST_NAME).read_text())
    new = json.loads((second / MANIFEST_NAME).read_text())
    assert new["alpha"] == 0.5 and old["alpha"] == 0.2
    assert {k: v for k, v in new.items() if k not in ("alpha", "name")} == {
        k: v for k, v in old.items() if k not in ("alpha", "name")
    }


def test_rehash_refreshes_checksums_after_an_edit(parts, tmp_path, capsys):
    out = tmp_path / "store"
    assert _assemble(parts, out) == 0
    head = out / "values/helpful-head.safetensors"
    tensors = load_file(str(head))
    tensors["out_bias"] = tensors["out_bias"] + 1.0
    save_file(tensors, str(head), metadata={"kind": "tied"})
    capsys.readouterr()
    assert mage(["store", "validate", str(out)]) == 1
    assert "helpful-head.safetensors: checksum mismatch" in capsys.readouterr().err
    assert mage(["store", "rehash", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "changed  values/helpful-head.safetensors" in printed
    assert "1 checksums changed" in printed
    assert mage(["store", "validate", str(out)]) == 0


def test_training_costs_come_along_from_the_ledger_and_from_a_store(parts, tmp_path):
    """A value model's `mage train` folder has a cost ledger: the assembled store records its
    sum; a store assembled `--from` that one keeps it; a part with no ledger stays unrecorded
    (unknown, not zero)."""
    import shutil

    from model_store.costs import read_store_costs

    copy = tmp_path / "parts"
    shutil.copytree(parts, copy, ignore=shutil.ignore_patterns("trl-run"))
    (copy / "trl-run").symlink_to(parts / "trl-run")
    ledger = '{"steps": 3, "wall_s": 9.0, "cpu_s": 8.0, "threads": 1}\n'
    (copy / "value-helpful" / "cost.jsonl").write_text(ledger * 2)
    assert _assemble(copy, tmp_path / "a") == 0
    expected = {"values": {"helpful": {"steps": 6, "wall_s": 18.0, "cpu_s": 16.0}}}
    assert read_store_costs(tmp_path / "a") == expected
    assert mage(["store", "assemble", str(tmp_path / "b"), "--from", str(tmp_path / "a")]) == 0
    assert read_store_costs(tmp_path / "b") == expected
