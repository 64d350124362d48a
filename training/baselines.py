"""What the trained baselines (MORLHF, MODPO, RiC) share: the store they are trained for (its
base, objectives and fixed reward scale r~), the preference grid, folder names, and recording
their adapters in the store's manifest (`baselines`), so `mage eval` and the server find them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from objectives.preferences import preference_sweep
from objectives.scale import RewardScale
from training.common import TrainingError, load_base, pick_device, prompt_texts, seed_everything
from training.runs import LoraSettings, lora_config, trainer_args
from training.sampling import SamplingSettings
from training.scored import scored_samples


@dataclass(frozen=True)
class StoreTask:
    """The training task a store defines."""

    store: Path
    """The store folder (adapters are written under ``store/baselines``)."""
    base: Path
    """The SFT base (also the reference policy of every baseline)."""
    rewards: tuple[str, ...]
    """Reward spec per objective, in the store's objective order."""
    scale: RewardScale | None
    """The store's fixed reward scale r~ (None: raw rewards)."""


def store_task(store: Path, rewards: list[str] | None = None) -> StoreTask:
    """The task of a checked store; `rewards` overrides the reward specs (default: the
    objective names, as `mage eval` scores them)."""
    from model_store.errors import StoreError
    from model_store.validate import check_store

    try:
        checked = check_store(store)
    except StoreError as exc:
        raise TrainingError(f"--store: {exc}") from None
    objectives = list(checked.manifest.objectives)
    specs = list(rewards or objectives)
    if len(specs) != len(objectives):
        raise TrainingError(f"--rewards: {len(specs)} given for {len(objectives)} objectives")
    scale = RewardScale.from_manifest(checked.manifest)
    return StoreTask(checked.root, checked.base_path, tuple(specs), scale)


def preference_grid(n: int, steps: int | None = None) -> tuple[tuple[float, ...], ...]:
    """The evaluation's preference sweep (both ends included): mage eval's own grid."""
    return preference_sweep(n, steps)


def check_preferences(preferences, n: int) -> tuple[tuple[float, ...], ...]:
    """Each mu has n weights >= 0 summing to 1; TrainingError names the first that does not."""
    checked = []
    for mu in preferences:
        mu = tuple(round(float(w), 6) for w in mu)
        if len(mu) != n or min(mu) < 0 or abs(sum(mu) - 1.0) > 1e-6:
            raise TrainingError(f"--preferences {list(mu)}: need {n} weights >= 0 summing to 1")
        checked.append(mu)
    if not checked:
        raise TrainingError("--preferences: give at least one preference")
    return tuple(checked)


def parse_preferences(text: str, n: int) -> tuple[tuple[float, ...], ...]:
    """'1,0;0.5,0.5;0,1' -> ((1, 0), (0.5, 0.5), (0, 1)); '' -> the evaluation grid."""
    if not text.strip():
        return preference_grid(n)
    try:
        rows = [tuple(float(v) for v in part.split(",")) for part in text.split(";") if part]
    except ValueError:
        raise TrainingError(f"--preferences {text!r}: expected '0.3,0.7;1,0'") from None
    return check_preferences(rows, n)


def record_baseline(store: Path, method: str, entry: object) -> None:
    """Write `entry` into the manifest's `baselines.<method>` (a preference entry replaces the
    one with the same preference; `ric` replaces the RiC spec) and refresh the checksums."""
    from model_store.builder import write_manifest
    from model_store.validate import read_manifest

    manifest = read_manifest(store).model_dump()
    baselines = manifest.setdefault("baselines", {})
    if method == "ric":
        baselines["ric"] = entry
    else:
        kept = [e for e in baselines.get(method, []) if e["preference"] != entry["preference"]]  # type: ignore[index]
        baselines[method] = sorted([*kept, entry], key=lambda e: [-w for w in e["preference"]])
    write_manifest(store, manifest)


@dataclass(frozen=True)
class FineTuneRun:
    """What a MODPO and a RiC run share: one LoRA over the store's base, fine-tuned on base
    samples of the training prompts scored on the store's r~ (TRL's DPO or SFT trainer)."""

    store: Path
    """Store whose base, objectives and reward scale define the task; adapters go under
    ``store/baselines`` and are listed in its manifest."""
    work: Path | None = None
    """Samples, checkpoints and logs (default ``<store>-work``), outside the store."""
    rewards: tuple[str, ...] | None = None
    """Reward spec per objective; None: the store's objective names."""
    steps: int = 100
    """Optimizer steps per adapter (per round for RiC)."""
    batch_size: int = 4
    """Preference pairs (MODPO) or responses (RiC) per optimizer step."""
    lr: float = 1e-4
    """Learning rate (constant)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The adapter's LoRA (give the backbones' rank and targets)."""
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    """How responses are drawn (per prompt: 1 greedy + the rest sampled)."""
    split: str = "train"
    """Prompt split (or JSONL file)."""
    max_prompts: int | None = None
    """First N prompts only."""
    save_steps: int = 25
    """Checkpoint every N steps (a re-run resumes)."""
    seed: int = 0
    """Seed of sampling and training."""
    device: str = "auto"
    """auto (CUDA if present), cpu or cuda."""
    progress: bool = True
    """Progress bars."""

    def task(self) -> StoreTask:
        if self.steps < 1 or self.batch_size < 1:
            raise TrainingError("--steps and --batch-size must be >= 1")
        return store_task(self.store, list(self.rewards) if self.rewards else None)

    def work_dir(self, task: StoreTask, method: str) -> Path:
        work = Path(self.work) if self.work else task.store.with_name(task.store.name + "-work")
        return work / method

    def prompts(self) -> list[str]:
        prompts = prompt_texts(self.split, self.max_prompts)
        if not prompts:
            raise TrainingError(f"prompt split {self.split!r} is empty")
        return prompts

    def base_samples(self, task: StoreTask, cache: Path):
        """(base tokenizer, samples, r~ per sample and objective), from `cache` if there."""
        model, tokenizer = load_base(task.base, pick_device(self.device))
        samples, scores = scored_samples(
            model, tokenizer, self.prompts(), list(task.rewards), task.scale, self.sampling,
            self.seed, cache, self.progress,
        )  # fmt: skip
        return tokenizer, samples, scores

    def trainer_args(self, out: Path) -> dict:
        """TrainingArguments fields of one run into ``out/checkpoints``; seeds everything."""
        seed_everything(self.seed)
        cpu = pick_device(self.device).type == "cpu"
        args = trainer_args(
            out / "checkpoints", self.steps, self.lr, self.seed, cpu, self.progress, self.save_steps
        )
        return args | {"per_device_train_batch_size": self.batch_size, "max_length": None}

    def peft_config(self):
        return lora_config(self.lora.rank, self.lora.lora_alpha, self.lora.targets)

    def settings(self, task: StoreTask) -> dict:
        """What a resumed run must share with the run it resumes (guard_run_settings)."""
        lora = self.lora
        return {
            "base": str(task.base),
            "rewards": list(task.rewards),
            "lora": [lora.rank, lora.lora_alpha, list(lora.targets)],
            "seed": self.seed,
        }
