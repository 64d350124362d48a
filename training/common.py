"""Helpers shared by the training scripts: loading the base, formatting prompts, seeding."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from objectives.prompts import load_prompts


class TrainingError(Exception):
    """A training run cannot start or continue; the message names the file/setting at fault."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(device: str = "auto") -> torch.device:
    """'auto' means CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_base(path: Path) -> Path:
    """The base model folder, after checking it looks like a local HF causal-LM folder."""
    path = Path(path)
    if not path.is_dir():
        raise TrainingError(f"{path}: base model folder does not exist")
    if not (path / "config.json").is_file():
        raise TrainingError(f"{path / 'config.json'}: missing (not a Hugging Face model folder)")
    if not list(path.glob("*.safetensors")):
        raise TrainingError(f"{path}: no *.safetensors weights (pickle weights are never loaded)")
    return path


def load_base(path: Path, device: torch.device | None = None) -> tuple[PreTrainedModel, object]:
    """Load the base (fp32, eval mode, offline) and its tokenizer; pad token defaults to EOS."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = check_base(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, use_safetensors=True, dtype=torch.float32
        )
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{path}: cannot load model/tokenizer ({exc})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def has_chat_template(tokenizer: object) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: object, prompt: str) -> list[int]:
    """Prompt token ids exactly as the server builds them (server/translate.py): the chat
    template with a generation prompt when the tokenizer has one, else the raw text."""
    if has_chat_template(tokenizer):
        ids = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])  # type: ignore[operator]


def prompt_texts(split: str, limit: int | None = None) -> list[str]:
    """The prompt strings of a split of the project's prompt set, optionally the first `limit`."""
    try:
        records = load_prompts(split)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"prompt split {split!r}: {exc}") from None
    texts = [r["prompt"] for r in records]
    return texts[:limit] if limit else texts


def parse_floats(text: str, what: str) -> list[float]:
    """'0.7,0.3' -> [0.7, 0.3]; TrainingError naming `what` when malformed."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TrainingError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def parse_names(text: str) -> list[str]:
    """'relevance, positivity' -> ['relevance', 'positivity']."""
    return [v.strip() for v in text.split(",") if v.strip()]


def guard_run_settings(out: Path, wanted: dict) -> None:
    """Refuse to resume an output folder started with other settings; record them if new."""
    path = out / "run.json"
    if path.is_file():
        found = json.loads(path.read_text())
        changed = [k for k in wanted if found.get(k) != wanted[k]]
        if changed:
            raise TrainingError(
                f"{path}: this output folder was started with other settings "
                f"({', '.join(changed)}); use a new output folder or delete this one"
            )
    else:
        write_whole(path, json.dumps(wanted, indent=2) + "\n")


def write_whole(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all: into a file beside it, then an atomic
    rename. A run killed mid-write leaves the old file (or none) and a stray `.partial`, never
    a torn file that a resumed run fails to parse."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def finite_or_none(value: object) -> object:
    """`value` with every NaN or infinity (at any depth of dicts and lists) replaced by None,
    so it is valid JSON: a validation accuracy with no pairs to rank is unknown, not NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value: object, **options: object) -> str:
    """json.dumps that never writes NaN or Infinity (which JSON does not have): see
    finite_or_none."""
    return json.dumps(finite_or_none(value), allow_nan=False, **options)  # type: ignore[arg-type]
