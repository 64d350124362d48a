"""Soak: thousands of mixed requests against one server, watching memory and errors.

Starts `mage serve` (or targets --url) and sends --requests requests from --concurrency
clients: random preferences, every guidance mode the store offers, greedy and sampled
(random temperature / top-k / top-p / seed), streamed and not; about --cancel-share of
them are streams the client drops after 1-3 events. It samples the server's resident
memory every 100 requests and the merge cache's bytes, then prints a table and one JSON
line: RSS drift from request 200 to the last, the merge cache's peak against its budget,
and every outcome (anything but success or a client-side cancel counts as an error).

Usage: python benchmarks/soak.py [--store demo/store] [--requests 2000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.served import ROOT, ServerProcess  # noqa: E402


def prompts() -> list[str]:
    lines = (ROOT / "data/prompts/train.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines]


def random_parameters(rng: random.Random, modes: list[str], objectives: int, tokens: int) -> dict:
    parameters: dict = {
        "preference": [round(rng.random(), 4) + 1e-3 for _ in range(objectives)],
        "guidance": {"mode": rng.choice(modes), "gamma": rng.choice([0.0, 0.5, 1.0, 3.0])},
        "max_new_tokens": rng.randint(1, tokens),
    }
    if rng.random() < 0.5:  # sampled, with a random mix of warpers
        parameters["temperature"] = round(rng.uniform(0.3, 1.5), 3)
        parameters["seed"] = rng.randrange(2**63)
        if rng.random() < 0.5:
            parameters["top_k"] = rng.randint(1, 100)
        if rng.random() < 0.5:
            parameters["top_p"] = round(rng.uniform(0.5, 1.0), 3)
    return parameters


async def one(client: httpx.AsyncClient, url: str, body: dict, mode: str) -> str:
    """Send one request; its outcome: success, cancelled (by us) or the error seen."""
    if mode == "json":
        response = await client.post(f"{url}/generate", json=body)
        if response.status_code != 200:
            return f"http {response.status_code}"
        return "success"
    cut = 1 + hash(json.dumps(body)) % 3 if mode == "cancel" else None
    events = 0
    async with client.stream("POST", f"{url}/generate_stream", json=body) as response:
        if response.status_code != 200:
            return f"http {response.status_code}"
        async for line in response.aiter_lines():
            if line.startswith("event: error"):
                return "stream error"
            if line.startswith("data:"):
                json.loads(line[5:])  # strict JSON or the soak fails loudly
                events += 1
                if cut is not None and events >= cut:
                    return "cancelled"
    return "success"


async def soak(url: str, server: ServerProcess | None, args) -> dict:
    info = httpx.get(f"{url}/info").json()
    modes, objectives = info["guidance_modes"], len(info["objectives"])
    texts, rng = prompts(), random.Random(args.seed)
    outcomes: Counter[str] = Counter()
    rss: dict[int, float] = {}
    cache_peak = 0.0
    sent = 0
    lock = asyncio.Lock()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent, cache_peak
        while True:
            async with lock:
                if sent >= args.requests:
                    return
                sent += 1
                number = sent
                body = {
                    "inputs": rng.choice(texts),
                    "parameters": random_parameters(rng, modes, objectives, args.tokens),
                }
                kind = "cancel" if rng.random() < args.cancel_share else rng.choice(["json", "sse"])
            outcomes[await one(client, url, body, kind)] += 1
            if number % 100 == 0:
                if server is not None:
                    rss[number] = server.memory_mib()
                cache_peak = max(cache_peak, metric(url, "mage_merge_cache_bytes"))

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    seconds = time.perf_counter() - started
    await asyncio.sleep(1.0)  # let the engine notice the last cancels
    if server is not None:
        rss[args.requests] = server.memory_mib()
    first = min((n for n in rss if n >= 200), default=None)
    return {
        "requests": args.requests,
        "seconds": round(seconds, 1),
        "outcomes": dict(outcomes),
        "errors": sum(n for k, n in outcomes.items() if k not in ("success", "cancelled")),
        "rss_mib": {str(k): round(v, 1) for k, v in sorted(rss.items())},
        "rss_drift_200_to_end": (rss[args.requests] / rss[first] - 1) if first else None,
        "merge_cache_peak_bytes": cache_peak,
        "merge_cache_budget_bytes": info["limits"]["merge_cache_mb"] * 2**20,
        "running_after": metric(url, "mage_running_requests"),
        "health_after": httpx.get(f"{url}/health").status_code,
    }


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--store", default="demo/store")
    parser.add_argument("--url", help="target a running server instead of starting one")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8, help="max_new_tokens is 1..this")
    parser.add_argument("--cancel-share", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-arg", action="append", default=[], help="extra serve flag")
    args = parser.parse_args()
    server = None if args.url else ServerProcess(args.store, args.server_arg)
    try:
        if server is not None:
            server.wait_ready()
        result = asyncio.run(soak(args.url or server.url, server, args))
    finally:
        if server is not None:
            server.stop()
    print(f"{'requests':<28}{result['requests']}")
    print(f"{'seconds':<28}{result['seconds']}")
    for outcome, count in sorted(result["outcomes"].items()):
        print(f"{'outcome ' + outcome:<28}{count}")
    for number, mib in result["rss_mib"].items():
        print(f"{'RSS MiB after ' + number:<28}{mib}")
    drift = result["rss_drift_200_to_end"]
    print(f"{'RSS drift 200 -> end':<28}{'n/a' if drift is None else f'{100 * drift:+.2f}%'}")
    peak, budget = result["merge_cache_peak_bytes"], result["merge_cache_budget_bytes"]
    print(f"{'merge cache peak / budget':<28}{peak / 2**20:.2f} / {budget / 2**20:.0f} MiB")
    print(json.dumps({"benchmark": "soak", **result}))


if __name__ == "__main__":
    main()
