"""Single-request decode speed per guidance mode, in process (no HTTP), beside transformers.

Usage: python benchmarks/throughput.py --store PATH [--tokens 64] [--modes none,explicit]
For each guidance mode it decodes one request (fixed length: EOS ignored) through the
serving engine; in the same run it decodes the bare base through the same engine (the SFT
model, no LoRA rows) and with transformers' own greedy `generate`, so the cost of the
per-row adapters and of the engine itself are measured apart. Prints a table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

from guidance.engine import Engine
from guidance.plan import build_plan
from guidance.requests import GenerationRequest, SamplingParams
from model_store.loader import LoadedStore, load_store
from training.common import encode_prompt

PROMPT = "Give me three tips for sleeping better."


def engine_run(store: LoadedStore, ids: list[int], mode: str, tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s after it) of one request through the engine;
    mode "base" decodes the SFT model itself (all adapter coefficients zero)."""
    mu = torch.full((store.n_objectives,), 1.0 / store.n_objectives, dtype=torch.float64)
    plan = build_plan(store, "none", mu, "bone-soup", policy="base") if mode == "base" else None
    request = GenerationRequest(
        "bench",
        tuple(ids),
        mu,
        "none" if mode == "base" else mode,
        1.0,
        SamplingParams(),
        tokens,
        ignore_eos=True,
        plan=plan,
    )
    stamps: list[float] = []
    start = time.perf_counter()
    Engine(store).run_to_completion(request, lambda e: stamps.append(time.perf_counter()))
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def generate_run(model, ids: list[int], tokens: int) -> tuple[float, float]:
    """The same for transformers' greedy generate on the bare base: its first-token time
    and its decode rate, from two runs (1 token, then `tokens`)."""
    x = torch.tensor([ids])

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    first, full = timed(1), timed(tokens)
    return first, (tokens - 1) / (full - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--modes", default="none,explicit,explicit-ensemble,implicit,implicit-ensemble"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    store = load_store(args.store, args.device, "auto")
    base = AutoModelForCausalLM.from_pretrained(str(store.checked.base_path), dtype=store.dtype).to(
        store.device
    )
    base.generation_config.pad_token_id = store.tokenizer.eos_token_id
    ids = encode_prompt(store.tokenizer, PROMPT)  # the chat template, as the server applies it
    mu = torch.full((store.n_objectives,), 1.0 / store.n_objectives, dtype=torch.float64)
    engine_run(store, ids, "none", 4)  # warm-up
    generate_run(base, ids, 4)
    rows = {"transformers generate (bare base)": None, "engine: bare base": "base"}
    rows |= {f"engine: {mode}": mode for mode in args.modes.split(",")}
    results = {}
    print(f"{'decoder':<36}{'rows':>5}{'TTFT s':>9}{'decode tok/s':>14}")
    for label, mode in rows.items():
        # Interleaved repeats, best of each: the machine's noise only ever slows a run.
        runs = [
            generate_run(base, ids, args.tokens)
            if mode is None
            else engine_run(store, ids, mode, args.tokens)
            for _ in range(args.repeats)
        ]
        ttft, decode = min(r[0] for r in runs), max(r[1] for r in runs)
        width = 1 if mode in (None, "base") else build_plan(store, mode, mu, "bone-soup").rows
        results[label] = {
            "rows": width,
            "ttft_s": round(ttft, 4),
            "decode_tokens_per_s": round(decode, 2),
        }
        print(f"{label:<36}{width:>5}{ttft:>9.3f}{decode:>14.2f}")
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
