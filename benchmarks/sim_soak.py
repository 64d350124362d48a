"""Soak of the engine's deterministic simulation (tests/simulation.py): many more seeded
schedules than `make test` runs, on a tiny random store built in a temporary folder.

Each seed draws engine limits and a schedule of submits, fan-outs, cancels, deadlines and
overload refusals, played by stepping the engine against an explicit clock; the invariants
are checked after each (every request ends once with one outcome, the counted outcomes
match, the engine is empty when idle, no request fails because of another, every completed
request equals its own run). The first broken schedule stops the run, printing its seed and
the command that replays it exactly.

Usage: python benchmarks/sim_soak.py [--schedules 5000] [--seed 0]
Prints a table of outcomes, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_store.loader import load_store  # noqa: E402
from tests.common import build_tiny_store  # noqa: E402
from tests.simulation import AloneRuns, InvariantError, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=5000, help="seeds to play")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    args = parser.parse_args(argv)
    # The tiny model's ops are microseconds: more threads only contend.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        path = build_tiny_store(Path(folder) / "store", beta=0.7, alpha=0.2, specialists=True)
        store = load_store(path, "cpu", "float32")
        alone, seen, started = AloneRuns(store), Counter(), time.perf_counter()
        seeds = range(args.seed, args.seed + args.schedules)
        failure = None
        for seed in seeds:
            try:
                seen += run(store, range(seed, seed + 1), alone)
            except InvariantError as exc:
                failure = str(exc)
                break
        seconds = time.perf_counter() - started
    played = seed - args.seed + (failure is None)
    print(f"{'outcome':<12}{'requests':>10}")
    for outcome, count in sorted(seen.items()):
        print(f"{outcome:<12}{count:>10}")
    if failure is not None:
        print("FAIL", failure, file=sys.stderr)
    summary = {
        "first_seed": args.seed,
        "schedules": played,
        "failed_seed": None if failure is None else seed,
        "requests": dict(sorted(seen.items())),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(summary))
    return 1 if failure is not None else 0


if __name__ == "__main__":
    sys.exit(main())
