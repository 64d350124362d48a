"""Policy samples scored by every objective on the store's fixed scale r~: the data MODPO ranks
into preference pairs and RiC fine-tunes on. Sampling and scoring are training/sampling.py's;
this adds the n rewards per response and a cache, so a resumed run (or the next preference of
a grid) reuses them."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from objectives.rewards import get_reward
from objectives.scale import RewardScale
from training.common import TrainingError, write_whole
from training.costs import timed
from training.sampling import Sample, SamplingSettings, generate_samples


def score_all(samples: list[Sample], rewards: list[str], scale: RewardScale | None) -> np.ndarray:
    """(samples, objectives) rewards of every sample, rescaled to r~ when `scale` is given."""
    prompts, responses = [s.prompt for s in samples], [s.response for s in samples]
    columns = []
    for j, spec in enumerate(rewards):
        raw = get_reward(spec)(prompts, responses)
        columns.append(raw if scale is None else scale.apply(j, raw))
    return np.array(columns, dtype=np.float64).T.reshape(len(samples), len(rewards))


def save_scored(path: Path, samples: list[Sample], scores: np.ndarray) -> None:
    """One JSON line per sample with its `scores` (r~ per objective)."""
    rows = zip(samples, scores.tolist(), strict=True)
    write_whole(
        path,
        "".join(json.dumps({**asdict(s), "scores": r}, ensure_ascii=False) + "\n" for s, r in rows),
    )


def load_scored(path: Path) -> tuple[list[Sample], np.ndarray]:
    """Read a cache written by save_scored; TrainingError names a bad line."""
    samples, rows = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            rows.append([float(v) for v in record.pop("scores")])
            samples.append(Sample(**record))
        except (ValueError, TypeError, KeyError) as exc:
            raise TrainingError(f"{path}:{lineno}: bad scored sample ({exc})") from None
    return samples, np.array(rows, dtype=np.float64)


def scored_samples(
    model,
    tokenizer,
    prompts: list[str],
    rewards: list[str],
    scale: RewardScale | None,
    settings: SamplingSettings,
    seed: int,
    cache: Path,
    progress: bool = False,
) -> tuple[list[Sample], np.ndarray]:
    """Samples of `model` on `prompts` (1 greedy + the rest sampled, training/sampling.py) with
    their r~ per objective, from `cache` when it exists (written otherwise)."""
    if cache.is_file():
        return load_scored(cache)
    with timed(cache.parent, "sampling"):  # the method's data costs too (Sec. 6.1)
        samples = generate_samples(model, tokenizer, prompts, settings, seed, progress)
        scores = score_all(samples, rewards, scale)
    save_scored(cache, samples, scores)
    return samples, scores
