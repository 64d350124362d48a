"""Autoregressive reward models as explicit value models (GenARM: Xu et al., ICLR 2025;
PARM: Lin et al., ICML 2025): `mage train value --kind arm`.

The value model is the base with a LoRA adapter read as a language model pi_r whose token
log-probabilities sum to the reward,

    r(x, y) = beta sum_t log pi_r(y_t | x, y<t),

so that at every step its next-token log-distribution scores every candidate token at once:
V(x, y<t)[y] = beta log pi_r(y | x, y<t), served as the `arm` value kind (guided score
log pi + gamma sum_i mu_i beta_i log pi_r,i, Eq. 24-25; guidance/plan.py `arm_values`). It is
trained with the pairwise Bradley-Terry loss on same-prompt response pairs ranked by one
objective's reward (the higher wins):

    L = -log sigmoid(r(x, y_w) - r(x, y_l))
      = -log sigmoid(beta [log pi_r(y_w | x) - log pi_r(y_l | x)]).

This is DPO's sigmoid loss with the reference log-probabilities set to zero (GenARM trains it
with a reference-free DPOTrainer), so it is built on TRL's DPOTrainer without touching its loss:
`ReferenceFreeDPOTrainer` takes the pairs already tokenised (the base's own sampled tokens) and
"precomputes" reference log-probabilities of 0 instead of running the base. TRL's RewardTrainer
does not fit: it scores a sequence with a scalar head on its last token, not by a sum of token
log-probabilities. Only the order of the rewards matters, so the store's reward scale does not.

Data: the samples of the explicit value model (training/value.py `prepare_samples`: 1 greedy +
the rest sampled per prompt, scored once and cached as ``samples-train/val.jsonl``, so an ARM
run in a value run's folder reuses them). Outputs under ``out``: ``adapter/`` (PEFT, safetensors),
``metrics.json`` (beta, the pairwise loss before and after, validation ranking accuracy), TRL
checkpoints under ``checkpoints/`` (a run started again on the same ``out`` resumes).
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional

from objectives.rewards import RewardError, get_reward
from training.common import (
    TrainingError,
    guard_run_settings,
    load_base,
    pick_device,
    seed_everything,
    strict_json,
    write_whole,
)
from training.runs import lora_config, train_to_adapter, trainer_args
from training.sampling import Sample
from training.value import ValueTrainConfig, _pairwise_accuracy, prepare_samples


@dataclass(frozen=True)
class ArmTrainConfig:
    """Settings of one autoregressive reward model run."""

    run: ValueTrainConfig
    """The run settings shared with the explicit value model (`mage train value` options):
    base, objective (whose reward order ranks the pairs), out, prompts, sampling, epochs,
    batch size (pairs per optimizer step), learning rate, LoRA, seed, device. Its head,
    reward-scale and checkpoint-pruning fields do not apply: pairs depend only on the order
    of the rewards, and TRL keeps the checkpoints."""
    beta: float = 0.1
    """beta of r = beta sum_t log pi_r: the Bradley-Terry loss's scale, recorded in the
    store so that V is in the units the loss trained."""
    pairs_per_prompt: int | None = None
    """Training pairs kept per prompt, those of the widest reward gap; None: every ranked pair
    (C(8, 2) = 28 a prompt with 8 samples). GenARM and PARM train on one human-labelled pair a
    prompt; a few clear pairs cost a fraction of all 28 on a CPU. Validation uses every pair."""


@dataclass(frozen=True)
class ArmTrainResult:
    adapter_dir: Path
    """The trained pi_r adapter (PEFT folder)."""
    metrics: dict
    """beta, pairs, the pairwise loss before and after training, validation accuracy."""
    steps_run: int
    """Optimizer steps run by this call (0 when the run had already finished)."""
    resumed_from: Path | None
    """The checkpoint this call resumed from."""


def ranked_pairs(samples: list[Sample], per_prompt: int | None = None) -> list[tuple[int, int]]:
    """(winner, loser) indices: every two responses to one prompt whose rewards differ; with
    `per_prompt`, only that many per prompt, those of the widest reward gap (the clearest
    preferences; ties in the gap keep their order)."""
    by_prompt: dict[int, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        by_prompt[sample.prompt_index].append(index)
    pairs = []
    for members in by_prompt.values():
        ranked = []
        for a, b in itertools.combinations(members, 2):
            gap = samples[a].reward - samples[b].reward
            if abs(gap) > 1e-9:
                ranked.append((a, b) if gap > 0 else (b, a))
        if per_prompt is not None:
            ranked.sort(key=lambda pair: samples[pair[1]].reward - samples[pair[0]].reward)
            ranked = ranked[:per_prompt]
        pairs.extend(ranked)
    return pairs


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module, samples: list[Sample], batch_size: int, device: torch.device
) -> list[float]:
    """sum_t log pi(y_t | x, y<t) of each sample's response under `model` (right-padded)."""
    model.eval()
    totals: list[float] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        seqs = [s.prompt_ids + s.response_ids for s in chunk]
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, W, vocab)
        # column c predicts token c + 1: (B, W - 1) log-probabilities of the actual tokens
        token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        for row, sample in enumerate(chunk):
            first = len(sample.prompt_ids) - 1
            totals.append(float(token_logps[row, first : first + len(sample.response_ids)].sum()))
    return totals


def arm_rewards(model, samples: list[Sample], beta: float, batch_size: int, device) -> list[float]:
    """r(x, y) = beta sum_t log pi_r(y_t | x, y<t) of each sample."""
    return [beta * lp for lp in sequence_logprobs(model, samples, batch_size, device)]


def pair_loss(rewards: list[float], pairs: list[tuple[int, int]]) -> float:
    """Mean Bradley-Terry loss -log sigmoid(r_w - r_l) over the pairs (NaN without pairs)."""
    if not pairs:
        return math.nan
    gaps = torch.tensor([rewards[w] - rewards[lost] for w, lost in pairs], dtype=torch.float64)
    return float(-functional.logsigmoid(gaps).mean())


def arm_scores(model, samples: list[Sample], beta: float, batch_size: int, device) -> dict:
    """Pairwise loss and ranking accuracy of the ARM's rewards on `samples`' pairs."""
    rewards = arm_rewards(model, samples, beta, batch_size, device)
    accuracy, pairs = _pairwise_accuracy(samples, rewards)
    return {"pair_loss": pair_loss(rewards, ranked_pairs(samples)), "rank_acc": accuracy,
            "pairs": pairs, "responses": len(samples)}  # fmt: skip


def reference_free_dpo_trainer():
    """TRL's DPOTrainer with reference log-probabilities of 0 (GenARM's ARM loss, see the
    module docstring) on pairs already tokenised."""
    from trl import DPOTrainer

    class ReferenceFreeDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already token ids: the base's own sampled tokens

        def _precompute_ref_logps(self, dataset, name, batch_size):
            zeros = [0.0] * len(dataset)
            return dataset.add_column("ref_chosen_logps", zeros).add_column(
                "ref_rejected_logps", zeros
            )

    return ReferenceFreeDPOTrainer


def _trainer(config: ArmTrainConfig, rows: list[dict], steps: int, save_steps: int, log):
    from datasets import Dataset
    from trl import DPOConfig

    run = config.run
    device = pick_device(run.device)
    seed_everything(run.seed)
    model, tokenizer = load_base(run.base)
    args = trainer_args(
        Path(run.out) / "checkpoints",
        steps,
        run.lr,
        run.seed,
        device.type == "cpu",
        run.progress,
        save_steps,
    )
    args.update(
        per_device_train_batch_size=run.batch_size,
        beta=config.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,  # answered by zeros, never by a reference forward
        max_length=None,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            dpo_args = DPOConfig(**args)
        return reference_free_dpo_trainer()(
            model=model,
            args=dpo_args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora_config(run.rank, run.lora_alpha, run.targets),
            callbacks=[log.callback()],
        )
    except (ValueError, TypeError) as exc:
        raise TrainingError(f"cannot set up ARM training: {exc}") from None


def _check(config: ArmTrainConfig) -> None:
    run = config.run
    try:
        get_reward(run.objective)  # fail fast on a bad spec (the model loads on first use)
    except RewardError as exc:
        raise TrainingError(f"--objective: {exc}") from None
    if not (math.isfinite(config.beta) and config.beta > 0):
        raise TrainingError(f"--beta must be a finite number > 0, got {config.beta}")
    if run.epochs < 1 or run.batch_size < 1:
        raise TrainingError("--epochs and --batch-size must be >= 1")
    keys = ("objective", "seed", "rank", "lora_alpha", "targets", "train_split", "sampling")
    wanted = {k: str(v) for k, v in asdict(run).items() if k in keys}
    wanted.update(base=str(Path(run.base).resolve()), kind="arm", beta=str(config.beta))
    if config.pairs_per_prompt is not None:  # absent when unset, so older folders still resume
        wanted["pairs_per_prompt"] = str(config.pairs_per_prompt)
    guard_run_settings(Path(run.out), wanted)


def _initial_scores(config: ArmTrainConfig, train: list, cache: Path, device) -> dict:
    """The base's pair loss and ranking accuracy on the training pairs, kept in `cache`: a
    full pass over the samples (minutes on a CPU) that a resumed run need not repeat."""
    if cache.is_file():
        return json.loads(cache.read_text())
    base, _ = load_base(config.run.base, device)
    before = arm_scores(base, train, config.beta, config.run.batch_size, device)
    write_whole(cache, strict_json(before) + "\n")
    return before


def train_arm_value(config: ArmTrainConfig) -> ArmTrainResult:
    """Sample and score (shared caches), train pi_r on the ranked pairs, save; resumable."""
    run = config.run
    out = Path(run.out)
    _check(config)
    train, val = prepare_samples(run)
    pairs = ranked_pairs(train, config.pairs_per_prompt)
    if not pairs:
        raise TrainingError("no training pairs: every prompt's responses have equal rewards")
    rows = [
        {
            "prompt_ids": train[w].prompt_ids,
            "chosen_ids": train[w].response_ids,
            "rejected_ids": train[lost].response_ids,
        }
        for w, lost in pairs
    ]
    per_epoch = math.ceil(len(rows) / run.batch_size)
    steps = run.epochs * per_epoch
    metrics_path, adapter_dir = out / "metrics.json", out / "adapter"
    if metrics_path.is_file() and adapter_dir.is_dir():  # a finished run called again
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("steps") == steps:
            return ArmTrainResult(adapter_dir, metrics, 0, None)
    device = pick_device(run.device)
    before = _initial_scores(config, train, out / "initial_scores.json", device)
    _, steps_run, resumed, log = train_to_adapter(
        lambda log: _trainer(config, rows, steps, per_epoch, log),
        out,
        steps,
        adapter_dir,
        run.progress,
    )
    from peft import PeftModel

    model, _ = load_base(run.base, device)
    trained = PeftModel.from_pretrained(model, str(adapter_dir)).to(device)
    after = arm_scores(trained, train, config.beta, run.batch_size, device)
    metrics = {
        "objective": run.objective,
        "kind": "arm",
        "beta": config.beta,
        "steps": steps,
        "train_pairs": len(pairs),
        "pairs_per_prompt": config.pairs_per_prompt,
        "initial_train_pair_loss": before["pair_loss"],
        "final_train_pair_loss": after["pair_loss"],
        "initial_train_rank_acc": before["rank_acc"],
        "final_train_rank_acc": after["rank_acc"],
        "validation": arm_scores(trained, val, config.beta, run.batch_size, device)
        if val
        else None,
        "history": log.history,
    }
    write_whole(metrics_path, strict_json(metrics, indent=2) + "\n")
    return ArmTrainResult(adapter_dir, metrics, steps_run, resumed)
