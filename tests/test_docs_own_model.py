"""docs/serve-your-own-model.md, run as written: every `mage` command on the page, in order,
on a tiny random Gemma 2 base (sliding + full layers, soft-capped logits), PEFT adapters, a
tiny `hf-classifier:` reward model and a user's prompt files. Only sizes are shrunk, by
flags appended after the page's own (argparse keeps the last)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2ForSequenceClassification

from cli.main import main as mage
from model_store.architectures import ARCHITECTURES
from model_store.validate import check_store
from tests.common import tiny_tokenizer
from tests.http_server import free_port
from tests.tiny_architectures import write_tiny_base

PAGE = Path(__file__).resolve().parents[1] / "docs" / "serve-your-own-model.md"

SMALL = {
    "train backbones": "--steps 1 --max-prompts 4 --num-generations 2 --max-completion-length 4"
    " --rank 2 --scale-samples 2 --no-progress",
    "train value": "--epochs 1 --samples-per-prompt 2 --max-new-tokens 4 --max-prompts 4"
    " --max-val-prompts 2 --rank 2 --no-progress",
    "tune alpha": "--grid 0,0.5 --limit 2 --max-new-tokens 4 --preferences 1,0;0,1",
    "tune gamma": "--grid 0.5,2 --limit 2 --max-new-tokens 4 --preferences 1,0;0,1"
    " --methods mage-e,mage-i-m",
}
"""Appended to the page's commands: the page's sizes are for real models."""
PROMPTS = ["Tell me about bread.", "How do trains work?", "Name a colour.", "Say hello."]
VAL_PROMPTS = ["What is rain?", "Count to three."]


def page_commands() -> list[list[str]]:
    """Every `mage ...` command in the page's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("mage "):
                commands.append(shlex.split(line)[1:])
    return commands


def _subcommand(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] in ("train", "tune", "store") else argv[0]


def _peft_adapter(base: Path, out: Path, seed: int) -> None:
    """A LoRA folder as PEFT writes it, with trainer leftovers beside it."""
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base)), LoraConfig(r=2, lora_alpha=4)
    )
    with torch.no_grad():  # PEFT starts B at zero: give the adapter an effect
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(str(out))
    (out / "training_args.bin").write_bytes(b"\x80\x04not loaded")
    (out / "checkpoint-1").mkdir()


def _reward_model(out: Path) -> None:
    tokenizer = tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, num_labels=1)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(3)
    GPT2ForSequenceClassification(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _write_prompts(path: Path, prompts: list[str]) -> None:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own-model")
    write_tiny_base(root / "my-base", "gemma2")
    (root / "runs").mkdir()
    _peft_adapter(root / "my-base", root / "runs" / "helpful", seed=1)
    _peft_adapter(root / "my-base", root / "runs" / "harmless", seed=2)
    _reward_model(root / "my-rm")
    _write_prompts(root / "my-prompts.jsonl", PROMPTS)
    _write_prompts(root / "my-val-prompts.jsonl", VAL_PROMPTS)
    return root


def _strict_json_lines(text: str) -> list[object]:
    """Parse every JSON line printed; a bare NaN or Infinity fails."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-strict JSON constant {constant} printed")

    return [
        json.loads(line, parse_constant=refuse)
        for line in text.splitlines()
        if line.startswith(("{", "["))
    ]


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _serve(argv: list[str], cwd: Path) -> dict:
    """`mage serve ...` as the console command, until it answers one guided request."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "mage"), *argv, "--port", str(port)]
    process = subprocess.Popen(command, cwd=cwd, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # loading is slow on 2 shared cores
        while not _ready(url):
            assert process.poll() is None, f"mage serve exited {process.returncode}"
            assert time.monotonic() < deadline, "mage serve never became ready"
            time.sleep(0.1)
        info = httpx.get(f"{url}/info").json()
        answer = httpx.post(
            f"{url}/generate",
            json={
                "inputs": "Tell me about bread.",
                "parameters": {"max_new_tokens": 4, "preference": [0.3, 0.7]},
            },
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        return info
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_page_lists_exactly_the_served_architectures():
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \| (.+?) \|$", PAGE.read_text(), re.M)  # header first
    assert rows[1:] == [(k, a.name, a.example) for k, a in ARCHITECTURES.items()]


def test_every_command_on_the_page_runs(workdir, monkeypatch, capsys):
    commands = page_commands()
    kinds = [_subcommand(argv) for argv in commands]
    assert set(kinds) >= {"store assemble", "store validate", "serve", "train backbones"}
    assert {"train value", "tune alpha", "tune gamma"} <= set(kinds)
    monkeypatch.chdir(workdir)
    served = []
    for argv, kind in zip(commands, kinds, strict=True):
        if kind == "serve":
            served.append(_serve(argv, workdir))
            continue
        small = shlex.split(SMALL.get(kind, ""), posix=True)
        rc = mage([*argv, *small])
        out, err = capsys.readouterr()
        assert rc == 0, f"{shlex.join(argv)} exited {rc}: {err}"
        _strict_json_lines(out)
    assert len(served) == 2

    assembled = check_store(workdir / "my-store")
    assert assembled.architecture.model_type == "gemma2"
    copied = {p.name for p in (workdir / "my-store").rglob("*") if p.is_file()}
    assert "training_args.bin" not in copied
    assert not list((workdir / "my-store").rglob("checkpoint-*"))

    guided = check_store(workdir / "guided-store").manifest
    assert guided.objectives == ["hf-classifier:my-rm", "relevance"]
    assert {v.objective for v in guided.guidance.explicit} == set(guided.objectives)
    assert guided.alpha in (0.0, 0.5)  # chosen from the tuning grid and written
    assert set(guided.defaults.gamma_by_mode) == {"explicit-ensemble", "implicit"}
    assert guided.reward_scale is not None
