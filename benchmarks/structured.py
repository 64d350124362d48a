"""Per-token cost of structured output: constrained against free decoding, in process.

Usage: python benchmarks/structured.py [--store PATH] [--tokens 48] [--batches 1,8]
On the demo store by default. For each batch size it decodes the same chat prompt in that
many rows through the serving engine, greedy, once free and once under a JSON schema (three
strings of at most 60 characters each: long enough to stay open for the whole run), runs
interleaved, best of `--repeats`; the decode time per token is taken from each run's token
stamps after the first (prefill excluded). Separately it times the constrain stage alone
(guidance.constrain.allowed_tokens: every row's grammar mask, unpacked onto the device) per
step. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from guidance.constrain import GrammarSpec, allowed_tokens
from guidance.engine import Engine
from guidance.requests import GenerationRequest, SamplingParams
from model_store.loader import LoadedStore, load_store
from model_store.resources import demo_store_path
from server.translate import compile_grammar
from training.common import encode_prompt

PROMPT = "Give me three tips for sleeping better, as JSON."
SCHEMA = {
    "type": "object",
    "properties": {
        "tips": {
            "type": "array",
            "items": {"type": "string", "maxLength": 60},
            "minItems": 3,
            "maxItems": 3,
        }
    },
    "required": ["tips"],
    "additionalProperties": False,
}


def requests(store: LoadedStore, rows: int, tokens: int, constrained: bool) -> list:
    ids = encode_prompt(store.tokenizer, PROMPT)  # the chat template, as the server applies it
    mu = torch.full((store.n_objectives,), 1.0 / store.n_objectives, dtype=torch.float64)
    grammar = compile_grammar(GrammarSpec("json", SCHEMA), store) if constrained else None
    one = GenerationRequest(
        "bench", tuple(ids), mu, "none", 1.0, SamplingParams(), tokens, ignore_eos=True
    )
    return [dataclasses.replace(one, request_id=f"r{i}", grammar=grammar) for i in range(rows)]


def decode_ms_per_token(store: LoadedStore, rows: int, tokens: int, constrained: bool) -> dict:
    """One batch of `rows` identical requests: ms per decode step after the first token,
    and the tokens each row generated."""
    stamps: list[float] = []
    batch = requests(store, rows, tokens, constrained)
    outputs = Engine(store).run_all(batch, lambda e: stamps.append(time.perf_counter()))
    steps = max(len(events) for events in outputs)
    first = stamps[rows - 1]  # every row's first token comes in the prefill step
    return {"ms": (stamps[-1] - first) * 1e3 / max(steps - 1, 1), "tokens": steps}


def mask_ms_per_step(store: LoadedStore, rows: int, steps: int = 40) -> float:
    """The constrain stage alone: masks of `rows` grammars (advanced along a valid document)
    per step, unpacked onto the store's device."""
    grammar = compile_grammar(GrammarSpec("json", SCHEMA), store)
    constraints = [grammar.start() for _ in range(rows)]
    text = json.dumps({"tips": ["a" * 20, "b" * 20, "c" * 20]}, separators=(",", ":"))
    tokens = store.tokenizer(text, add_special_tokens=False)["input_ids"][:steps]
    vocab = store.model.get_output_embeddings().weight.shape[0]
    scores = torch.zeros(rows, vocab, device=store.device)
    start = time.perf_counter()
    for token in tokens:
        allowed_tokens(constraints, scores)
        for constraint in constraints:
            constraint.advance(token)
    if store.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / len(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", default=None, help="default: the demo store")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    store = load_store(args.store or demo_store_path(), args.device, "auto")
    decode_ms_per_token(store, 1, 4, True)  # warm-up (and the tokenizer's grammar wrapper)
    results = {}
    print(f"{'rows':>5}{'free ms/tok':>13}{'JSON ms/tok':>13}{'overhead':>10}{'mask ms/step':>14}")
    for rows in [int(b) for b in args.batches.split(",")]:
        runs = [
            (
                decode_ms_per_token(store, rows, args.tokens, False),
                decode_ms_per_token(store, rows, args.tokens, True),
            )
            for _ in range(args.repeats)
        ]
        free = min(r[0]["ms"] for r in runs)  # noise only ever slows a run
        constrained = min(r[1]["ms"] for r in runs)
        mask = min(mask_ms_per_step(store, rows) for _ in range(args.repeats))
        results[str(rows)] = {
            "free_ms_per_token": round(free, 3),
            "constrained_ms_per_token": round(constrained, 3),
            "overhead": round(constrained / free - 1, 4),
            "mask_ms_per_step": round(mask, 4),
            "constrained_tokens": runs[0][1]["tokens"],
        }
        overhead = f"{(constrained / free - 1) * 100:+.1f}%"
        print(f"{rows:>5}{free:>13.2f}{constrained:>13.2f}{overhead:>10}{mask:>14.3f}")
    print(
        json.dumps(
            {
                "benchmark": "structured",
                "device": str(store.device),
                "threads": torch.get_num_threads(),
                "tokens": args.tokens,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
