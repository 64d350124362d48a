"""`mage eval`: preference sweeps, rewards and front metrics per method (evaluation.run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_store.errors import StoreError


def parse_preferences(text: str) -> tuple[tuple[float, ...], ...]:
    """'1,0;0.5,0.5' -> ((1.0, 0.0), (0.5, 0.5)); ValueError on a non-number."""
    return tuple(tuple(float(v) for v in part.split(",")) for part in text.split(";"))


def _eval(args: argparse.Namespace) -> int:
    from evaluation.oracle import OracleSettings
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
        for name in ("batch_size", "beam_width", "beam_expansion", "beam_interval"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        config = EvalConfig(
            store=args.store,
            out=args.out,
            methods=methods,
            preferences=prefs,
            split=args.split,
            limit=args.limit,
            gamma=None if args.gamma == "tuned" else float(args.gamma),
            max_new_tokens=args.max_new_tokens,
            rewards=tuple(args.rewards.split(",")) if args.rewards else None,
            batch_size=args.batch_size,
            beam=BeamSettings(args.beam_width, args.beam_expansion, args.beam_interval),
            gamma_one=not args.no_gamma_one,
            hv_reference=(
                tuple(float(v) for v in args.hv_reference.split(",")) if args.hv_reference else None
            ),
            replicates=args.replicates,
            oracle=OracleSettings(
                samples=args.oracle_samples,
                temperature=args.oracle_temperature,
                candidates=args.oracle_candidates,
                rollout=args.oracle_rollout,
                interval=args.oracle_interval,
                rollout_temperature=args.oracle_rollout_temperature,
            ),
        )
        results = run_eval(config)
    except (StoreError, RewardError, ValueError) as exc:
        print(f"mage eval: {exc}", file=sys.stderr)
        return 2
    print((args.out / "table.md").read_text())
    print(f"results in {args.out}; {results['seconds_generating']}s generating")
    return 0


def add_eval_command(sub: argparse._SubParsersAction) -> None:
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
    oracle = ev.add_argument_group("oracles (oracle-bok, oracle-cd: guided by the true rewards)")
    oracle.add_argument("--oracle-samples", type=int, default=8, help="bok: K (greedy + K-1)")
    oracle.add_argument("--oracle-temperature", type=float, default=1.0, help="bok: samples' T")
    oracle.add_argument("--oracle-candidates", type=int, default=4, help="cd: top-k tokens")
    oracle.add_argument("--oracle-rollout", type=int, default=8, help="cd: L rollout tokens")
    oracle.add_argument(
        "--oracle-interval", type=int, default=4, help="cd: tokens committed per decision"
    )
    oracle.add_argument(
        "--oracle-rollout-temperature", type=float, default=0.0, help="cd: 0 greedy rollouts"
    )
    ev.set_defaults(func=_eval)
