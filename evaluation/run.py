"""`mage eval`: generate for test prompts under preference sweeps, score, summarise.

Generations run in-process through the serving engine (same code path as the server), one
cached JSON line per (method, preference, prompt), so an interrupted run resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evaluation.metrics import default_reference_point, summarise_front
from guidance.engine import Engine
from guidance.requests import ErrorEvent, GenerationRequest, SamplingParams
from model_store.loader import LoadedStore, load_store
from training.common import encode_prompt
from training.prompts import load_prompts
from training.rewards import get_reward

# method -> (merge method for the policy, guidance mode); Table 2's names.
METHODS: dict[str, tuple[str, str]] = {
    "bone-soup": ("bone-soup", "none"),
    "direct": ("direct", "none"),
    "mage-e": ("bone-soup", "explicit-ensemble"),
    "mage-e-m": ("bone-soup", "explicit"),
    "mage-i": ("bone-soup", "implicit-ensemble"),
    "mage-i-m": ("bone-soup", "implicit"),
}


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run."""

    store: Path
    """Store to evaluate."""
    out: Path
    """Output folder (generations cache, results.json, table.md)."""
    methods: tuple[str, ...]
    """Keys of METHODS."""
    preferences: tuple[tuple[float, ...], ...]
    """The preference sweep."""
    split: str = "test"
    """Prompt split."""
    limit: int | None = None
    """First N prompts only."""
    gamma: float = 1.0
    """Guidance scale."""
    max_new_tokens: int = 48
    """Tokens per response (greedy)."""
    rewards: tuple[str, ...] | None = None
    """Reward spec per objective (training.rewards); default: the objective names."""


def preference_sweep(n_objectives: int, steps: int = 10) -> tuple[tuple[float, ...], ...]:
    """(0, .1, ..., 1) pairs for two objectives; the simplex grid of step 1/steps otherwise."""
    if n_objectives == 2:
        return tuple((round(1 - i / steps, 6), round(i / steps, 6)) for i in range(steps + 1))
    grid = []

    def fill(prefix: list[int], left: int, slots: int) -> None:
        if slots == 1:
            grid.append(tuple(round(v / steps, 6) for v in [*prefix, left]))
            return
        for v in range(left, -1, -1):
            fill([*prefix, v], left - v, slots - 1)

    fill([], steps, n_objectives)
    return tuple(grid)


def _generate(engine: Engine, ids: list[int], mu, method: str, cfg: EvalConfig) -> str:
    merge, mode = METHODS[method]
    request = GenerationRequest(
        f"eval-{method}",
        tuple(ids),
        torch.tensor(mu, dtype=torch.float64),
        mode,
        cfg.gamma,
        SamplingParams(),
        cfg.max_new_tokens,
        merge_method=merge,
    )
    events = engine.run_to_completion(request)
    if isinstance(events[-1], ErrorEvent):
        raise RuntimeError(events[-1].message)
    return events[-1].generated_text or ""


def _prompt_ids(store: LoadedStore, prompt: str) -> list[int]:
    return encode_prompt(store.tokenizer, prompt)  # exactly as the server encodes a chat


def run_eval(cfg: EvalConfig, progress=print) -> dict:
    store = load_store(cfg.store)
    engine = Engine(store)
    prompts = load_prompts(cfg.split)[: cfg.limit]
    cfg.out.mkdir(parents=True, exist_ok=True)
    cache_path = cfg.out / "generations.jsonl"
    done = {}
    if cache_path.is_file():
        for line in cache_path.read_text().splitlines():
            row = json.loads(line)
            done[(row["method"], tuple(row["preference"]), row["id"])] = row
    started = time.monotonic()
    with cache_path.open("a") as cache:
        for method in cfg.methods:
            for mu in cfg.preferences:
                todo = [p for p in prompts if (method, tuple(mu), p["id"]) not in done]
                t0 = time.monotonic()
                for p in todo:
                    text = _generate(engine, _prompt_ids(store, p["prompt"]), mu, method, cfg)
                    row = {
                        "method": method,
                        "preference": list(mu),
                        "id": p["id"],
                        "prompt": p["prompt"],
                        "response": text,
                    }
                    cache.write(json.dumps(row) + "\n")
                    cache.flush()
                    done[(method, tuple(mu), p["id"])] = row
                if todo:
                    progress(
                        f"{method} mu={mu}: {len(todo)} prompts in {time.monotonic() - t0:.0f}s"
                    )
    specs = list(cfg.rewards or store.objectives)
    if len(specs) != store.n_objectives:
        raise ValueError(f"--rewards: {len(specs)} given for {store.n_objectives} objectives")
    results = score(cfg, store.objectives, specs, prompts, done)
    results["seconds_generating"] = round(time.monotonic() - started)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (cfg.out / "table.md").write_text(markdown_table(results))
    return results


def score(
    cfg: EvalConfig, objectives: list[str], specs: list[str], prompts: list[dict], done: dict
) -> dict:
    """Mean reward per objective for each (method, preference), and front metrics."""
    means: dict[str, list[list[float]]] = {}
    for method in cfg.methods:
        rows = []
        for mu in cfg.preferences:
            chosen = [done[(method, tuple(mu), p["id"])] for p in prompts]
            prompts_ = [r["prompt"] for r in chosen]
            responses = [r["response"] for r in chosen]
            rows.append([float(np.mean(get_reward(s)(prompts_, responses))) for s in specs])
        means[method] = rows
    reference = default_reference_point(*[np.array(v) for v in means.values()])
    prefs = np.array(cfg.preferences)
    summary = {m: summarise_front(np.array(v), prefs, reference) for m, v in means.items()}
    return {
        "objectives": objectives,
        "preferences": [list(p) for p in cfg.preferences],
        "prompts": len(prompts),
        "split": cfg.split,
        "gamma": cfg.gamma,
        "max_new_tokens": cfg.max_new_tokens,
        "reference_point": reference.tolist(),
        "mean_rewards": means,
        "metrics": summary,
    }


def markdown_table(results: dict) -> str:
    objectives = results["objectives"]
    head = "| method | preference | " + " | ".join(f"mean {o}" for o in objectives) + " |"
    lines = [head, "|" + "---|" * (2 + len(objectives))]
    for method, rows in results["mean_rewards"].items():
        for mu, row in zip(results["preferences"], rows, strict=True):
            values = " | ".join(f"{v:.3f}" for v in row)
            lines.append(f"| {method} | {tuple(mu)} | {values} |")
    lines += [
        "",
        "| method | HV | inner product | sparsity | spacing | front | ctrl |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, m in results["metrics"].items():
        lines.append(
            f"| {method} | {m['hv']:.4f} | {m['inner_product']:.4f} | "
            f"{m['sparsity']:.4f} | {m['spacing']:.4f} | {m['front_length']} | "
            f"{m['controllability']:.3f} |"
        )
    return "\n".join(lines) + "\n"
