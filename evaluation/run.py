"""`mage eval`: generate for test prompts under preference sweeps, score, summarise.

Generations run in-process through the serving code's plans, many prompts per forward
(guidance.batch), one cached JSON line per (method, preference, prompt) so an interrupted
run resumes. Each line keeps its share of the batch's seconds and its token count, so the
runtime per generated token of each method (Figure 11) survives resumes too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from evaluation.methods import METHODS, decode, generate_batch
from evaluation.metrics import chord_gaps, default_reference_point, summarise_front
from evaluation.plot import plot_fronts
from evaluation.resources import PeakMemory
from guidance.search import BeamSettings
from model_store.loader import LoadedStore, load_store
from training.common import encode_prompt
from training.prompts import load_prompts
from training.rewards import get_reward

__all__ = ["METHODS", "EvalConfig", "preference_sweep", "run_eval"]


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run."""

    store: Path
    """Store to evaluate."""
    out: Path
    """Output folder (generations cache, results.json, table.md, fronts.png)."""
    methods: tuple[str, ...]
    """Keys of evaluation.methods.METHODS."""
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
    batch_size: int = 16
    """Prompts per forward pass."""
    beam: BeamSettings = field(default_factory=BeamSettings)
    """b, c, l of the `beam` method."""


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


def generate_texts(
    store: LoadedStore, method: str, mu, ids: list[list[int]], cfg: EvalConfig, eos: set[int]
) -> list[tuple[str, int]]:
    """(response, generated tokens) per prompt, in batches of cfg.batch_size."""
    out: list[tuple[str, int]] = []
    for first in range(0, len(ids), cfg.batch_size):
        chunk = ids[first : first + cfg.batch_size]
        for tokens in generate_batch(
            store, method, tuple(mu), chunk, cfg.max_new_tokens, cfg.gamma, eos, cfg.beam
        ):
            out.append((decode(store, tokens), len(tokens)))
    return out


def _read_cache(path: Path) -> dict:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done[(row["method"], tuple(row["preference"]), row["id"])] = row
    return done


def _generate_all(cfg, store, prompts, done, cache, progress) -> dict[str, dict]:
    """Fill the cache; returns the peak memory of each method that generated anything."""
    eos = store.eos_ids
    ids = {p["id"]: encode_prompt(store.tokenizer, p["prompt"]) for p in prompts}
    total = sum(
        (m, tuple(mu), p["id"]) not in done
        for m in cfg.methods
        for mu in cfg.preferences
        for p in prompts
    )
    memory: dict[str, dict] = {}
    bar = tqdm(total=total, desc="generating", unit="resp", disable=total == 0)
    for method in cfg.methods:
        with PeakMemory(store.device) as peak:
            generated = 0
            for mu in cfg.preferences:
                todo = [p for p in prompts if (method, tuple(mu), p["id"]) not in done]
                for first in range(0, len(todo), cfg.batch_size):
                    chunk = todo[first : first + cfg.batch_size]
                    t0 = time.perf_counter()
                    texts = generate_texts(
                        store, method, mu, [ids[p["id"]] for p in chunk], cfg, eos
                    )
                    share = (time.perf_counter() - t0) / len(chunk)
                    for p, (text, tokens) in zip(chunk, texts, strict=True):
                        row = {
                            "method": method,
                            "preference": list(mu),
                            "id": p["id"],
                            "prompt": p["prompt"],
                            "response": text,
                            "tokens": tokens,
                            "seconds": round(share, 4),
                        }
                        cache.write(json.dumps(row) + "\n")
                        done[(method, tuple(mu), p["id"])] = row
                    cache.flush()
                    generated += len(chunk)
                    bar.update(len(chunk))
        if generated:
            memory[method] = {"peak_mib": peak.mib, "measure": peak.kind}
            progress(f"{method}: {generated} responses, peak {peak.mib} MiB ({peak.kind})")
    bar.close()
    return memory


def run_eval(cfg: EvalConfig, progress=print) -> dict:
    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    store = load_store(cfg.store)
    specs = list(cfg.rewards or store.objectives)
    if len(specs) != store.n_objectives:
        raise ValueError(f"--rewards: {len(specs)} given for {store.n_objectives} objectives")
    prompts = load_prompts(cfg.split)[: cfg.limit]
    cfg.out.mkdir(parents=True, exist_ok=True)
    cache_path, memory_path = cfg.out / "generations.jsonl", cfg.out / "memory.json"
    done = _read_cache(cache_path)
    memory = json.loads(memory_path.read_text()) if memory_path.is_file() else {}
    started = time.monotonic()
    with cache_path.open("a") as cache:
        memory.update(_generate_all(cfg, store, prompts, done, cache, progress))
    memory_path.write_text(json.dumps(memory, indent=2) + "\n")
    results = score(cfg, store.objectives, specs, prompts, done)
    for method in cfg.methods:
        results["metrics"][method]["peak_mib"] = memory.get(method, {}).get("peak_mib")
    results["device"] = str(store.device)
    results["seconds_generating"] = round(time.monotonic() - started)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (cfg.out / "table.md").write_text(markdown_table(results))
    plot_fronts(results, cfg.out / "fronts.png")
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
    for method in cfg.methods:
        if method.startswith("lmc-") and len(objectives) == 2 and len(prefs) > 2:
            summary[method]["lmc"] = chord_gaps(np.array(means[method]), prefs)
    for method in cfg.methods:  # Figure 11: seconds per generated token, batched as run
        rows = [done[(method, tuple(mu), p["id"])] for mu in cfg.preferences for p in prompts]
        tokens = sum(r.get("tokens", 0) for r in rows)
        seconds = sum(r.get("seconds", 0.0) for r in rows)
        summary[method]["ms_per_token"] = round(1000 * seconds / tokens, 3) if tokens else None
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
        "| method | HV | inner product | sparsity | spacing | front | ctrl | ms/token | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def opt(value, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    for method, m in results["metrics"].items():
        lines.append(
            f"| {method} | {m['hv']:.4f} | {m['inner_product']:.4f} | "
            f"{m['sparsity']:.4f} | {m['spacing']:.4f} | {m['front_length']} | "
            f"{m['controllability']:.3f} | {opt(m.get('ms_per_token'), '.1f')} | "
            f"{opt(m.get('peak_mib'), '.0f')} |"
        )
    lmc = {method: m["lmc"] for method, m in results["metrics"].items() if "lmc" in m}
    if lmc:
        names = results["objectives"]
        lines += [
            "",
            "| LMC (Observation 3) | "
            + " | ".join(f"{o}: share above chord, mean gap" for o in names)
            + " |",
            "|---|---|---|",
        ]
        for method, gap in lmc.items():
            cells = " | ".join(
                f"{gap['share_above'][k]:.2f}, {gap['mean_gap'][k]:+.4f}" for k in range(2)
            )
            lines.append(f"| {method} | {cells} |")
    return "\n".join(lines) + "\n"
