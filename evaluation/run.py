"""`mage eval`: generate for test prompts under preference sweeps, score, summarise.

Generations run in-process through the serving code's plans, many prompts per forward
(guidance.batch), one cached JSON line per (method, gamma, preference, prompt) so an
interrupted run resumes. Each line keeps its share of the batch's seconds and its token
count, so the runtime per generated token of each method (Figure 11) survives resumes too.

Each guided method runs at its store's tuned gamma (`defaults.gamma_by_mode`, written by
`mage tune gamma`) and, for reference, at gamma = 1 (label `<method>@g1`). Rewards are
reported on the store's fixed scale r~ (objectives/scale.py) with raw means beside them; every
per-prompt reward is kept in results.json, and HV and controllability carry paired bootstrap
intervals over prompts (evaluation/stats.py) against a fixed reference point.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from evaluation.costs import method_training_cost
from evaluation.methods import (
    METHODS,
    generate_responses,
    method_prompt_ids,
    needs_preference_adapters,
)
from evaluation.metrics import chord_gaps, summarise_front
from evaluation.oracle import OracleSettings, TrueReward, oracle_responses
from evaluation.plot import plot_fronts
from evaluation.report import markdown_table
from evaluation.resources import PeakMemory
from evaluation.stats import (
    bootstrap,
    chord_gap_intervals,
    default_pairs,
    differences,
    method_intervals,
)
from guidance.search import BeamSettings
from model_store.loader import LoadedStore, load_store
from objectives.preferences import preference_sweep
from objectives.prompts import load_prompts
from objectives.rewards import get_reward
from objectives.scale import RewardScale
from training.common import encode_prompt

__all__ = ["METHODS", "EvalConfig", "preference_sweep", "run_eval"]


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """One evaluation run, built by keyword only: a dozen fields in a row are easy to shift."""

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
    gamma: float | None = None
    """Guidance scale for every method; None: each method at its store's tuned gamma."""
    max_new_tokens: int = 48
    """Tokens per response (greedy)."""
    rewards: tuple[str, ...] | None = None
    """Reward spec per objective (objectives.rewards); default: the objective names."""
    batch_size: int = 16
    """Prompts per forward pass."""
    beam: BeamSettings = field(default_factory=BeamSettings)
    """b, c, l of the `beam` method (the `beam-bXcYlZ` methods have their own)."""
    gamma_one: bool = True
    """With tuned gammas, also run every guided method whose tuned gamma is not 1 at
    gamma = 1 (label `<method>@g1`)."""
    hv_reference: tuple[float, ...] | None = None
    """HV reference point on the reported scale; None: the store's
    reward_scale.hv_reference (a store without one needs it given)."""
    replicates: int = 2000
    """Paired bootstrap replicates over prompts."""
    oracle: OracleSettings = field(default_factory=OracleSettings)
    """K, k, L and interval of the oracle-bok and oracle-cd methods (evaluation.oracle)."""


def method_gamma(store: LoadedStore, method: str, fixed: float | None = None) -> float:
    """The gamma a method runs at: `fixed` if given, else its mode's tuned gamma."""
    if fixed is not None:
        return fixed
    return store.checked.manifest.defaults.gamma_for(METHODS[method].mode)


def variants(store: LoadedStore, cfg: EvalConfig) -> dict[str, tuple[str, float]]:
    """label -> (method, gamma): each method at its gamma, plus `<method>@g1` where a tuned
    gamma differs from 1 (Stage 1 methods take no guidance: one label, gamma unused)."""
    out: dict[str, tuple[str, float]] = {}
    for method in cfg.methods:
        guided = METHODS[method].mode != "none"
        gamma = method_gamma(store, method, cfg.gamma) if guided else 1.0
        out[method] = (method, gamma)
        if guided and cfg.gamma is None and cfg.gamma_one and gamma != 1.0:
            out[f"{method}@g1"] = (method, 1.0)
    return out


def generate_texts(
    store: LoadedStore,
    method: str,
    mu,
    ids: list[list[int]],
    cfg: EvalConfig,
    eos: set[int],
    gamma: float | None = None,
) -> list[tuple[str, int]]:
    """(response, generated tokens) per prompt, in batches of cfg.batch_size; `gamma`
    defaults to the method's gamma under cfg."""
    gamma = method_gamma(store, method, cfg.gamma) if gamma is None else gamma
    return generate_responses(
        store,
        method,
        tuple(mu),
        ids,
        cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        gamma=gamma,
        eos_ids=eos,
        beam=cfg.beam,
    )


def _key(method: str, gamma: float, mu, prompt_id: str) -> tuple:
    return (method, round(float(gamma), 6), tuple(mu), prompt_id)


def _read_cache(path: Path) -> dict:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done[_key(row["method"], row.get("gamma", 1.0), row["preference"], row["id"])] = row
    return done


def _generate_all(cfg, store, runs, prompts, done, cache, progress) -> dict[str, dict]:
    """Fill the cache; returns the peak memory of each label that generated anything."""
    ids = {p["id"]: encode_prompt(store.tokenizer, p["prompt"]) for p in prompts}
    total = sum(
        _key(m, g, mu, p["id"]) not in done
        for m, g in runs.values()
        for mu in cfg.preferences
        for p in prompts
    )
    memory: dict[str, dict] = {}
    bar = tqdm(total=total, desc="generating", unit="resp", disable=total == 0)
    for label, (method, gamma) in runs.items():
        with PeakMemory(store.device) as peak:
            generated = 0
            for mu in cfg.preferences:
                todo = [p for p in prompts if _key(method, gamma, mu, p["id"]) not in done]
                for first in range(0, len(todo), cfg.batch_size):
                    chunk = todo[first : first + cfg.batch_size]
                    t0 = time.perf_counter()
                    texts, extras = _generate_chunk(cfg, store, method, mu, chunk, ids, gamma)
                    share = (time.perf_counter() - t0) / len(chunk)
                    for p, (text, tokens), extra in zip(chunk, texts, extras, strict=True):
                        row = {
                            "method": method,
                            "gamma": gamma,
                            "preference": list(mu),
                            "id": p["id"],
                            "prompt": p["prompt"],
                            "response": text,
                            "tokens": tokens,
                            "seconds": round(share, 4),
                            **extra,
                        }
                        cache.write(json.dumps(row) + "\n")
                        done[_key(method, gamma, mu, p["id"])] = row
                    cache.flush()
                    generated += len(chunk)
                    bar.update(len(chunk))
        if generated:
            memory[label] = {"peak_mib": peak.mib, "measure": peak.kind}
            progress(f"{label}: {generated} responses, peak {peak.mib} MiB ({peak.kind})")
    bar.close()
    return memory


def _generate_chunk(cfg, store, method, mu, chunk, ids, gamma) -> tuple[list, list[dict]]:
    """(response, tokens) per prompt of the chunk, and each one's extra cache fields (an
    oracle's score, cost and candidates)."""
    prompt_ids = [method_prompt_ids(store, method, mu, p["prompt"], ids[p["id"]]) for p in chunk]
    if not METHODS[method].oracle:
        found = generate_texts(store, method, mu, prompt_ids, cfg, store.eos_ids, gamma)
        return found, [{} for _ in chunk]
    scale = RewardScale.from_manifest(store.checked.manifest)
    reward = TrueReward(
        tuple(cfg.rewards or store.objectives), scale or RewardScale.identity(store.n_objectives)
    )
    texts = [p["prompt"] for p in chunk]
    answers = oracle_responses(
        store, method, mu, prompt_ids, texts, reward, cfg.oracle, cfg.max_new_tokens
    )
    return [(a.text, len(a.tokens)) for a in answers], [a.record() for a in answers]


def reference_point(store: LoadedStore, cfg: EvalConfig) -> tuple[np.ndarray, str]:
    """The fixed HV reference: given, or the store's; never derived from the fronts."""
    if cfg.hv_reference is not None:
        if len(cfg.hv_reference) != store.n_objectives:
            raise ValueError(f"--hv-reference needs {store.n_objectives} values")
        return np.array(cfg.hv_reference, dtype=np.float64), "given (--hv-reference)"
    spec = store.checked.manifest.reward_scale
    if spec is None:
        raise ValueError(
            "this store has no reward_scale (and so no fixed HV reference point); "
            "pass --hv-reference with one value per objective"
        )
    return np.array(spec.hv_reference, dtype=np.float64), "the store's reward_scale.hv_reference"


def run_eval(cfg: EvalConfig, progress=print) -> dict:
    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    store = load_store(cfg.store, preference_adapters=needs_preference_adapters(cfg.methods))
    specs = list(cfg.rewards or store.objectives)
    if len(specs) != store.n_objectives:
        raise ValueError(f"--rewards: {len(specs)} given for {store.n_objectives} objectives")
    reference, source = reference_point(store, cfg)
    prompts = load_prompts(cfg.split)[: cfg.limit]
    runs = variants(store, cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    cache_path, memory_path = cfg.out / "generations.jsonl", cfg.out / "memory.json"
    done = _read_cache(cache_path)
    memory = json.loads(memory_path.read_text()) if memory_path.is_file() else {}
    started = time.monotonic()
    with cache_path.open("a") as cache:
        memory.update(_generate_all(cfg, store, runs, prompts, done, cache, progress))
    memory_path.write_text(json.dumps(memory, indent=2) + "\n")
    seconds = round(time.monotonic() - started)
    scale = RewardScale.from_manifest(store.checked.manifest)
    results = score(cfg, store.objectives, specs, prompts, done, runs, scale, reference)
    results["reference_source"] = source
    checked = store.checked
    for label, (method, _) in runs.items():
        results["metrics"][label]["peak_mib"] = memory.get(label, {}).get("peak_mib")
        results["metrics"][label] |= method_training_cost(checked.root, checked.manifest, method)
    results["device"] = str(store.device)
    results["seconds_generating"] = seconds
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (cfg.out / "table.md").write_text(markdown_table(results))
    plot_fronts(results, cfg.out / "fronts.png")
    return results


def per_prompt_rewards(specs, prompts, done, method, gamma, preferences) -> np.ndarray:
    """Raw rewards (preferences N, prompts P, objectives n) of one (method, gamma)."""
    rows = []
    for mu in preferences:
        chosen = [done[_key(method, gamma, mu, p["id"])] for p in prompts]
        texts, responses = [r["prompt"] for r in chosen], [r["response"] for r in chosen]
        rows.append(np.array([get_reward(s)(texts, responses) for s in specs]).T)
    return np.stack(rows)


def score(
    cfg: EvalConfig,
    objectives: list[str],
    specs: list[str],
    prompts: list[dict],
    done: dict,
    runs: dict[str, tuple[str, float]],
    scale: RewardScale | None,
    reference: np.ndarray,
) -> dict:
    """Per-prompt rewards, mean fronts (rescaled and raw), front metrics and paired
    bootstrap intervals for each (label -> (method, gamma))."""
    scale = scale or RewardScale.identity(len(objectives))
    prefs = np.array(cfg.preferences)
    raw = {
        label: per_prompt_rewards(specs, prompts, done, m, g, cfg.preferences)
        for label, (m, g) in runs.items()
    }
    scaled = {label: scale.apply_rows(arr) for label, arr in raw.items()}
    means = {label: arr.mean(axis=1) for label, arr in scaled.items()}
    summary = {label: summarise_front(front, prefs, reference) for label, front in means.items()}
    for label, (method, _) in runs.items():
        if method.startswith("lmc-") and len(objectives) == 2 and len(prefs) > 2:
            summary[label]["lmc"] = chord_gaps(means[label], prefs) | {
                "mean_gap_ci": chord_gap_intervals(scaled[label], prefs, cfg.replicates)
            }
    for label, (method, gamma) in runs.items():  # Figure 11: seconds per generated token
        rows = [done[_key(method, gamma, mu, p["id"])] for mu in cfg.preferences for p in prompts]
        tokens = sum(r.get("tokens", 0) for r in rows)
        seconds = sum(r.get("seconds", 0.0) for r in rows)
        summary[label]["ms_per_token"] = round(1000 * seconds / tokens, 3) if tokens else None
        summary[label]["tokens"] = tokens
        if tokens and all("forwards" in r for r in rows):  # the oracles count their cost
            for cost in ("forwards", "positions"):
                summary[label][f"{cost}_per_token"] = round(sum(r[cost] for r in rows) / tokens, 2)
        summary[label]["seconds"] = round(seconds, 1)
    # lmc-* are diagnostics: they never move the reference, and take no part in the pairs
    compared = {k: v for k, v in scaled.items() if not runs[k][0].startswith("lmc-")}
    reps = bootstrap(compared, prefs, reference, cfg.replicates)
    for label, ci in method_intervals(reps).items():
        summary[label].update({"hv_ci": ci["hv"], "controllability_ci": ci["controllability"]})
    return {
        "objectives": objectives,
        "preferences": [list(p) for p in cfg.preferences],
        "prompts": len(prompts),
        "prompt_ids": [p["id"] for p in prompts],
        "split": cfg.split,
        "max_new_tokens": cfg.max_new_tokens,
        "variants": {label: {"method": m, "gamma": g} for label, (m, g) in runs.items()},
        "reward_scale": {"center": list(scale.center), "scale": list(scale.scale)},
        "reference_point": reference.tolist(),
        "mean_rewards": {k: np.round(v, 5).tolist() for k, v in means.items()},
        "mean_raw_rewards": {k: np.round(v.mean(axis=1), 5).tolist() for k, v in raw.items()},
        "per_prompt_raw_rewards": {k: np.round(v, 5).tolist() for k, v in raw.items()},
        "metrics": summary,
        "comparisons": differences(reps, summary, default_pairs(compared)),
        "bootstrap": {"replicates": cfg.replicates, "level": 0.95, "unit": "prompts, paired"},
    }
