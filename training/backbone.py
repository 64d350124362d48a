"""Backbone training for Stage 1 (Sec. 3.3.3-3.3.4): RL on the backbone reward of Eq. (11),

    theta_i = argmax E_{s~D, a~pi}[ w_i^T r(s, a) - eta log pi(a|s) / pi_sft(a|s) ],

with h_i = sum_j w_ij r_j the backbone reward and w_i the i-th column of the circulant B of
Eq. (12). It uses TRL's GRPOTrainer (the paper used PPO; GRPO needs no critic, which keeps CPU
runs cheap) with a LoRA `peft_config`: one reward function per objective, each on the
store's fixed scale r~_j = (r_j - c_j) / s_j (objectives/scale.py), `reward_weights = w_i` with
`multi_objective_aggregation="sum_then_normalize"`, so the scalar reward is exactly
h_i = w_i^T r~ (Eq. 11), and `beta = eta > 0`, the KL penalty to the base (TRL disables the
adapter to get pi_sft, so no second model is loaded). GRPO's advantage is h_i minus its group
mean, divided by the batch's standard deviation (`scale_rewards="batch"`: one positive factor
per step, so no group is re-weighted against another). TRL adds the KL as a per-token k3
estimate in the loss rather than in the reward; its expectation is the same KL.

Outputs: the final adapter (PEFT folder, safetensors) at ``adapter_dir`` (default
``out/adapter``), TRL checkpoints under ``out/checkpoints`` every ``save_steps`` steps (a new
call on the same ``out`` resumes from the latest), and ``out/log.jsonl`` with the per-step logs
(``rewards/<objective>/mean`` for every objective, ``reward`` = mean h_i, ``kl``).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from objectives.rewards import RewardError, get_reward
from objectives.scale import RewardScale
from training.common import (
    TrainingError,
    check_base,
    guard_run_settings,
    has_chat_template,
    load_base,
    pick_device,
    prompt_texts,
    seed_everything,
    write_whole,
)
from training.costs import record_store_cost, run_cost
from training.runs import RunLog, lora_config, train_to_adapter, trainer_args


@dataclass
class BackboneTrainConfig:
    """Settings of one backbone run (defaults: small and CPU-friendly)."""

    base: Path
    rewards: list[str]
    """Reward specs r_1..r_n (objectives.rewards.get_reward), in objective order."""
    weights: list[float]
    """w_i: combination weights of the rewards (Eq. 11), on the simplex."""
    out: Path
    adapter_dir: Path | None = None
    """Where the final adapter goes; default ``out/adapter``."""
    steps: int = 100
    kl: float = 0.05
    """eta of Eq. (11): TRL's `beta`."""
    lr: float = 1e-4
    rank: int = 8
    lora_alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    prompts_per_step: int = 2
    num_generations: int = 4
    """Completions per prompt (GRPO's group size)."""
    max_completion_length: int = 32
    temperature: float = 1.0
    reward_scale: RewardScale | None = None
    """Fixed scale of each reward (objectives/scale.py, the manifest's `reward_scale`), so
    that w_ij weighs objectives, not their units (VADER spans [-1, 1], MiniLM cosines a
    narrow band). None trains on the raw rewards."""
    aggregation: str = "sum_then_normalize"
    """How the n rewards form h_i (TRL's `multi_objective_aggregation`). The default forms
    h_i = w_i^T r~ first (Eq. 11 exactly); `normalize_then_sum` (the former default)
    standardises each reward within its GRPO group first, so h_i depends on the group."""
    advantage_scale: str = "batch"
    """TRL's `scale_rewards`: divide GRPO's advantages by the batch's std (`batch`), each
    group's (`group`, which re-weights groups against each other) or nothing (`none`)."""
    split: str = "train"
    max_prompts: int | None = None
    save_steps: int = 25
    save_total_limit: int = 2
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    extra_args: dict = field(default_factory=dict)
    """Any further GRPOConfig fields (advanced; overrides the above)."""


@dataclass
class BackboneTrainResult:
    adapter_dir: Path
    global_step: int
    """Optimizer steps done in total (including those before a resume)."""
    steps_run: int
    """Optimizer steps done by this call."""
    resumed_from: Path | None
    reward_means: dict[str, float]
    """Mean of each objective's reward over the steps this call ran."""
    log: list[dict]
    """TRL's per-step logs of this call."""


class ObjectiveReward:
    """A GRPO reward function for one objective: TRL calls it with the prompts and completions
    (chat-message lists or strings); it hands our reward plain texts. Its `__name__` is the
    objective name, which TRL uses in the ``rewards/<name>/mean`` logs."""

    def __init__(self, spec: str, scale: RewardScale | None = None) -> None:
        self.spec = spec
        self.__name__ = spec
        self.reward = get_reward(spec)
        self.scale = scale
        """This objective's own RewardScale (one center, one scale), or None: raw."""

    @staticmethod
    def _text(item: object) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, list) and item and isinstance(item[-1], dict):
            content = item[-1].get("content", "")
            return content if isinstance(content, str) else str(content)
        return str(item)

    def __call__(self, prompts: Sequence, completions: Sequence, **_: object) -> list[float]:
        raw = self.reward([self._text(p) for p in prompts], [self._text(c) for c in completions])
        return raw if self.scale is None else self.scale.apply(0, raw)


def check_weights(rewards: list[str], weights: list[float]) -> None:
    """w_i must have one entry per reward and lie on the simplex (Eq. 11)."""
    if not rewards:
        raise TrainingError("--rewards: give at least one reward")
    if len(set(rewards)) != len(rewards):
        raise TrainingError(f"--rewards: names repeat: {rewards}")
    if len(weights) != len(rewards):
        raise TrainingError(
            f"--weights: {len(weights)} weights for {len(rewards)} rewards {rewards}"
        )
    if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise TrainingError(f"--weights {weights}: must be >= 0 and sum to 1 (the simplex)")


def _check_run_file(config: BackboneTrainConfig, out: Path) -> None:
    """Refuse to resume an output folder started on another base, rewards, weights or LoRA."""
    wanted = {
        "base": str(Path(config.base).resolve()),
        "rewards": list(config.rewards),
        "weights": [float(w) for w in config.weights],
        "lora": [config.rank, config.lora_alpha, list(config.targets)],
    }
    # Recorded only when they differ from what older folders used, so those still resume.
    if config.reward_scale is not None:
        wanted["reward_scale"] = [list(config.reward_scale.center), list(config.reward_scale.scale)]
    if config.aggregation != "normalize_then_sum":
        wanted["aggregation"] = [config.aggregation, config.advantage_scale]
    if config.seed != 0:  # another seed never resumes a folder of seed 0
        wanted["seed"] = config.seed
    guard_run_settings(out, wanted)


def _dataset(tokenizer: object, prompts: list[str]):
    from datasets import Dataset

    if has_chat_template(tokenizer):  # TRL renders it with add_generation_prompt, as the server
        rows = [{"prompt": [{"role": "user", "content": p}]} for p in prompts]
    else:
        rows = [{"prompt": p} for p in prompts]
    return Dataset.from_list(rows)


def _adapter_dir(config: BackboneTrainConfig) -> Path:
    """Where the final adapter goes: ``adapter_dir``, default ``out/adapter``."""
    return Path(config.adapter_dir) if config.adapter_dir else Path(config.out) / "adapter"


def check_backbone_config(config: BackboneTrainConfig) -> None:
    """Refuse bad settings before anything loads: the weights (simplex), steps, KL, base."""
    check_weights(config.rewards, config.weights)
    if config.steps < 1:
        raise TrainingError("--steps must be >= 1")
    if config.kl <= 0:
        raise TrainingError("--kl must be > 0 (Eq. 11 keeps the backbone near the base)")
    check_base(config.base)
    scale = config.reward_scale
    if scale is not None and len(scale.center) != len(config.rewards):
        raise TrainingError(
            f"reward scale has {len(scale.center)} objectives, --rewards {len(config.rewards)}"
        )


def reward_functions(config: BackboneTrainConfig) -> list[ObjectiveReward]:
    """One GRPO reward function per objective, each on its own fixed scale r~_j."""
    scale = config.reward_scale
    try:
        return [
            ObjectiveReward(spec, None if scale is None else scale.one(j))
            for j, spec in enumerate(config.rewards)
        ]
    except RewardError as exc:
        raise TrainingError(f"--rewards: {exc}") from None


def grpo_args(config: BackboneTrainConfig, ckpt_dir: Path, cpu: bool) -> dict:
    """GRPOConfig fields: h_i = w_i^T r~ (`reward_weights`, `sum_then_normalize`), beta = eta."""
    args = trainer_args(
        ckpt_dir, config.steps, config.lr, config.seed, cpu, config.progress, config.save_steps
    )
    args.update(
        per_device_train_batch_size=config.prompts_per_step * config.num_generations,
        gradient_accumulation_steps=1,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        beta=config.kl,
        reward_weights=list(config.weights),
        multi_objective_aggregation=config.aggregation,
        scale_rewards=config.advantage_scale,
        save_total_limit=config.save_total_limit,
        log_completions=False,
    )
    args.update(config.extra_args)
    return args


def _grpo_trainer(config: BackboneTrainConfig, ckpt_dir: Path, log: RunLog):
    """TRL's GRPOTrainer over a fresh LoRA on the base, on the training prompts."""
    try:
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as exc:
        hint = "pip install 'trl>=1.16,<2'"
        raise TrainingError(f"backbone training needs TRL: {hint} ({exc})") from None

    reward_funcs = reward_functions(config)
    device = pick_device(config.device)
    seed_everything(config.seed)
    model, tokenizer = load_base(config.base)
    prompts = prompt_texts(config.split, config.max_prompts)
    if not prompts:
        raise TrainingError(f"prompt split {config.split!r} is empty")
    try:
        with warnings.catch_warnings():  # TRL still sets the deprecated gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            args = GRPOConfig(**grpo_args(config, ckpt_dir, device.type == "cpu"))
        return GRPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=_dataset(tokenizer, prompts),
            processing_class=tokenizer,
            peft_config=lora_config(config.rank, config.lora_alpha, config.targets),
            callbacks=[log.callback()],
        )
    except (ValueError, TypeError) as exc:
        raise TrainingError(f"cannot set up GRPO training: {exc}") from None


def train_backbone(config: BackboneTrainConfig) -> BackboneTrainResult:
    """Train one backbone with GRPO on h_i (Eq. 11); resumes from ``out/checkpoints``."""
    check_backbone_config(config)
    out = Path(config.out)
    _check_run_file(config, out)
    step, steps_run, resume, log = train_to_adapter(
        lambda log: _grpo_trainer(config, out / "checkpoints", log),
        out,
        config.steps,
        _adapter_dir(config),
        config.progress,
        log_key="reward",
    )
    history = log.history
    means = {
        spec: sum(entry[f"rewards/{spec}/mean"] for entry in history) / len(history)
        for spec in config.rewards
        if history and all(f"rewards/{spec}/mean" in entry for entry in history)
    }
    return BackboneTrainResult(_adapter_dir(config), step, steps_run, resume, means, history)


def train_backbone_store(
    base: Path,
    rewards: list[str],
    beta: float,
    store: Path,
    work: Path | None = None,
    copy_base: bool = False,
    scale_samples: int = 4,
    **settings: object,
) -> Path:
    """Train all n backbones of the circulant B (Eq. 12) and write them as a store.

    Backbone i is trained on h_i with w_i = column i of B and saved to
    ``store/backbones/<objective_i>``; the manifest (write_manifest: checksums filled) lists
    the objectives, the base (absolute path, or ``base`` when ``copy_base``) and each backbone
    with its weights. Training state lives in ``work`` (default ``<store>-work``), outside
    the store, so a re-run resumes every backbone. An existing manifest with the same
    objectives keeps its name, alpha, guidance, defaults and reward scale.

    The rewards are trained on the store's fixed `reward_scale`: an existing one is kept;
    otherwise it is fitted on `scale_samples` base responses per training prompt (1 greedy,
    the rest sampled) and written first, so a resumed run uses the same scale.
    `scale_samples=0` trains on raw rewards.
    """
    from merging.coefficients import circulant_matrix
    from model_store.builder import circulant_backbone_weights, write_manifest

    base = check_base(Path(base)).resolve()
    store = Path(store)
    try:
        circulant_matrix(beta, len(rewards))
    except ValueError as exc:
        raise TrainingError(f"--beta: {exc}") from None
    weights = circulant_backbone_weights(rewards, beta)
    work = Path(work) if work else store.with_name(store.name + "-work")
    store.mkdir(parents=True, exist_ok=True)
    manifest = _kept_manifest(store, rewards)
    if manifest.get("reward_scale") is None and scale_samples > 0:
        manifest["reward_scale"] = _fitted_scale(base, rewards, work, scale_samples, settings)
    spec = manifest.get("reward_scale")
    scale = None if spec is None else RewardScale(tuple(spec["center"]), tuple(spec["scale"]))
    base_entry = str(base)
    if copy_base:
        shutil.copytree(base, store / "base", dirs_exist_ok=True)
        base_entry = "base"
    backbones = []
    for i, (objective, w_i) in enumerate(zip(rewards, weights, strict=True)):
        config = BackboneTrainConfig(
            base=base,
            rewards=list(rewards),
            weights=w_i,
            out=work / f"backbone-{i}-{_slug(objective)}",
            adapter_dir=store / "backbones" / _slug(objective),
            reward_scale=scale,
            **settings,  # type: ignore[arg-type]
        )
        train_backbone(config)
        record_store_cost(store, "backbones", _slug(objective), run_cost(config.out))
        backbones.append(
            {"name": f"bb-{objective}", "path": f"backbones/{_slug(objective)}", "weights": w_i}
        )
    manifest.update(
        {"objectives": list(rewards), "base": {"path": base_entry}, "backbones": backbones}
    )
    manifest["beta"] = beta
    write_manifest(store, manifest)
    return store


def _kept_manifest(store: Path, rewards: list[str]) -> dict:
    """The start of the store's manifest: what an existing one with the same objectives set
    (name, alpha, guidance, defaults, reward scale) is kept."""
    from model_store.manifest import MANIFEST_NAME, StoreManifest

    manifest: dict = {"name": store.name, "guidance": {"explicit": [], "implicit": True}}
    existing = store / MANIFEST_NAME
    if existing.is_file():
        try:
            old = StoreManifest.model_validate_json(existing.read_text())
        except ValueError as exc:
            raise TrainingError(f"{existing}: unreadable manifest ({exc})") from None
        if old.objectives == rewards:
            keep = ("name", "alpha", "guidance", "defaults", "reward_scale")
            manifest.update({k: v for k, v in old.model_dump().items() if k in keep})
    return manifest


def _fitted_scale(base: Path, rewards: list[str], work: Path, samples: int, settings) -> dict:
    """The reward scale fitted on `samples` base responses per training prompt, once: it is
    kept in ``work/reward_scale.json``, so a resumed build keeps its scale."""
    from training.sampling import fit_scale_on_base

    scale_path = work / "reward_scale.json"
    if not scale_path.is_file():
        fitted = fit_scale_on_base(
            base,
            rewards,
            samples,
            max_prompts=settings.get("max_prompts"),
            max_new_tokens=int(settings.get("max_completion_length", 32)),
            seed=int(settings.get("seed", 0)),
            split=str(settings.get("split", "train")),
        )
        write_whole(scale_path, json.dumps(fitted, indent=2) + "\n")
    return json.loads(scale_path.read_text())


def _slug(spec: str) -> str:
    """A folder name for a reward spec ('pkg.mod:fn' -> 'pkg.mod-fn')."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in spec).strip("-") or "reward"
