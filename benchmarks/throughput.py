"""Decode throughput per guidance mode on a store, through the engine (no HTTP).

Usage: python benchmarks/throughput.py --store PATH [--tokens 64] [--modes none,explicit]
Prints a table, then one JSON line with the numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from guidance.engine import Engine
from guidance.plan import build_plan
from guidance.requests import GenerationRequest, SamplingParams
from model_store.loader import load_store
from training.common import encode_prompt

PROMPT = "Give me three tips for sleeping better."


def run_once(engine: Engine, ids: list[int], mode: str, tokens: int) -> tuple[float, float, int]:
    """Returns (time to first token, decode tokens/s after the first, tokens generated)."""
    mu = torch.full(
        (engine.store.n_objectives,), 1.0 / engine.store.n_objectives, dtype=torch.float64
    )
    request = GenerationRequest("bench", tuple(ids), mu, mode, 1.0, SamplingParams(), tokens)
    stamps: list[float] = []
    start = time.perf_counter()
    engine.run_to_completion(request, lambda e: stamps.append(time.perf_counter()))
    ttft = stamps[0] - start
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return ttft, decode, len(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--modes", default="none,explicit,explicit-ensemble,implicit,implicit-ensemble"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    store = load_store(args.store, args.device, "auto")
    engine = Engine(store)
    ids = encode_prompt(store.tokenizer, PROMPT)  # the chat template, as the server applies it
    mu = torch.full((store.n_objectives,), 1.0 / store.n_objectives, dtype=torch.float64)
    run_once(engine, ids, "none", 4)  # warm-up
    results = {}
    print(f"{'mode':<20}{'rows':>5}{'TTFT s':>9}{'decode tok/s':>14}{'tokens':>8}")
    for mode in args.modes.split(","):
        runs = [run_once(engine, ids, mode, args.tokens) for _ in range(args.repeats)]
        ttft = min(r[0] for r in runs)
        decode = max(r[1] for r in runs)
        nrows = build_plan(store, mode, mu, "bone-soup").coefficients.shape[0]
        results[mode] = {"ttft_s": round(ttft, 4), "decode_tokens_per_s": round(decode, 2)}
        print(f"{mode:<20}{nrows:>5}{ttft:>9.3f}{decode:>14.2f}{runs[0][2]:>8}")
    print(
        json.dumps(
            {
                "benchmark": "throughput",
                "device": str(store.device),
                "threads": torch.get_num_threads(),
                "prompt_tokens": len(ids),
                "tokens": args.tokens,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
