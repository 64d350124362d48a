"""Learning curve of an explicit value model: validation ranking accuracy against the number of
training samples (`mage train value-curve`).

It reuses the base samples of a finished value-model run (its `samples-*.jsonl`), trains the
same model (Eq. 16) on the responses of the first N training prompts for each N, and reports
the validation metrics of each: does accuracy still rise with data (more samples would help),
or has it flattened (the model or the reward is what limits it)? Each size trains in its own
folder and resumes like any value-model run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from training.common import TrainingError, strict_json, write_whole
from training.sampling import load_samples, save_samples
from training.value import ValueTrainConfig, train_value_model


def learning_curve(config: ValueTrainConfig, samples: Path, sizes: list[int]) -> list[dict]:
    """Train `config` (its `out` a parent folder) on the first N training prompts of the
    samples in `samples` for each N in `sizes`; one row of validation metrics per N."""
    train = load_samples(Path(samples) / "samples-train.jsonl")
    val = load_samples(Path(samples) / "samples-val.jsonl")
    available = len({s.prompt_index for s in train})
    if not sizes or min(sizes) < 1 or max(sizes) > available:
        raise TrainingError(f"sizes must be in [1, {available}] (training prompts), got {sizes}")
    rows = []
    for n in sorted(set(sizes)):
        out = Path(config.out) / f"prompts-{n}"
        out.mkdir(parents=True, exist_ok=True)
        subset = [s for s in train if s.prompt_index < n]
        if not (out / "samples-val.jsonl").is_file():  # the same responses, fewer prompts
            save_samples(subset, out / "samples-train.jsonl")
            save_samples(val, out / "samples-val.jsonl")  # last: its presence means both
        run = dataclasses.replace(config, out=out, max_train_prompts=n)
        metrics = train_value_model(run).metrics
        validation = metrics["validation"] or {}
        rows.append(
            {
                "prompts": n,
                "responses": len(subset),
                **{k: validation.get(k) for k in ("rank_acc_final", "rank_acc_mean", "mse")},
                "pairs": validation.get("pairs"),
            }
        )
        write_whole(Path(config.out) / "curve.json", strict_json(rows, indent=2) + "\n")
    return rows
