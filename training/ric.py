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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from objectives.ric import ric_prompt
from training.baselines import record_baseline, store_task
from training.common import (
    TrainingError,
    encode_prompt,
    guard_run_settings,
    load_base,
    pick_device,
    prompt_texts,
    seed_everything,
)
from training.runs import LoraSettings, copy_adapter, lora_config, train_to_adapter, trainer_args
from training.sampling import Sample, SamplingSettings, generate_samples
from training.scored import load_scored, save_scored, score_all, scored_samples


@dataclass(frozen=True)
class RicConfig:
    """One RiC run into a store."""

    store: Path
    """Store whose base, objectives and reward scale define the task; the adapter goes to
    ``store/baselines/ric`` and its reward range into the manifest."""
    work: Path | None = None
    """Samples, checkpoints and logs (default ``<store>-work/ric``), outside the store."""
    rewards: tuple[str, ...] | None = None
    """Reward spec per objective; None: the store's objective names."""
    steps: int = 100
    """SFT optimizer steps per round (offline round, then each online round)."""
    online_rounds: int = 1
    """Online rounds of generation and multi-objective rejection sampling (RiC: >= 1)."""
    quantile: float = 0.7
    """Rejection threshold: keep a response whose r~ reaches this quantile in some objective."""
    batch_size: int = 4
    """Responses per optimizer step."""
    lr: float = 1e-4
    """Learning rate (constant)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The adapter's LoRA (the backbones' rank and targets)."""
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    """How responses are drawn, offline and online (per prompt: 1 greedy + the rest
    sampled; online, every prompt carries one goal)."""
    split: str = "train"
    """Prompt split (or JSONL file)."""
    max_prompts: int | None = None
    """First N prompts only."""
    save_steps: int = 25
    """Checkpoint every N steps (a re-run resumes)."""
    seed: int = 0
    """Seed of sampling, goals and training."""
    device: str = "auto"
    """auto (CUDA if present), cpu or cuda."""
    progress: bool = True
    """Progress bars."""


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

    device = pick_device(config.device)
    seed_everything(config.seed)
    model, tokenizer = load_base(base)
    peft_config = lora_config(config.lora.rank, config.lora.lora_alpha, config.lora.targets)
    if previous is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(previous), is_trainable=True)
        peft_config = None
    args = trainer_args(
        out / "checkpoints", config.steps, config.lr, config.seed, device.type == "cpu",
        config.progress, config.save_steps,
    )  # fmt: skip
    args.update(
        per_device_train_batch_size=config.batch_size, completion_only_loss=True, max_length=None
    )
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


def _online_samples(config, task, adapter: Path, prompts, low, high, cache: Path, seed: int):
    """The current policy's answers to goal-tagged prompts, scored with the plain prompts (the
    rewards never see the tags); cached in `cache`."""
    if cache.is_file():
        return load_scored(cache)
    from peft import PeftModel

    model, tokenizer = load_base(task.base, pick_device(config.device))
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    goals = sample_goals(len(prompts), low, high, random.Random(seed))
    tagged = [ric_prompt(p, g) for p, g in zip(prompts, goals, strict=True)]
    samples = generate_samples(model, tokenizer, tagged, config.sampling, seed, config.progress)
    plain = [dataclasses.replace(s, prompt=prompts[s.prompt_index]) for s in samples]
    scores = score_all(plain, list(task.rewards), task.scale)
    save_scored(cache, plain, scores)
    return plain, scores


def train(config: RicConfig) -> Path:
    """Offline SFT, then `online_rounds` rounds of generation, rejection sampling and SFT;
    the final adapter into the store with RiC's reward range. Resumes where it stopped."""
    if config.steps < 1 or config.batch_size < 1 or config.online_rounds < 1:
        raise TrainingError("--steps, --batch-size and --online-rounds must be >= 1")
    if not 0.0 <= config.quantile < 1.0:
        raise TrainingError(f"--quantile must be in [0, 1), got {config.quantile}")
    task = store_task(config.store, list(config.rewards) if config.rewards else None)
    work = Path(config.work) if config.work else task.store.with_name(task.store.name + "-work")
    work = work / "ric"
    guard_run_settings(work, _run_settings(config, task))
    prompts = prompt_texts(config.split, config.max_prompts)
    if not prompts:
        raise TrainingError(f"prompt split {config.split!r} is empty")
    model, tokenizer = load_base(task.base, pick_device(config.device))
    samples, scores = scored_samples(
        model, tokenizer, prompts, list(task.rewards), task.scale, config.sampling,
        config.seed, work / "samples-offline.jsonl", config.progress,
    )  # fmt: skip
    del model
    rows = sft_rows(tokenizer, samples, scores)
    adapter = _round(config, task, None, rows, work / "round-0")
    for r in range(1, config.online_rounds + 1):
        low, high = reward_range(scores)
        cache = work / f"round-{r}" / "samples.jsonl"
        online, online_scores = _online_samples(
            config, task, adapter, prompts, low, high, cache, config.seed + r
        )
        samples, scores = samples + online, np.concatenate([scores, online_scores])
        kept = rejection_sample(scores, config.quantile)
        chosen = [samples[i] for i in kept]
        rows = sft_rows(tokenizer, chosen, scores[kept])
        adapter = _round(config, task, adapter, rows, work / f"round-{r}")
    low, high = reward_range(scores)
    final = copy_adapter(adapter, task.store / "baselines" / "ric")
    entry = {"path": "baselines/ric", "reward_low": low, "reward_high": high}
    record_baseline(task.store, "ric", entry)
    return final


def _round(config: RicConfig, task, previous: Path | None, rows: list[dict], out: Path) -> Path:
    """One SFT round to ``out/adapter`` (resumable)."""
    adapter = out / "adapter"
    train_to_adapter(
        lambda log: _sft_trainer(config, task.base, previous, rows, out, log),
        out,
        config.steps,
        adapter,
        config.progress,
    )
    return adapter


def _run_settings(config: RicConfig, task) -> dict:
    lora = config.lora
    return {
        "base": str(task.base),
        "rewards": list(task.rewards),
        "lora": [lora.rank, lora.lora_alpha, list(lora.targets)],
        "rounds": [config.steps, config.online_rounds, config.quantile],
        "seed": config.seed,
    }
