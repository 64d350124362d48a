"""MORLHF (Wu et al. 2023, "Fine-Grained Human Feedback Gives Better Rewards for Language Model
Training"; the MAGE paper's "oracle", Table 2): one policy per preference mu, trained by RL on
the scalarised reward

    theta_mu = argmax E_{s~D, a~pi}[ mu^T r~(s, a) - eta log pi(a|s) / pi_sft(a|s) ],

which is Eq. (11) with w_i = mu. So each MORLHF adapter is trained by exactly the backbones'
trainer (training/backbone.py: TRL's GRPOTrainer, LoRA, `sum_then_normalize` so the scalar
reward is mu^T r~ on the store's fixed scale, KL beta = eta to the base) with the backbones'
steps, KL, rank and learning rate: cost and quality then compare with Bone Soup's fairly. It
needs one run per preference, which is what merging avoids.

Changed from the paper: GRPO instead of PPO (as for the backbones: no critic, cheap on CPU).
Outputs: ``store/baselines/morlhf/mu-<w1>-<w2>...`` per mu, listed in the manifest's
`baselines.morlhf` (with --from-specialists, mu = e_i lists ``specialists/<objective>``);
checkpoints under ``work/mu-.../checkpoints`` (a re-run resumes each).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from objectives.preferences import preference_label
from training.backbone import BackboneTrainConfig, train_backbone
from training.baselines import (
    check_preferences,
    preference_grid,
    record_baseline,
    store_task,
)
from training.costs import record_store_cost, recorded_cost, run_cost


@dataclass(frozen=True)
class MorlhfConfig:
    """One MORLHF run: an adapter per preference of a grid, into a store."""

    store: Path
    """Store whose base, objectives and reward scale define the task; adapters are written to
    ``store/baselines/morlhf`` and listed in its manifest."""
    preferences: tuple[tuple[float, ...], ...] = ()
    """The preferences mu to train for; empty: `mage eval`'s sweep (both ends included)."""
    work: Path | None = None
    """Checkpoints and logs (default ``<store>-work/morlhf``), outside the store."""
    rewards: tuple[str, ...] | None = None
    """Reward spec per objective; None: the store's objective names."""
    backbone: dict = field(default_factory=dict)
    """BackboneTrainConfig fields every run shares (steps, kl, lr, rank, lora_alpha, targets,
    prompts_per_step, num_generations, max_completion_length, split, max_prompts, seed, ...):
    give the backbones' own so that cost and quality compare."""
    from_specialists: bool = False
    """A preference equal to a Rewarded-Soup specialist's weights e_i takes that specialist's
    adapter instead of training again: its training objective, e_i^T r~ with eta's KL to the
    base, is MORLHF's at mu = e_i. Only where the specialists were trained with these
    `backbone` settings (a demo build's are)."""


def train(config: MorlhfConfig) -> list[tuple[tuple[float, ...], Path]]:
    """Train (or resume, or find finished) one GRPO adapter per mu on mu^T r~; returns
    (mu, adapter folder) per preference, each recorded in the manifest as it finishes."""
    task = store_task(config.store, list(config.rewards) if config.rewards else None)
    n = len(task.rewards)
    grid = check_preferences(config.preferences or preference_grid(n), n)
    work = Path(config.work) if config.work else task.store.with_name(task.store.name + "-work")
    trained = []
    specialists = _specialists(task.store) if config.from_specialists else {}
    for mu in grid:
        label = preference_label(mu)
        relative = f"baselines/morlhf/{label}"
        if mu in specialists:  # the entry names the specialist's folder: no copy to store
            relative = specialists[mu]
            name = Path(relative).name  # and its training cost is the specialist's
            cost = recorded_cost(task.store, "specialists", name)
        else:
            run = BackboneTrainConfig(
                base=task.base,
                rewards=list(task.rewards),
                weights=list(mu),
                out=work / "morlhf" / label,
                adapter_dir=task.store / relative,
                reward_scale=task.scale,
                **config.backbone,
            )
            train_backbone(run)
            cost = run_cost(run.out)
        record_store_cost(task.store, "morlhf", label, cost)
        record_baseline(task.store, "morlhf", {"preference": list(mu), "path": relative})
        trained.append((mu, task.store / relative))
    return trained


def _specialists(store: Path) -> dict[tuple[float, ...], str]:
    """The store's specialists by their weights (e_i): {weights: adapter path in the store}."""
    from model_store.validate import read_manifest

    return {tuple(float(w) for w in s.weights): s.path for s in read_manifest(store).specialists}
