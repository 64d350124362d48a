"""Load benchmark: a real server driven over HTTP by N concurrent clients.

Starts `mage serve` on a free port (or targets --url), then, for each guidance mode and each
client count N, runs N closed-loop clients (or an open loop at --rate requests/s), each
with its own preference, streaming from /generate_stream; every request uses a preference
never sent before, so each one builds its plan. Per (mode, N) it prints aggregate generated
tokens/s, TTFT and inter-token latency p50/p99 (client side), and the server's peak RSS.
In the same run, with the server idle, it times transformers' own greedy `generate` on the
bare base for the same prompts and token counts, so every figure is a ratio on one machine.
Then one JSON line.

Usage: python benchmarks/load.py --store demo/store [--clients 1,8] [--modes none,explicit]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import httpx
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.served import ROOT, ServerProcess  # noqa: E402


def load_prompts(limit: int) -> list[str]:
    lines = (ROOT / "data/prompts/test.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:limit]]


class Preferences:
    """Distinct preferences: client i near mu_1 = i/(N-1), jittered so none repeats."""

    def __init__(self, seed: int) -> None:
        self.random, self.seen = random.Random(seed), set()

    def new(self, client: int, clients: int) -> list[float]:
        centre = client / max(1, clients - 1)
        while True:
            first = round(min(1.0, max(0.0, centre + self.random.uniform(-0.05, 0.05))), 6)
            if first not in self.seen:
                self.seen.add(first)
                return [first, round(1 - first, 6)]


async def stream_one(client: httpx.AsyncClient, url: str, payload: dict) -> dict:
    """One streamed request: its token arrival times, relative to sending."""
    sent, stamps = time.perf_counter(), []
    async with client.stream("POST", f"{url}/generate_stream", json=payload) as response:
        if response.status_code != 200:
            return {"error": response.status_code, "stamps": []}
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                stamps.append(time.perf_counter() - sent)
            elif line.startswith("event: error"):
                return {"error": "stream", "stamps": stamps}
    return {"error": None, "stamps": stamps}


async def run_clients(url: str, mode: str, clients: int, per_client: int, args) -> dict:
    prompts, prefs = load_prompts(clients * per_client), Preferences(hash((mode, clients)))
    results: list[dict] = []

    def payload(i: int, client: int) -> dict:
        parameters = {
            "preference": prefs.new(client, clients),
            "guidance": {"mode": mode, "gamma": 1.0},
            "max_new_tokens": args.tokens,
        }
        return {"messages": [{"role": "user", "content": prompts[i]}], "parameters": parameters}

    async with httpx.AsyncClient(timeout=600) as client:

        async def closed_loop(c: int) -> None:
            for k in range(per_client):
                results.append(await stream_one(client, url, payload(c * per_client + k, c)))

        async def open_loop() -> None:
            tasks = []
            for i in range(clients * per_client):
                tasks.append(asyncio.create_task(stream_one(client, url, payload(i, i % clients))))
                await asyncio.sleep(random.expovariate(args.rate))
            results.extend(await asyncio.gather(*tasks))

        started = time.perf_counter()
        if args.rate:
            await open_loop()
        else:
            await asyncio.gather(*(closed_loop(c) for c in range(clients)))
        wall = time.perf_counter() - started
    ok = [r for r in results if r["error"] is None]
    ttft = [r["stamps"][0] for r in ok if r["stamps"]]
    itl = [b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    tokens = sum(len(r["stamps"]) for r in ok)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "itl_p50_s": _pct(itl, 50),
        "itl_p99_s": _pct(itl, 99),
        "token_counts": [len(r["stamps"]) for r in ok],
    }


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def merge_histogram(url: str) -> dict[str, float]:
    """mage_merge_latency_seconds from /metrics: cumulative bucket counts by `le`, plus
    `count` and `sum`."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("mage_merge_latency_seconds_bucket"):
            values[name.split('le="')[1].split('"')[0]] = float(value)
        elif name in ("mage_merge_latency_seconds_count", "mage_merge_latency_seconds_sum"):
            values[name.rsplit("_", 1)[1]] = float(value)
    return values


def merge_stats(before: dict[str, float], after: dict[str, float]) -> dict:
    """Mean and p99 (the smallest bucket bound holding 99%) of the merges between two reads."""
    count = after["count"] - before["count"]
    bounds = sorted((float(k), after[k] - before[k]) for k in after if k not in ("count", "sum"))
    p99 = next((bound for bound, n in bounds if count and n >= 0.99 * count), None)
    mean = (after["sum"] - before["sum"]) / count if count else None
    return {
        "merges": int(count),
        "merge_mean_ms": mean and round(1000 * mean, 4),
        "merge_p99_bound_ms": p99 and 1000 * p99,
    }


def transformers_baseline(store: str, prompts: list[str], counts: list[int]) -> dict:
    """transformers' greedy generate on the bare base: same prompts, same token counts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model_store.validate import check_store
    from training.common import encode_prompt

    base = check_store(store).base_path
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model.generate(torch.tensor([encode_prompt(tokenizer, prompts[0])]), max_new_tokens=2)
    seconds, tokens = 0.0, 0
    for prompt, count in zip(prompts, counts, strict=True):
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                max_new_tokens=count,
                min_new_tokens=count,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        seconds += time.perf_counter() - started
        tokens += out.shape[1] - ids.shape[1]
    del model
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--store", default="demo/store")
    parser.add_argument("--url", help="target a running server instead of starting one")
    parser.add_argument("--clients", default="1,8", help="client counts, comma-separated")
    parser.add_argument("--modes", default="none,explicit")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48, help="max_new_tokens per request")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s")
    parser.add_argument("--server-arg", action="append", default=[], help="extra serve flag")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    flags = ["--max-running", str(max(counts)), *args.server_arg]
    server = None if args.url else ServerProcess(args.store, flags)
    url = args.url or server.url
    try:
        if server is not None:
            server.wait_ready()
        asyncio.run(run_clients(url, "none", 1, 1, args))  # warm-up
        idle_rss = server.memory_mib() if server else None
        rows = {}
        for mode in args.modes.split(","):
            for n in counts:
                if server is not None:
                    server.reset_peak()
                before = merge_histogram(url)
                row = asyncio.run(run_clients(url, mode, n, args.requests_per_client, args))
                row.update(merge_stats(before, merge_histogram(url)))
                row["peak_rss_mib"] = round(server.memory_mib("VmHWM"), 1) if server else None
                rows[f"{mode}@{n}"] = row
        single = rows[f"none@{counts[0]}"]
        prompts = load_prompts(len(single["token_counts"]))
        baseline = transformers_baseline(args.store, prompts, single["token_counts"])
    finally:
        if server is not None:
            server.stop()
    report(rows, baseline, idle_rss, counts, args)


def report(rows: dict, baseline: dict, idle_rss: float | None, counts: list[int], args) -> None:
    head = f"{'mode@clients':<16}{'req':>5}{'tokens':>8}{'tok/s':>9}{'TTFT p50':>10}"
    head += f"{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}{'RSS MiB':>9}{'merge ms':>10}"
    head += f"{'merge p99<=':>12}"
    print(head)
    for key, row in rows.items():
        print(
            f"{key:<16}{row['requests']:>5}{row['tokens']:>8}{row['tokens_per_s']:>9.2f}"
            f"{row['ttft_p50_s']:>10.3f}{row['ttft_p99_s']:>10.3f}{row['itl_p50_s']:>9.3f}"
            f"{row['itl_p99_s']:>9.3f}{row['peak_rss_mib'] or float('nan'):>9.0f}"
            f"{row['merge_mean_ms'] or float('nan'):>10.4f}"
            f"{row['merge_p99_bound_ms'] or float('nan'):>12.3f}"
        )
    print(f"{'transformers':<16}{'':>5}{baseline['tokens']:>8}{baseline['tokens_per_s']:>9.2f}")
    low, high = counts[0], counts[-1]
    ratios = {}
    if "explicit" in args.modes:
        ratios[f"explicit@{high} / explicit@{low}"] = (
            rows[f"explicit@{high}"]["tokens_per_s"] / rows[f"explicit@{low}"]["tokens_per_s"]
        )
        if "none" in args.modes:
            ratios[f"explicit@{high} / none@{high}"] = (
                rows[f"explicit@{high}"]["tokens_per_s"] / rows[f"none@{high}"]["tokens_per_s"]
            )
    ratios[f"none@{low} / transformers"] = (
        rows[f"none@{low}"]["tokens_per_s"] / baseline["tokens_per_s"]
    )
    if idle_rss:
        peak = max(row["peak_rss_mib"] for key, row in rows.items() if key.endswith(f"@{high}"))
        ratios[f"peak RSS @{high} / idle RSS"] = peak / idle_rss
    for name, value in ratios.items():
        print(f"{name:<32}{value:8.2f}x")
    for row in rows.values():
        row.pop("token_counts")
    record = {
        "benchmark": "load",
        "tokens": args.tokens,
        "requests_per_client": args.requests_per_client,
        "rate": args.rate or None,
        "idle_rss_mib": idle_rss and round(idle_rss, 1),
        "rows": rows,
        "transformers": baseline,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
