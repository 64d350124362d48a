"""Ranking accuracy of trained value models of either kind on the same held-out pairs
(`mage train value-compare`).

A pair is two responses to one prompt whose rewards differ; a value model ranks it right when
it scores the better response higher (ties count one half). The kinds score a whole response
differently, each by what guidance reads of it:
- `tied` (training/value.py, Eq. 16): V(x, y<T)[y_T], the value of the last token, which
  regresses the final reward (the score its best epoch is chosen by);
- `arm` (training/value_arm.py): r(x, y) = beta sum_t log pi_r(y_t | x, y<t).
Both are read from the run folders `mage train value` writes, and scored on one sample file
(e.g. a run's ``samples-val.jsonl``), so every kind is judged on the very same pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training.common import TrainingError, load_base, pick_device
from training.sampling import Sample, load_samples


def run_kind(run: Path) -> str:
    """'tied' for a folder with ``head.safetensors``, 'arm' for one whose metrics say so."""
    if (run / "head.safetensors").is_file():
        return "tied"
    metrics = run / "metrics.json"
    if metrics.is_file() and json.loads(metrics.read_text()).get("kind") == "arm":
        return "arm"
    raise TrainingError(f"{run}: not a finished `mage train value` run (no head, no ARM metrics)")


def _tied_accuracy(model, run: Path, samples: list[Sample], batch_size: int, device) -> dict:
    from model_store.value_head import load_value_head
    from training.value import TiedHeadModule, evaluate

    saved = load_value_head(run / "head.safetensors")
    hidden, vocab = saved.hidden_size, saved.vocab_size
    head = TiedHeadModule(hidden, vocab, 0.0, 0).to(device)
    with torch.no_grad():
        for name, param in head.named_parameters():
            param.copy_(saved.tensors[name])
    scores = evaluate(model, head, samples, batch_size, device)
    return {"rank_acc": scores["rank_acc_final"], "pairs": scores["pairs"]}


def _arm_accuracy(model, run: Path, samples: list[Sample], batch_size: int, device) -> dict:
    from training.value_arm import arm_scores

    beta = float(json.loads((run / "metrics.json").read_text())["beta"])
    scores = arm_scores(model, samples, beta, batch_size, device)
    return {"rank_acc": scores["rank_acc"], "pairs": scores["pairs"]}


def compare_ranking(
    base: Path, samples_path: Path, runs: list[Path], batch_size: int = 4, device: str = "auto"
) -> list[dict]:
    """One row per run: its kind, ranking accuracy and the number of pairs, on `samples_path`."""
    from peft import PeftModel

    samples = load_samples(Path(samples_path))
    torch_device = pick_device(device)
    rows = []
    for run in map(Path, runs):
        kind = run_kind(run)
        model, _ = load_base(base, torch_device)
        model = PeftModel.from_pretrained(model, str(run / "adapter")).to(torch_device).eval()
        accuracy = (_tied_accuracy if kind == "tied" else _arm_accuracy)(
            model, run, samples, batch_size, torch_device
        )
        rows.append({"run": str(run), "kind": kind, **accuracy})
    return rows
