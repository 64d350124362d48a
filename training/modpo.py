"""MODPO (Zhou et al. 2024, "Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct
Preference Optimization"): one adapter per weight w, trained by DPO on the preference pairs of
one objective k with a margin from the others' rewards,

    L(theta) = -E log sigmoid( (1/w_k) [ beta (log pi/pi_ref(y_w) - log pi/pi_ref(y_l))
                                         - w_{-k}^T (r_{-k}(x, y_w) - r_{-k}(x, y_l)) ] ),

with pi_ref = the SFT base (MODPO's `modpo_loss`: `(1/w[0]) * (beta * logratio - margin @
w[1:])`). Built on TRL's DPOTrainer without touching its loss: that loss is
-log sigmoid(beta' [(log pi - log ref')(y_w) - (log pi - log ref')(y_l)]), so with
beta' = beta / w_k and each precomputed reference log-probability shifted by its margin,
log ref'(y) = log pi_ref(y) + w_{-k}^T r_{-k}(x, y) / beta, it is exactly the MODPO loss.
`MarginDPOTrainer` (a small subclass) adds that shift after DPOTrainer precomputes the
reference (`precompute_ref_log_probs`, the base with the adapter disabled) and takes the
pairs already tokenised, so they are the very tokens the base generated. The reference
log-probabilities depend on the pairs only, not on w, so they are computed once per pair set
and kept in the work folder (`ref-logps/`, JSON): the grid's w with the same k share them (on
the demo, 16 minutes of one thread per adapter otherwise).

Data, as the issue asks (MODPO used human preference sets): base samples on the training
prompts (training/sampling.py, 1 greedy + the rest sampled), scored by every objective on the
store's fixed scale r~; for each prompt every pair of its responses whose r~_k differ is a
preference pair (the higher wins), and the other objectives' r~ are the margin rewards (MODPO
trains margin reward models; here the store's rewards are known, so they serve directly).
The objective whose pairs are used is objective 1 (k = 1) as in MODPO; at the end w_1 = 0 its
weight would divide by zero, so there k is the first objective with w_k > 0 (plain DPO on that
objective's pairs when w is one-hot: the margin is then zero).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from objectives.preferences import preference_label
from training.baselines import (
    FineTuneRun,
    check_preferences,
    preference_grid,
    record_baseline,
)
from training.common import TrainingError, guard_run_settings, load_base, write_whole
from training.costs import SAMPLES, record_store_cost, run_cost
from training.runs import train_to_adapter
from training.sampling import Sample


@dataclass(frozen=True)
class ModpoConfig:
    """One MODPO run: an adapter per weight w of a grid, into a store."""

    run: FineTuneRun
    """Store, steps, pairs per step (`batch_size`), LoRA, sampling of the pairs, seed."""
    preferences: tuple[tuple[float, ...], ...] = ()
    """The weights w to train for; empty: `mage eval`'s sweep (both ends included)."""
    beta: float = 0.1
    """MODPO's beta: the KL strength to pi_ref (TRL's DPO beta is beta / w_k)."""


def pair_objective(w: tuple[float, ...]) -> int:
    """k: the objective whose pairs are ranked (MODPO's objective 1, unless w_1 = 0)."""
    return 0 if w[0] > 0 else next(j for j, v in enumerate(w) if v > 0)


def margins(scores: np.ndarray, w: tuple[float, ...], k: int) -> np.ndarray:
    """w_{-k}^T r~_{-k} per sample: the margin reward of each response (Eq. of the module)."""
    weights = np.array(w, dtype=np.float64)
    weights[k] = 0.0
    return scores @ weights


def preference_pairs(samples: list[Sample], scores: np.ndarray, k: int) -> list[tuple[int, int]]:
    """(winner, loser) sample indices: every two responses to one prompt whose r~_k differ."""
    by_prompt: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        by_prompt.setdefault(sample.prompt_index, []).append(index)
    pairs = []
    for members in by_prompt.values():
        for a_pos, a in enumerate(members):
            for b in members[a_pos + 1 :]:
                if scores[a, k] != scores[b, k]:
                    pairs.append((a, b) if scores[a, k] > scores[b, k] else (b, a))
    return pairs


def pair_rows(samples, scores, w: tuple[float, ...]) -> list[dict]:
    """DPOTrainer rows (tokenised) with each response's margin reward."""
    k = pair_objective(w)
    margin = margins(scores, w, k)
    return [
        {
            "prompt_ids": samples[a].prompt_ids,
            "chosen_ids": samples[a].response_ids,
            "rejected_ids": samples[b].response_ids,
            "chosen_margin": float(margin[a]),
            "rejected_margin": float(margin[b]),
        }
        for a, b in preference_pairs(samples, scores, k)
    ]


def modpo_loss(logratio_chosen, logratio_rejected, margin_chosen, margin_rejected, w_k, beta):
    """MODPO's loss per pair, from log pi/pi_ref of each response and its margin reward (the
    formula the TRL route must equal; the tests compare the two)."""
    chosen = (beta * logratio_chosen - margin_chosen) / w_k
    rejected = (beta * logratio_rejected - margin_rejected) / w_k
    return -torch.nn.functional.logsigmoid(chosen - rejected)


def ref_logps_file(folder: Path, base: Path, rows: list[dict]) -> Path:
    """Where the reference log-probabilities of these pairs under this base are kept: named by
    a hash of the base's path and every pair's token ids (the margins do not enter)."""
    tokens = [[r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]] for r in rows]
    digest = hashlib.sha256(json.dumps([str(base), tokens]).encode()).hexdigest()[:16]
    return folder / f"{digest}.json"


def margin_dpo_trainer_class(beta: float, ref_cache: Path | None = None):
    """DPOTrainer whose precomputed reference log-probabilities carry the margins: log ref'(y)
    = log pi_ref(y) + margin(y) / beta, so its sigmoid loss at beta / w_k is MODPO's. With
    `ref_cache` (a file) the unshifted log-probabilities are read from it, or computed once
    and written there."""
    from trl import DPOTrainer

    class MarginDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already token ids: the base's own sampled tokens

        def _reference(self, dataset, name, batch_size):
            kept = json.loads(ref_cache.read_text()) if ref_cache and ref_cache.is_file() else {}
            if len(kept.get("chosen", ())) == len(dataset) == len(kept.get("rejected", ())):
                return dataset.add_column("ref_chosen_logps", kept["chosen"]).add_column(
                    "ref_rejected_logps", kept["rejected"]
                )
            with_ref = super()._precompute_ref_logps(dataset, name, batch_size)
            if ref_cache is not None:
                kept = {"chosen": list(with_ref["ref_chosen_logps"])}
                kept["rejected"] = list(with_ref["ref_rejected_logps"])
                write_whole(ref_cache, json.dumps(kept))  # a stopped run recomputes
            return with_ref

        def _precompute_ref_logps(self, dataset, name, batch_size):
            with_ref = self._reference(dataset, name, batch_size)

            def shift(row):
                return {
                    "ref_chosen_logps": row["ref_chosen_logps"] + row["chosen_margin"] / beta,
                    "ref_rejected_logps": row["ref_rejected_logps"] + row["rejected_margin"] / beta,
                }

            return with_ref.map(shift, desc="MODPO margins")

    return MarginDPOTrainer


def _trainer(
    config: ModpoConfig,
    base: Path,
    rows: list[dict],
    w_k: float,
    out: Path,
    log,
    ref_cache: Path | None = None,
):
    from datasets import Dataset
    from trl import DPOConfig

    args = config.run.trainer_args(out)
    model, tokenizer = load_base(base)
    args.update(beta=config.beta / w_k, loss_type=["sigmoid"], precompute_ref_log_probs=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            dpo_args = DPOConfig(**args)
        return margin_dpo_trainer_class(config.beta, ref_cache)(
            model=model,
            args=dpo_args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=config.run.peft_config(),
            callbacks=[log.callback()],
        )
    except (ValueError, TypeError) as exc:
        raise TrainingError(f"cannot set up MODPO training: {exc}") from None


def train(config: ModpoConfig) -> list[tuple[tuple[float, ...], Path]]:
    """Sample and score once, then train (or resume) one MODPO adapter per w; returns (w,
    adapter folder) per weight, each recorded in the manifest as it finishes."""
    if not (math.isfinite(config.beta) and config.beta > 0):
        raise TrainingError(f"--beta must be > 0, got {config.beta}")
    task = config.run.task()
    n = len(task.rewards)
    grid = check_preferences(config.preferences or preference_grid(n), n)
    work = config.run.work_dir(task, "modpo")
    _, samples, scores = config.run.base_samples(task, work / "samples.jsonl")
    record_store_cost(task.store, "modpo", SAMPLES, run_cost(work))  # the pairs' sampling
    trained, refs = [], work / "ref-logps"
    for w in grid:
        label, k = preference_label(w), pair_objective(w)
        rows = pair_rows(samples, scores, w)
        if not rows:
            raise TrainingError(f"no preference pairs for objective {k + 1}: responses tie")
        out = work / label
        guard_run_settings(
            out, config.run.settings(task) | {"weights": list(w), "beta": config.beta}
        )
        relative = f"baselines/modpo/{label}"
        train_to_adapter(
            lambda log, rows=rows, w_k=w[k], out=out: _trainer(
                config, task.base, rows, w_k, out, log, ref_logps_file(refs, task.base, rows)
            ),
            out,
            config.run.steps,
            task.store / relative,
            config.run.progress,
        )
        record_store_cost(task.store, "modpo", label, run_cost(out))
        record_baseline(task.store, "modpo", {"preference": list(w), "path": relative})
        trained.append((w, task.store / relative))
    return trained
