"""Rewards-in-Context (Yang et al. 2024): one adapter, conditioned on the rewards it should reach.

1. Offline: base samples on the training prompts (training/sampling.py), each scored by every
   objective on the store's fixed scale r~ (RiC z-normalises each reward over its data; r~ is
   that normalisation, fitted on base samples), and fine-tuned on with the prompt carrying the
   response's own scores in RiC's format, `<prompt> <rm1_score> 0.3 <rm2_score> -1.2`
   (objectives/ric.py), the loss on the response tokens only (TRL's SFTTrainer on a
   pre-tokenised prompt-completion set, `completion_only_loss`).
2. Online (`online_rounds`, at least one as RiC does): for every training prompt RiC's goal
   sampler asks for the highest score in all objectives but one, drawn uniformly in
   [low, high] (`sample_goals`: near the Pareto front); the current policy answers, every
   answer is scored and relabelled with the rewards it *obtained*; multi-objective rejection
   sampling keeps the answers (and offline samples) that reach the `quantile` (RiC: 0.7) of at
   least one objective, and fine-tuning continues on them.
3. Inference: mu maps to desired rewards by RiC's map (objectives.ric.desired_rewards) with
   low/high the extreme normalised rewards of the training data, written into the manifest
   (`baselines.ric`), so evaluation and the server (`merge_method: "ric"`) prompt alike.

Changed from RiC: a LoRA adapter over the base (RiC fine-tunes LoRA too), base samples instead
of a human-written dataset (the task has none), a fixed number of optimizer steps per round.
Outputs: ``store/baselines/ric``; per round ``work/round-<r>`` with samples and checkpoints (a
re-run resumes the round it stopped in).
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from objectives.ric import ric_prompt
from training.baselines import FineTuneRun, record_baseline
from training.common import (
    TrainingError,
    encode_prompt,
    guard_run_settings,
    load_base,
    pick_device,
)
from training.costs import record_store_cost, run_cost, timed
from training.runs import copy_adapter, train_to_adapter
from training.sampling import Sample, generate_samples
from training.scored import load_scored, save_scored, score_all


@dataclass(frozen=True)
class RicConfig:
    """One RiC run into a store (the adapter goes to ``store/baselines/ric``)."""

    run: FineTuneRun
    """Store, steps per round, responses per step (`batch_size`), LoRA, sampling, seed."""
    online_rounds: int = 1
    """Online rounds of generation and multi-objective rejection sampling (RiC: >= 1)."""
    quantile: float = 0.7
    """Rejection threshold: keep a response whose r~ reaches this quantile in some objective."""


def sft_rows(tokenizer, samples: list[Sample], scores: np.ndarray) -> list[dict]:
    """Pre-tokenised SFT rows: the prompt with the response's own r~ in RiC's tags (rounded to
    one decimal), then the response; the loss falls on the response only."""
    rows = []
    for sample, row in zip(samples, scores.tolist(), strict=True):
        prompt_ids = encode_prompt(tokenizer, ric_prompt(sample.prompt, row))
        rows.append(
            {
                "input_ids": prompt_ids + list(sample.response_ids),
                "completion_mask": [0] * len(prompt_ids) + [1] * len(sample.response_ids),
            }
        )
    return rows


def rejection_sample(scores: np.ndarray, quantile: float) -> np.ndarray:
    """RiC's multi-objective rejection sampling: indices of the rows whose score reaches the
    `quantile` of its column in at least one objective."""
    thresholds = np.quantile(scores, quantile, axis=0)
    return np.flatnonzero((scores >= thresholds).any(axis=1))


def sample_goals(count: int, low, high, rng: random.Random) -> list[list[float]]:
    """RiC's online goals: uniform in [low, high] per objective, then every objective but the
    lowest drawn set to its high end (goals near the Pareto front), one decimal."""
    goals = []
    for _ in range(count):
        goal = [rng.uniform(lo, hi) for lo, hi in zip(low, high, strict=True)]
        spans = [max(hi - lo, 1e-9) for lo, hi in zip(low, high, strict=True)]
        lowest = min(range(len(goal)), key=lambda j: (goal[j] - low[j]) / spans[j])
        goals.append([round(g if j == lowest else high[j], 1) for j, g in enumerate(goal)])
    return goals


def reward_range(scores: np.ndarray) -> tuple[list[float], list[float]]:
    """Per objective the smallest and largest r~ (one decimal): RiC's low and high."""
    rounded = np.round(scores, 1)
    return rounded.min(axis=0).tolist(), rounded.max(axis=0).tolist()


def _sft_trainer(config: RicConfig, base: Path, previous: Path | None, rows, out: Path, log):
    """SFTTrainer on `rows`: a fresh LoRA (offline round) or the previous round's, trainable."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = config.run.trainer_args(out) | {"completion_only_loss": True}
    model, tokenizer = load_base(base)
    peft_config = config.run.peft_config()
    if previous is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(previous), is_trainable=True)
        peft_config = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            sft_args = SFTConfig(**args)
        return SFTTrainer(
            model=model,
            args=sft_args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[log.callback()],
        )
    except (ValueError, TypeError) as exc:
        raise TrainingError(f"cannot set up RiC fine-tuning: {exc}") from None


def _online_samples(run: FineTuneRun, task, adapter: Path, prompts, low, high, cache, seed: int):
    """The current policy's answers to goal-tagged prompts, scored with the plain prompts (the
    rewards never see the tags); cached in `cache`."""
    if cache.is_file():
        return load_scored(cache)
    from peft import PeftModel

    model, tokenizer = load_base(task.base, pick_device(run.device))
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    goals = sample_goals(len(prompts), low, high, random.Random(seed))
    tagged = [ric_prompt(p, g) for p, g in zip(prompts, goals, strict=True)]
    with timed(cache.parent, "sampling"):  # RiC's online stage is part of its training
        samples = generate_samples(model, tokenizer, tagged, run.sampling, seed, run.progress)
        plain = [dataclasses.replace(s, prompt=prompts[s.prompt_index]) for s in samples]
        scores = score_all(plain, list(task.rewards), task.scale)
    save_scored(cache, plain, scores)
    return plain, scores


def train(config: RicConfig) -> Path:
    """Offline SFT, then `online_rounds` rounds of generation, rejection sampling and SFT;
    the final adapter into the store with RiC's reward range. Resumes where it stopped."""
    if config.online_rounds < 1:
        raise TrainingError("--online-rounds must be >= 1 (RiC's online stage)")
    if not 0.0 <= config.quantile < 1.0:
        raise TrainingError(f"--quantile must be in [0, 1), got {config.quantile}")
    run = config.run
    task = run.task()
    work = run.work_dir(task, "ric")
    rounds = [run.steps, config.online_rounds, config.quantile]
    guard_run_settings(work, run.settings(task) | {"rounds": rounds})
    tokenizer, samples, scores = run.base_samples(task, work / "samples-offline.jsonl")
    adapter = _round(config, task, None, sft_rows(tokenizer, samples, scores), work / "round-0")
    for r in range(1, config.online_rounds + 1):
        low, high = reward_range(scores)
        cache = work / f"round-{r}" / "samples.jsonl"
        online, online_scores = _online_samples(
            run, task, adapter, run.prompts(), low, high, cache, run.seed + r
        )
        samples, scores = samples + online, np.concatenate([scores, online_scores])
        kept = rejection_sample(scores, config.quantile)
        rows = sft_rows(tokenizer, [samples[i] for i in kept], scores[kept])
        adapter = _round(config, task, adapter, rows, work / f"round-{r}")
    low, high = reward_range(scores)
    final = copy_adapter(adapter, task.store / "baselines" / "ric")
    entry = {"path": "baselines/ric", "reward_low": low, "reward_high": high}
    folders = [work, *(work / f"round-{r}" for r in range(config.online_rounds + 1))]
    record_store_cost(task.store, "ric", "ric", run_cost(*folders))  # sampling + SFT rounds
    record_baseline(task.store, "ric", entry)
    return final


def _round(config: RicConfig, task, previous: Path | None, rows: list[dict], out: Path) -> Path:
    """One SFT round to ``out/adapter`` (resumable)."""
    adapter = out / "adapter"
    train_to_adapter(
        lambda log: _sft_trainer(config, task.base, previous, rows, out, log),
        out,
        config.run.steps,
        adapter,
        config.run.progress,
    )
    return adapter
