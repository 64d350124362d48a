"""Sample responses from the base policy and score them with a reward (data for Eq. 16).

Each prompt gets one greedy response and ``n - 1`` sampled ones (the paper's decoding settings:
temperature 1.0, top-p 0.9, top-k 50, Sec. 5.2.2), so the value model sees both the policy's
mode and its spread. Scored samples are cached as JSON lines so a resumed run reuses them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from objectives.rewards import get_reward
from objectives.scale import fit_reward_scale
from training.common import (
    TrainingError,
    encode_prompt,
    load_base,
    pick_device,
    prompt_texts,
    write_whole,
)


@dataclass
class Sample:
    """One (prompt, response) pair of the base policy with its final reward r(x, y)."""

    prompt_index: int
    """Index of the prompt in the prompt list (pairs for ranking share it)."""
    prompt: str
    """Prompt text as given to the reward."""
    prompt_ids: list[int]
    """Prompt token ids (chat template applied when the tokenizer has one)."""
    response_ids: list[int]
    """Generated token ids, up to and including the first EOS (the terminal action)."""
    response: str
    """Decoded response text (special tokens skipped), as scored by the reward."""
    greedy: bool
    """Whether this response was decoded greedily."""
    reward: float = 0.0
    """r(x, y): the reward of the whole response (Eq. 14)."""


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are drawn from the base policy."""

    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50
    batch_size: int = 16


def _cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[: i + 1]
    return ids


@torch.no_grad()
def generate_samples(
    model: PreTrainedModel,
    tokenizer: object,
    prompts: Sequence[str],
    settings: SamplingSettings,
    seed: int,
    progress: bool = True,
) -> list[Sample]:
    """Greedy + temperature-sampled responses of `model` for every prompt (left-padded batches)."""
    if settings.samples_per_prompt < 1:
        raise TrainingError("samples_per_prompt must be >= 1")
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else -1])
    eos_ids.add(tokenizer.eos_token_id)  # type: ignore[attr-defined]
    pad_id = tokenizer.pad_token_id  # type: ignore[attr-defined]
    jobs = [
        (index, k == 0) for index in range(len(prompts)) for k in range(settings.samples_per_prompt)
    ]
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    samples: list[Sample] = []
    bar = tqdm(total=len(jobs), desc="sampling", disable=not progress, unit="resp")
    for greedy in (True, False):  # one generate() call per decoding mode and batch
        chosen = [index for index, is_greedy in jobs if is_greedy == greedy]
        for start in range(0, len(chosen), settings.batch_size):
            indices = chosen[start : start + settings.batch_size]
            width = max(len(encoded[i]) for i in indices)
            input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, i in enumerate(indices):
                input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            kwargs = (
                {"do_sample": False}
                if greedy
                else {
                    "do_sample": True,
                    "temperature": settings.temperature,
                    "top_p": settings.top_p,
                    "top_k": settings.top_k,
                }
            )
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad_id,
                **kwargs,
            )
            for row, i in enumerate(indices):
                ids = _cut_at_eos(out[row, width:].tolist(), eos_ids)
                text = tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
                samples.append(Sample(i, prompts[i], encoded[i], ids, text, greedy))
            bar.update(len(indices))
    bar.close()
    torch.random.set_rng_state(generator_state)
    samples.sort(key=lambda s: (s.prompt_index, not s.greedy))
    return samples


def score_samples(samples: list[Sample], reward: Callable[..., list[float]]) -> None:
    """Fill in `reward` of every sample (one batched reward call)."""
    scores = reward([s.prompt for s in samples], [s.response for s in samples])
    for sample, score in zip(samples, scores, strict=True):
        sample.reward = float(score)


def save_samples(samples: list[Sample], path: Path) -> None:
    write_whole(path, "".join(json.dumps(asdict(s), ensure_ascii=False) + "\n" for s in samples))


def load_samples(path: Path) -> list[Sample]:
    """Read a sample cache written by `save_samples`; TrainingError names a bad line."""
    samples = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            try:
                samples.append(Sample(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as exc:
                raise TrainingError(f"{path}:{lineno}: bad sample record ({exc})") from None
    return samples


def fit_scale_on_base(
    base: Path,
    rewards: Sequence[str],
    samples_per_prompt: int = 4,
    max_prompts: int | None = None,
    max_new_tokens: int = 32,
    seed: int = 0,
    split: str = "train",
) -> dict:
    """Sample the base on the training prompts `split` (a split name or a JSONL file; 1
    greedy + the rest at temperature 1, top-p 0.9, top-k 50) and fit `reward_scale` on those
    responses (objectives/scale.py: the fixed r~ that training and evaluation share)."""
    model, tokenizer = load_base(base, pick_device())
    prompts = prompt_texts(split, max_prompts)
    settings = SamplingSettings(samples_per_prompt, max_new_tokens)
    samples = generate_samples(model, tokenizer, prompts, settings, seed, progress=False)
    texts, responses = [s.prompt for s in samples], [s.response for s in samples]
    scores = {spec: get_reward(spec)(texts, responses) for spec in rewards}
    source = (
        f"{base.name}: {len(prompts)} {Path(split).name} prompts x {samples_per_prompt} responses "
        f"(1 greedy, rest sampled), {max_new_tokens} new tokens, seed {seed}"
    )
    return fit_reward_scale(scores, source)
