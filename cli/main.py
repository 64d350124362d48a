"""`mage` — serve a store, and check, inspect or prepare stores."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from cli import extras
from cli.store import add_store_commands
from model_store.errors import StoreError
from server.settings import ServerSettings
from training.common import strict_json


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from model_store.validate import check_store
    from server.app import create_app
    from server.http_protocol import uvicorn_config

    overrides = {
        k: v for k, v in vars(args).items() if k in ServerSettings.model_fields and v is not None
    }
    settings = ServerSettings(**overrides)
    if not settings.store:
        from model_store.resources import demo_store_path

        try:
            demo = demo_store_path()
        except FileNotFoundError as exc:
            print(f"mage serve: no --store given and no demo store: {exc}", file=sys.stderr)
            return 2
        print(f"mage serve: no --store given; serving the embedded demo store {demo}")
        settings = settings.model_copy(update={"store": str(demo)})
    try:
        check_store(settings.store)  # fail fast, with the file and the problem, before binding
    except StoreError as exc:
        print(f"mage serve: bad store: {exc}", file=sys.stderr)
        return 2
    uvicorn.Server(uvicorn_config(create_app(settings), settings)).run()
    return 0


def parse_preferences(text: str) -> tuple[tuple[float, ...], ...]:
    """'1,0;0.5,0.5' -> ((1.0, 0.0), (0.5, 0.5)); ValueError on a non-number."""
    return tuple(tuple(float(v) for v in part.split(",")) for part in text.split(";"))


def _eval(args: argparse.Namespace) -> int:
    from evaluation.run import METHODS, EvalConfig, preference_sweep, run_eval
    from guidance.search import BeamSettings
    from model_store.validate import check_store
    from objectives.rewards import RewardError

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"mage eval: unknown method(s) {unknown}; known: {sorted(METHODS)}", file=sys.stderr)
        return 2
    try:
        n = len(check_store(args.store).manifest.objectives)
        prefs = (
            parse_preferences(args.preferences)
            if args.preferences
            else preference_sweep(n, args.simplex_steps)
        )
        if len(prefs) < 2:  # one point has no sparsity, spacing or controllability (NaN)
            raise ValueError("--preferences: give at least two (a front's metrics compare them)")
        rewards = tuple(args.rewards.split(",")) if args.rewards else None
        for name in ("batch_size", "beam_width", "beam_expansion", "beam_interval"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        gamma = None if args.gamma == "tuned" else float(args.gamma)
        reference = (
            tuple(float(v) for v in args.hv_reference.split(",")) if args.hv_reference else None
        )
        config = EvalConfig(
            args.store,
            args.out,
            methods,
            prefs,
            args.split,
            args.limit,
            gamma,
            args.max_new_tokens,
            rewards,
            args.batch_size,
            BeamSettings(args.beam_width, args.beam_expansion, args.beam_interval),
            gamma_one=not args.no_gamma_one,
            hv_reference=reference,
            replicates=args.replicates,
        )
        results = run_eval(config)
    except (StoreError, RewardError, ValueError) as exc:
        print(f"mage eval: {exc}", file=sys.stderr)
        return 2
    print((args.out / "table.md").read_text())
    print(f"results in {args.out}; {results['seconds_generating']}s generating")
    return 0


def _seeds(args: argparse.Namespace) -> int:
    from evaluation.report import seed_spread, seed_spread_table

    runs = []
    for given in args.results:  # an --out folder, or its results.json as under docs/
        path = given if given.is_file() else given / "results.json"
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            print(f"mage seeds: {path}: cannot read it ({exc})", file=sys.stderr)
            return 2
    try:
        spread = seed_spread(runs)
    except (KeyError, ValueError) as exc:
        print(f"mage seeds: {exc}", file=sys.stderr)
        return 2
    print(seed_spread_table([str(f) for f in args.results], spread))
    print(strict_json(spread))
    return 0


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
            store,
            Path("."),
            ("bone-soup",),
            prefs,
            args.split,
            args.limit,
            1.0,
            args.max_new_tokens,
            rewards,
            args.batch_size,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a store over HTTP")
    for name, field in ServerSettings.model_fields.items():
        flag, help_text = (
            f"--{name.replace('_', '-')}",
            f"{field.description} [env MAGE_{name.upper()}]",
        )
        if field.annotation is bool:
            serve.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif typing.get_origin(field.annotation) is list:  # repeatable (api keys, origins)
            serve.add_argument(flag, dest=name, action="append", default=None, help=help_text)
        else:
            kind = field.annotation if field.annotation in (int, float) else str
            serve.add_argument(flag, dest=name, type=kind, default=None, help=help_text)
    serve.set_defaults(func=_serve)
    add_store_commands(sub)
    ev = sub.add_parser("eval", help="preference sweeps, rewards and front metrics per method")
    ev.add_argument("--store", type=Path, required=True)
    ev.add_argument("--out", type=Path, required=True, help="results folder (resumable cache)")
    ev.add_argument("--methods", default="bone-soup,mage-e-m,mage-i-m")
    ev.add_argument(
        "--preferences",
        default=None,
        help="'1,0;0.5,0.5;0,1' (default: 0, 0.1, ..., 1 or a simplex grid)",
    )
    ev.add_argument("--rewards", default=None, help="reward spec per objective, comma-separated")
    ev.add_argument("--split", default="test", help="prompt split or a JSONL prompt file")
    ev.add_argument("--limit", type=int, default=None, help="first N prompts")
    ev.add_argument(
        "--gamma",
        default="tuned",
        help="guidance scale for every method, or 'tuned' (default): each method at its "
        "store's tuned gamma (defaults.gamma_by_mode), and at gamma = 1 as <method>@g1",
    )
    ev.add_argument("--no-gamma-one", action="store_true", help="with tuned gammas: no @g1 runs")
    ev.add_argument(
        "--hv-reference",
        default=None,
        help="HV reference point, one value per objective (default: the store's "
        "reward_scale.hv_reference)",
    )
    ev.add_argument(
        "--simplex-steps",
        type=int,
        default=None,
        help="default sweep: grid step 1/N (default 10 for two objectives, 4 for more)",
    )
    ev.add_argument("--replicates", type=int, default=2000, help="paired bootstrap replicates")
    ev.add_argument("--max-new-tokens", type=int, default=48)
    ev.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    ev.add_argument("--beam-width", type=int, default=4, help="beam: b (beams kept)")
    ev.add_argument("--beam-expansion", type=int, default=1, help="beam: c (samples per beam)")
    ev.add_argument("--beam-interval", type=int, default=10, help="beam: l (tokens per chunk)")
    ev.set_defaults(func=_eval)
    seeds = sub.add_parser(
        "seeds", help="the spread across seeds of one `mage eval` comparison (HV, ctrl, diffs)"
    )
    seeds.add_argument(
        "results", type=Path, nargs="+", help="`mage eval --out` folders or results.json files"
    )
    seeds.set_defaults(func=_seeds)
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
    from training.cli import add_train_commands

    add_train_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = extras.command_of(args)
    missing = extras.missing_modules(extras.extras_for(command))
    if missing:
        print(extras.missing_message(command, missing), file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:  # a package of an extra, imported on a path not foreseen
        module = extras.extra_module(exc)
        if module is None:
            raise
        print(extras.missing_message(command, [module]), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
