"""`mage seeds`: the spread across seeds of one `mage eval` comparison (HV, ctrl, diffs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.common import strict_json


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


def add_seeds_command(sub: argparse._SubParsersAction) -> None:
    seeds = sub.add_parser(
        "seeds", help="the spread across seeds of one `mage eval` comparison (HV, ctrl, diffs)"
    )
    seeds.add_argument(
        "results", type=Path, nargs="+", help="`mage eval --out` folders or results.json files"
    )
    seeds.set_defaults(func=_seeds)
