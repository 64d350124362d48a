"""Explicit value model training (Sec. 3.4.1, Eq. 16).

The value model is the base with a LoRA adapter plus a `tied` value head
(model_store/value_head.py): V(x, y<t) = E (P h_t + p) + c, one value per vocabulary token, where
h_t is the final (normed) hidden state at the last position of (x, y<t) and E the base's output
embedding. It regresses the final reward of responses sampled from the base policy:

    L_V(x, y) = 1/2 sum_{t=1}^{|y|} (V(x, y<t)[y_t] - r(x, y))^2          (Eq. 16)

since the reward of every intermediate state is 0 (Eq. 14) and V is the expected return (Eq. 15).
With a `reward_scale` (the store's fixed scale, objectives/scale.py) V regresses
r~ = (r - c) / s, the unit the backbones were trained in, so the merged guidance of Eq. (24)
combines objectives on the scale of mu^T r~; without one, rewards keep their raw scale.
Ranking accuracy is the same on either scale (the map is increasing).
Only the response tokens' entries of V are computed during training (the gathered rows of E),
which is exactly what Eq. (16) needs and much cheaper than all |V| entries.

Outputs under ``out``: ``adapter/`` (PEFT folder, safetensors), ``head.safetensors``
(`save_value_head`), ``metrics.json``, the sample caches, and ``checkpoints/epoch-K/`` after every
epoch; a run started again on the same ``out`` resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm.auto import tqdm

from model_store.value_head import ValueHead, load_value_head, save_value_head
from objectives.rewards import RewardError, get_reward
from objectives.scale import RewardScale
from training.common import (
    TrainingError,
    finite_or_none,
    guard_run_settings,
    load_base,
    pick_device,
    prompt_texts,
    seed_everything,
    strict_json,
    write_whole,
)
from training.costs import CostClock
from training.optimizer_state import load_optimizer, save_optimizer
from training.sampling import (
    Sample,
    SamplingSettings,
    generate_samples,
    load_samples,
    save_samples,
    score_samples,
)

_RUN_KEYS = (  # settings a resumed run must share (the sample caches depend on them)
    "base",
    "objective",
    "seed",
    "rank",
    "lora_alpha",
    "targets",
    "train_split",
    "val_split",
    "max_train_prompts",
    "max_val_prompts",
    "sampling",
)


@dataclass
class ValueTrainConfig:
    """Settings of one explicit value model run (defaults: small, CPU-friendly)."""

    base: Path
    objective: str
    """Reward spec (objectives.rewards.get_reward) whose final reward V regresses."""
    out: Path
    train_split: str = "train"
    val_split: str = "validation"
    max_train_prompts: int | None = None
    max_val_prompts: int | None = None
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    epochs: int = 3  # Sec. 5.2.2
    batch_size: int = 4  # Sec. 5.2.2: effective batch size 4
    lr: float = 1e-4  # LoRA + head; the paper's 1e-6 is for full fine-tuning
    rank: int = 8
    lora_alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    head_init_std: float = 1e-3
    reward_scale: RewardScale | None = None
    """This objective's fixed scale (one center, one scale): V regresses r~; None: raw r."""
    seed: int = 0
    device: str = "auto"
    keep_checkpoints: int = 2
    best_epoch: bool = True
    """Export the epoch with the best validation ranking accuracy (last token) instead of the
    last one: early stopping on held-out pairs (the relevance store's value model fell from 0.751 to
    0.720 between epochs 4 and 5 while its training loss kept falling). That epoch's
    checkpoint is never pruned. Without validation samples: the last epoch."""
    progress: bool = True


@dataclass
class ValueTrainResult:
    adapter_dir: Path
    head_path: Path
    metrics: dict
    """initial/final train MSE, validation MSE and ranking accuracy, per-epoch history."""
    epochs_run: int
    """Epochs trained by this call (less than `epochs` when resuming)."""
    resumed_from: Path | None


class TiedHeadModule(torch.nn.Module):
    """Trainable form of the `tied` head: V = E (P h + p) + c (model_store/value_head.py)."""

    def __init__(self, hidden: int, vocab: int, std: float, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        # P small and random, p = c = 0: V starts near 0 for every token.
        self.proj = torch.nn.Parameter(torch.randn(hidden, hidden, generator=gen) * std)
        self.proj_bias = torch.nn.Parameter(torch.zeros(hidden))
        self.out_bias = torch.nn.Parameter(torch.zeros(vocab))

    def token_values(
        self, hidden: torch.Tensor, embedding: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """V(.)[tokens] for hidden (N, H) and tokens (N,): only the needed rows of E."""
        projected = hidden @ self.proj.T + self.proj_bias
        return (projected * embedding[tokens]).sum(-1) + self.out_bias[tokens]

    def to_value_head(self) -> ValueHead:
        tensors = {k: v.detach().float().cpu().clone() for k, v in self.named_parameters()}
        return ValueHead("tied", tensors)


def _batch_values(
    model: PeftModel, head: TiedHeadModule, samples: list[Sample], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V(x, y<t)[y_t] for every response token of every sample.

    Returns (values (N,), rewards (N,), sample index (N,)) over the N response tokens.
    """
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    rows, positions, tokens, rewards = [], [], [], []
    for b, (sample, seq) in enumerate(zip(samples, seqs, strict=True)):
        input_ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        start = len(sample.prompt_ids)
        for t, token in enumerate(sample.response_ids):
            rows.append(b)
            positions.append(start + t - 1)  # hidden of (x, y<t) predicts y_t
            tokens.append(token)
            rewards.append(sample.reward)
    base = model.get_base_model()
    hidden = base.get_decoder()(
        input_ids=input_ids.to(device), attention_mask=mask.to(device)
    ).last_hidden_state
    row_t = torch.tensor(rows, device=device)
    picked = hidden[row_t, torch.tensor(positions, device=device)]
    embedding = base.get_output_embeddings().weight.detach()
    values = head.token_values(picked, embedding, torch.tensor(tokens, device=device))
    return values, torch.tensor(rewards, device=device), row_t


def value_loss(values: torch.Tensor, rewards: torch.Tensor, n_sequences: int) -> torch.Tensor:
    """Eq. (16) summed over each response's tokens, averaged over the batch's sequences."""
    return 0.5 * ((values - rewards) ** 2).sum() / n_sequences


def _pairwise_accuracy(samples: list[Sample], scores: list[float]) -> tuple[float, int]:
    """Fraction of same-prompt pairs with different rewards that `scores` order correctly
    (score ties count one half); NaN when there is no such pair."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        groups[sample.prompt_index].append(i)
    correct, pairs = 0.0, 0
    for members in groups.values():
        for a_pos, a in enumerate(members):
            for b in members[a_pos + 1 :]:
                diff = samples[a].reward - samples[b].reward
                if abs(diff) < 1e-9:
                    continue
                pairs += 1
                gap = scores[a] - scores[b]
                correct += 0.5 if gap == 0 else float((gap > 0) == (diff > 0))
    return (correct / pairs if pairs else math.nan), pairs


@torch.no_grad()
def evaluate(
    model: PeftModel,
    head: TiedHeadModule,
    samples: list[Sample],
    batch_size: int,
    device: torch.device,
) -> dict:
    """Token-level MSE of V[y_t] against r, and ranking accuracy of the final-token value
    V(x, y<T)[y_T] and of the mean value over the response."""
    model.eval()
    sq_err, n_tokens = 0.0, 0
    final, mean = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        values, rewards, rows = _batch_values(model, head, chunk, device)
        sq_err += float(((values - rewards) ** 2).sum())
        n_tokens += values.numel()
        for b in range(len(chunk)):
            own = values[rows == b]
            final.append(float(own[-1]))
            mean.append(float(own.mean()))
    acc_final, pairs = _pairwise_accuracy(samples, final)
    acc_mean, _ = _pairwise_accuracy(samples, mean)
    return {
        "mse": sq_err / max(n_tokens, 1),
        "rank_acc_final": acc_final,
        "rank_acc_mean": acc_mean,
        "pairs": pairs,
        "responses": len(samples),
    }


def _prepare_samples(
    config: ValueTrainConfig, split: str, limit: int | None, name: str, model, tokenizer, seed: int
) -> list[Sample]:
    path = config.out / f"samples-{name}.jsonl"
    if path.is_file():
        return load_samples(path)
    prompts = prompt_texts(split, limit)
    samples = generate_samples(model, tokenizer, prompts, config.sampling, seed, config.progress)
    try:
        score_samples(samples, get_reward(config.objective))
    except RewardError as exc:
        raise TrainingError(str(exc)) from None
    save_samples(samples, path)
    return samples


def prepare_samples(config: ValueTrainConfig) -> tuple[list[Sample], list[Sample]]:
    """The train and validation samples of a run (sampled and scored on the first call,
    read from the caches after), without training: the demo build fits its reward scale on
    them before any value model trains."""
    config.out = Path(config.out)
    paths = [config.out / f"samples-{name}.jsonl" for name in ("train", "val")]
    if all(p.is_file() for p in paths):
        return load_samples(paths[0]), load_samples(paths[1])
    model, tokenizer = load_base(config.base, pick_device(config.device))
    train = _prepare_samples(
        config, config.train_split, config.max_train_prompts, "train", model, tokenizer, config.seed
    )
    val = _prepare_samples(
        config, config.val_split, config.max_val_prompts, "val", model, tokenizer, config.seed + 1
    )
    return train, val


def _check_run_file(config: ValueTrainConfig) -> None:
    """Refuse to resume an output folder that was started with other settings."""
    wanted = {k: str(v) for k, v in asdict(config).items() if k in _RUN_KEYS}
    wanted["base"] = str(Path(config.base).resolve())
    if config.reward_scale is not None:  # absent when raw, so older folders still resume
        wanted["reward_scale"] = str([config.reward_scale.center, config.reward_scale.scale])
    guard_run_settings(config.out, wanted)


def _latest_checkpoint(out: Path) -> Path | None:
    done = [p for p in (out / "checkpoints").glob("epoch-*") if (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def best_epoch(history: list[dict]) -> int | None:
    """The epoch of the highest validation ranking accuracy (last token); a tie goes to the
    later epoch. None without validation scores."""
    scored = [h for h in history if h.get("val_rank_acc_final") is not None]
    if not scored:
        return None
    return max(scored, key=lambda h: (h["val_rank_acc_final"], h["epoch"]))["epoch"]


def pruned_epochs(saved: list[int], keep: int, spare: int | None) -> list[int]:
    """Checkpoints to delete: all but the `keep` latest, sparing the best epoch's."""
    old = sorted(saved)[:-keep] if keep > 0 else []
    return [e for e in old if e != spare]


def _save_checkpoint(
    out: Path,
    epoch: int,
    model: PeftModel,
    head: TiedHeadModule,
    optim,
    history,
    keep: int,
    spare: int | None,
) -> None:
    """Save `epoch`, then prune all but the `keep` latest checkpoints and `spare`'s."""
    final = out / "checkpoints" / f"epoch-{epoch}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
    save_value_head(head.to_value_head(), tmp / "head.safetensors")
    save_optimizer(optim, tmp, {"epoch": epoch, "history": history})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    names = (p.name.split("-")[1] for p in final.parent.glob("epoch-*"))
    saved = [int(name) for name in names if name.isdigit()]  # not a half-written "3.tmp"
    for old in pruned_epochs(saved, keep, spare):
        shutil.rmtree(final.parent / f"epoch-{old}", ignore_errors=True)


def _load_checkpoint(path: Path, model: PeftModel, head: TiedHeadModule, optim) -> dict:
    try:
        set_peft_model_state_dict(model, load_file(str(path / "adapter/adapter_model.safetensors")))
        saved = load_value_head(path / "head.safetensors")
        with torch.no_grad():
            for name, param in head.named_parameters():
                param.copy_(saved.tensors[name])
        state = load_optimizer(optim, path)
    except Exception as exc:  # any corrupt piece: name the checkpoint
        raise TrainingError(f"{path}: cannot resume from this checkpoint ({exc})") from None
    return state


def _choose_epoch(config: ValueTrainConfig, history, model, head, optim) -> int:
    """Load the best validation epoch's weights when that is not the last one (see
    ValueTrainConfig.best_epoch); returns the epoch exported."""
    last = history[-1]["epoch"] if history else 0
    best = best_epoch(history) if config.best_epoch else None
    folder = config.out / "checkpoints" / f"epoch-{best}"
    if best is None or best == last or not (folder / "state.json").is_file():
        return last  # (a folder pruned before the best epoch was spared keeps the last)
    _load_checkpoint(folder, model, head, optim)  # training is over: optim is not used again
    return best


def _exported_metrics(
    out: Path, adapter_dir: Path, head_path: Path, chosen: int, history: list[dict]
) -> dict | None:
    """The metrics an earlier call wrote beside the adapter and head it exported, when that
    export is of the same epoch of the same history: scoring the train and validation
    samples again would take minutes on CPU and give the same numbers."""
    path = out / "metrics.json"
    if not (path.is_file() and adapter_dir.is_dir() and head_path.is_file()):
        return None
    metrics = json.loads(path.read_text())
    # The file holds null where the history has NaN (strict JSON): compare them so.
    same = metrics.get("epoch") == chosen and metrics.get("history") == finite_or_none(history)
    return metrics if same else None


def _train_epoch(
    config: ValueTrainConfig,
    epoch: int,
    model: PeftModel,
    head: TiedHeadModule,
    optim: torch.optim.Optimizer,
    train: list[Sample],
    device: torch.device,
) -> float:
    """One pass over the samples in a seed-and-epoch-determined order; mean Eq. (16) loss."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed + epoch))
    model.train()
    total, bs = 0.0, config.batch_size
    bar = tqdm(
        range(0, len(train), bs), desc=f"value epoch {epoch + 1}", disable=not config.progress
    )
    for start in bar:
        chunk = [train[int(i)] for i in order[start : start + bs]]
        values, rewards, _ = _batch_values(model, head, chunk, device)
        loss = value_loss(values, rewards, len(chunk))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        total += loss.item() * len(chunk)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / len(train)


def _scored_samples(config: ValueTrainConfig, model, tokenizer) -> tuple[list, list]:
    """Train and validation samples, each with its reward on the store's scale when one is
    given (the caches keep raw rewards; V regresses r~)."""
    train = _prepare_samples(
        config, config.train_split, config.max_train_prompts, "train", model, tokenizer, config.seed
    )
    val = _prepare_samples(
        config, config.val_split, config.max_val_prompts, "val", model, tokenizer, config.seed + 1
    )
    if not train:
        raise TrainingError(f"prompt split {config.train_split!r} gave no training samples")
    if config.reward_scale is not None:
        if len(config.reward_scale.center) != 1:
            raise TrainingError("a value model's reward scale has one center and one scale")
        for sample in (*train, *val):
            sample.reward = config.reward_scale.apply(0, [sample.reward])[0]
    return train, val


def _trainable(config: ValueTrainConfig, model, device):
    """The LoRA over the frozen base, the tied head of Eq. (16), and Adam over both."""
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.targets),
        lora_dropout=0.0,
        bias="none",
    )
    seed_everything(config.seed)
    peft_model = get_peft_model(model, lora)
    hidden, vocab = model.config.hidden_size, model.get_output_embeddings().weight.shape[0]
    head = TiedHeadModule(hidden, vocab, config.head_init_std, config.seed).to(device)
    params = [p for p in peft_model.parameters() if p.requires_grad] + list(head.parameters())
    optim = torch.optim.Adam(params, lr=config.lr)  # Adam, as in Sec. 5.2.2
    return peft_model, head, optim


def _run_epochs(config: ValueTrainConfig, peft_model, head, optim, train, val, device):
    """Train to `config.epochs`, resuming from the latest checkpoint; returns (history, the
    training MSE before any step, the epoch this call started at, the checkpoint resumed)."""
    history: list[dict] = []
    start_epoch, resumed = 0, None
    latest = _latest_checkpoint(config.out)
    if latest is not None:
        state = _load_checkpoint(latest, peft_model, head, optim)
        start_epoch, history, resumed = state["epoch"], state["history"], latest
    bs = config.batch_size
    initial = history[0]["train_mse_before"] if history else None
    if initial is None:
        initial = evaluate(peft_model, head, train, bs, device)["mse"]
    clock = CostClock(config.out, start_epoch)  # steps = epochs here
    for epoch in range(start_epoch, config.epochs):
        loss = _train_epoch(config, epoch, peft_model, head, optim, train, device)
        entry = {"epoch": epoch + 1, "train_loss": loss, "train_mse_before": initial}
        if val:
            scores = evaluate(peft_model, head, val, bs, device)
            entry.update({f"val_{k}": v for k, v in scores.items()})
        history.append(entry)
        spare = best_epoch(history) if config.best_epoch else None  # the one to export
        _save_checkpoint(
            config.out, epoch + 1, peft_model, head, optim, history, config.keep_checkpoints, spare
        )
        clock.record(epoch + 1)
    return history, initial, start_epoch, resumed


def train_value_model(config: ValueTrainConfig) -> ValueTrainResult:
    """Sample, score, train LoRA + tied head by Eq. (16), save; resumes from checkpoints."""
    config.out = Path(config.out)
    try:
        get_reward(config.objective)  # fail fast on a bad spec (the model loads on first use)
    except RewardError as exc:
        raise TrainingError(f"--objective: {exc}") from None
    _check_run_file(config)
    device = pick_device(config.device)
    seed_everything(config.seed)
    model, tokenizer = load_base(config.base, device)
    train, val = _scored_samples(config, model, tokenizer)
    peft_model, head, optim = _trainable(config, model, device)
    history, initial, start_epoch, resumed = _run_epochs(
        config, peft_model, head, optim, train, val, device
    )
    chosen = _choose_epoch(config, history, peft_model, head, optim)
    adapter_dir, head_path = config.out / "adapter", config.out / "head.safetensors"
    finished = None
    if start_epoch == config.epochs:  # nothing trained by this call
        finished = _exported_metrics(config.out, adapter_dir, head_path, chosen, history)
    if finished is not None:  # a finished run called again (a resumed build): its export stands
        return ValueTrainResult(adapter_dir, head_path, finished, 0, resumed)
    bs = config.batch_size
    metrics = {
        "objective": config.objective,
        "epoch": chosen,
        "initial_train_mse": initial,
        "final_train_mse": evaluate(peft_model, head, train, bs, device)["mse"],
        "validation": evaluate(peft_model, head, val, bs, device) if val else None,
        "train_reward_mean": sum(s.reward for s in train) / len(train),
        "history": history,
    }
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=True)
    save_value_head(head.to_value_head(), head_path)
    write_whole(config.out / "metrics.json", strict_json(metrics, indent=2) + "\n")
    epochs_run = max(0, config.epochs - start_epoch)
    return ValueTrainResult(adapter_dir, head_path, metrics, epochs_run, resumed)
