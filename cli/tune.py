"""`mage tune alpha|gamma|beta`: choose Eq. (13)'s alpha, each guidance mode's gamma, or
Eq. (12)'s beta by the hypervolume of the front (evaluation.tune)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.eval import parse_preferences
from model_store.errors import StoreError
from training.common import strict_json


def _tuning_preferences(args, store: Path, rewards) -> tuple[tuple[float, ...], ...]:
    """--preferences, else a coarse sweep of the store's objectives: (1, 0), (0.75, 0.25), ...,
    (0, 1) for two, the simplex grid of step 1/2 (vertices and edge midpoints) for more, so a
    three-objective store tunes on 6 preferences instead of eval's 15."""
    from evaluation.run import preference_sweep
    from model_store.validate import check_store

    if args.preferences:
        return parse_preferences(args.preferences)
    if args.tune_command == "beta" and not rewards:
        raise ValueError("--rewards is required for beta tuning")
    n = len(rewards) if args.tune_command == "beta" else len(check_store(store).manifest.objectives)
    return preference_sweep(n, args.simplex_steps or (4 if n == 2 else 2))


def _tune(args: argparse.Namespace) -> int:
    from evaluation.run import EvalConfig
    from evaluation.tune import tune_alpha, tune_beta, tune_gamma
    from model_store.architectures import resolve_lora_targets
    from objectives.rewards import RewardError
    from training.common import TrainingError

    grid = [float(v) for v in args.grid.split(",")]
    rewards = tuple(args.rewards.split(",")) if args.rewards else None
    try:
        store = args.store if args.tune_command in ("alpha", "gamma") else Path(".")
        prefs = _tuning_preferences(args, store, rewards)
        cfg = EvalConfig(
            store=store,
            out=Path("."),  # unused: a tuner writes only under --work
            methods=("bone-soup",),  # unused: each tuner decodes the methods it tunes
            preferences=prefs,
            split=args.split,
            limit=args.limit,
            gamma=1.0,  # tune gamma passes each trial gamma itself
            max_new_tokens=args.max_new_tokens,
            rewards=rewards,
            batch_size=args.batch_size,
        )
        if args.tune_command == "alpha":
            result = tune_alpha(cfg, grid, write=args.write, work=args.work)
        elif args.tune_command == "gamma":
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            result = tune_gamma(cfg, methods, grid, write=args.write, work=args.work)
        else:
            if not rewards:
                raise ValueError("--rewards is required for beta tuning")
            result = tune_beta(
                cfg,
                args.base,
                list(rewards),
                grid,
                args.work,
                steps=args.steps,
                seed=args.seed,
                lr=args.lr,
                rank=args.rank,
                lora_alpha=2 * args.rank,
                targets=resolve_lora_targets(args.targets, args.base),
            )
    except (StoreError, RewardError, TrainingError, ValueError) as exc:
        print(f"mage tune {args.tune_command}: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "work", None):
        (args.work / "result.json").write_text(strict_json(result, indent=1) + "\n")
    print(strict_json(result))  # one line, last: training logs may precede it
    return 0


def add_tune_commands(sub: argparse._SubParsersAction) -> None:
    tune = sub.add_parser("tune", help="choose alpha (Eq. 13) or beta (Eq. 12) by hypervolume")
    tune_sub = tune.add_subparsers(dest="tune_command", required=True)
    for name, grid in (
        ("alpha", "0,0.1,0.2,0.3,0.4,0.5,0.75,1"),
        ("gamma", "0.1,0.2,1,3,5"),
        ("beta", "0.6,0.7,0.8"),
    ):
        cmd = tune_sub.add_parser(name)
        cmd.add_argument("--grid", default=grid, help=f"values to try (default {grid})")
        cmd.add_argument(
            "--preferences",
            default=None,
            help="'1,0;0.5,0.5;0,1' (default: 1, 0.75, ..., 0 for two objectives; the simplex "
            "grid of step 1/2 for more)",
        )
        cmd.add_argument(
            "--simplex-steps", type=int, default=None, help="default sweep's grid step 1/N"
        )
        cmd.add_argument("--rewards", default=None, help="reward spec per objective")
        cmd.add_argument(
            "--split", default="validation", help="prompt split or a JSONL prompt file"
        )
        cmd.add_argument(
            "--limit", type=int, default=None, help="first N prompts (default: all; few are noisy)"
        )
        cmd.add_argument("--max-new-tokens", type=int, default=32)
        cmd.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
        cmd.set_defaults(func=_tune)
        if name in ("alpha", "gamma"):
            cmd.add_argument("--store", type=Path, required=True)
            cmd.add_argument("--write", action="store_true", help=f"write the chosen {name}")
            cmd.add_argument(
                "--work", type=Path, default=None, help="keep the responses here (resumable)"
            )
        if name == "gamma":
            cmd.add_argument(
                "--methods",
                default="mage-e,mage-e-m,mage-i,mage-i-m",
                help="guided methods; each one's choice becomes its mode's default",
            )
        if name == "beta":
            cmd.add_argument("--base", type=Path, required=True, help="HF base model folder")
            cmd.add_argument("--work", type=Path, required=True, help="folder for the trial stores")
            cmd.add_argument("--steps", type=int, default=10, help="steps per backbone (short)")
            cmd.add_argument("--seed", type=int, default=0)
            cmd.add_argument("--lr", type=float, default=1e-3, help="as the demo's backbones")
            cmd.add_argument("--rank", type=int, default=4, help="LoRA rank (demo: 4)")
            cmd.add_argument(
                "--targets",
                default="all-linear",
                help="LoRA target modules: names, 'auto' or 'all-linear' (default, as the demo)",
            )
