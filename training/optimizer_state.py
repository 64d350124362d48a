"""An optimizer's state saved without pickle: its tensors as safetensors, the rest as JSON
(torch.save would unpickle on load, which the project never does, even for its own
checkpoints). Used by the value models' epoch checkpoints (training/value.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_optimizer(optim: torch.optim.Optimizer, folder: Path, extra: dict) -> None:
    """The optimizer's tensors as safetensors, the rest as JSON (no pickle, even for our own
    checkpoints); state.json is written last and marks the checkpoint complete."""
    saved = optim.state_dict()
    tensors = {
        f"{index}/{name}": value.contiguous()
        for index, slots in saved["state"].items()
        for name, value in slots.items()
        if torch.is_tensor(value)
    }
    plain = {
        str(index): {k: v for k, v in slots.items() if not torch.is_tensor(v)}
        for index, slots in saved["state"].items()
    }
    save_file(tensors, str(folder / "optimizer.safetensors"))
    state = {**extra, "param_groups": saved["param_groups"], "plain_state": plain}
    (folder / "state.json").write_text(json.dumps(state))


def load_optimizer(optim: torch.optim.Optimizer, folder: Path) -> dict:
    """Inverse of `save_optimizer`; returns the extra fields (epoch, history)."""
    state = json.loads((folder / "state.json").read_text())
    slots: dict[int, dict] = {int(i): dict(v) for i, v in state.pop("plain_state").items()}
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        index, name = key.split("/", 1)
        slots.setdefault(int(index), {})[name] = value
    optim.load_state_dict({"state": slots, "param_groups": state.pop("param_groups")})
    return state
