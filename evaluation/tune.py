"""`mage tune alpha|gamma|beta`: choose Eq. (13)'s alpha, Eq. (25)'s gamma per guidance mode
and Eq. (12)'s beta by the hypervolume of fronts on validation prompts (Sec. 5.2.1-5.2.2).

Every candidate's front is scored on the store's fixed reward scale against its fixed HV
reference point (reward_scale.hv_reference), so the choice does not depend on which
candidates are compared; each HV carries a paired bootstrap interval over prompts, and the
winner's margin over every other candidate its own interval (evaluation/stats.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from evaluation.methods import METHODS, with_alpha
from evaluation.metrics import default_reference_point, hypervolume
from evaluation.run import EvalConfig, generate_texts
from evaluation.stats import bootstrap, method_intervals
from model_store.builder import write_manifest
from model_store.loader import LoadedStore, load_store
from model_store.manifest import MANIFEST_NAME
from objectives.prompts import load_prompts
from objectives.rewards import get_reward
from objectives.scale import RewardScale
from training.common import encode_prompt

GAMMA_GRID = (0.1, 0.2, 1.0, 3.0, 5.0)
"""The paper's candidate gammas (Sec. 5.2.2)."""
ALPHA_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
"""The paper's {0.1, ..., 0.5} (Sec. 5.2.1), plus 0 (no extrapolation) and values beyond."""
TUNED_MODES = {"mage-e-m": "explicit", "mage-e": "explicit-ensemble"}
TUNED_MODES |= {"mage-i-m": "implicit", "mage-i": "implicit-ensemble"}
"""The method whose tuned gamma becomes its mode's default (the others of a mode are
ablations and diagnostics, which run at their mode's gamma)."""


class ResponseCache:
    """Responses already generated, one JSON line each, so an interrupted tuning run resumes
    (`--work`); without a folder it only lives in memory."""

    def __init__(self, folder: Path | None) -> None:
        self.path = None if folder is None else Path(folder) / "generations.jsonl"
        self.done: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                self.done[row["key"]] = row["response"]

    @staticmethod
    def key(store: LoadedStore, method: str, gamma: float, mu, prompt_id: str, tokens: int) -> str:
        alpha = store.checked.manifest.alpha
        return json.dumps([method, round(gamma, 6), round(alpha, 6), list(mu), prompt_id, tokens])

    def add(self, rows: dict[str, str]) -> None:
        self.done.update(rows)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                for key, response in rows.items():
                    handle.write(json.dumps({"key": key, "response": response}) + "\n")


def front_per_prompt(
    store: LoadedStore,
    method: str,
    gamma: float,
    cfg: EvalConfig,
    specs: list[str],
    cache: ResponseCache | None = None,
) -> np.ndarray:
    """(preferences N, prompts P, objectives n) rewards of `method` on the store's scale."""
    cache = cache or ResponseCache(None)
    prompts = load_prompts(cfg.split)[: cfg.limit]
    ids = [encode_prompt(store.tokenizer, p["prompt"]) for p in prompts]
    texts = [p["prompt"] for p in prompts]
    scale = RewardScale.from_manifest(store.checked.manifest) or RewardScale.identity(len(specs))
    rows = []
    for mu in cfg.preferences:
        keys = [cache.key(store, method, gamma, mu, p["id"], cfg.max_new_tokens) for p in prompts]
        todo = [i for i, key in enumerate(keys) if key not in cache.done]
        if todo:
            found = generate_texts(
                store, method, mu, [ids[i] for i in todo], cfg, store.eos_ids, gamma
            )
            cache.add({keys[i]: text for i, (text, _) in zip(todo, found, strict=True)})
        responses = [cache.done[key] for key in keys]
        raw = np.array([get_reward(s)(texts, responses) for s in specs]).T  # (P, n)
        rows.append(scale.apply_rows(raw))
    return np.stack(rows)


def bone_soup_front(store: LoadedStore, cfg: EvalConfig, specs: list[str]) -> np.ndarray:
    """(len(preferences), n) mean rewards of Stage 1 alone over the config's prompts."""
    return front_per_prompt(store, "bone-soup", 1.0, cfg, specs).mean(axis=1)


def _reference(store: LoadedStore, fronts: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    spec = store.checked.manifest.reward_scale
    if spec is not None:
        return np.array(spec.hv_reference), "the store's reward_scale.hv_reference"
    means = [arr.mean(axis=1) for arr in fronts.values()]  # legacy stores: no fixed scale
    return default_reference_point(*means), "minimum over the candidates - 0.01 (no reward_scale)"


def choose_by_hypervolume(
    fronts: dict[str, np.ndarray], preferences, reference: np.ndarray, replicates: int = 2000
) -> dict:
    """The key whose front (per-prompt rewards) has the largest HV, with intervals."""
    volumes = {k: hypervolume(v.mean(axis=1), reference) for k, v in fronts.items()}
    best = max(volumes, key=volumes.get)
    reps = bootstrap(fronts, np.array(preferences), reference, replicates)
    margins = {
        k: [float(np.percentile(reps.hv[best] - reps.hv[k], q)) for q in (2.5, 97.5)]
        for k in fronts
        if k != best
    }
    return {
        "chosen": best,
        "hypervolume": volumes,
        "hv_ci": {k: ci["hv"] for k, ci in method_intervals(reps).items()},
        "margin_ci": margins,
        "reference_point": reference.tolist(),
    }


def _write(store_dir: Path, update) -> None:
    path = Path(store_dir) / MANIFEST_NAME
    data = json.loads(path.read_text())
    update(data)
    write_manifest(Path(store_dir), data)


def tune_alpha(
    cfg: EvalConfig, alphas: list[float], write: bool = False, work: Path | None = None
) -> dict:
    """The Bone Soup front for each alpha on one loaded store (no re-loading); `work` keeps
    the responses, so a re-run resumes."""
    store = load_store(cfg.store)
    specs = list(cfg.rewards or store.objectives)
    cache = ResponseCache(work)
    fronts = {
        str(alpha): front_per_prompt(with_alpha(store, alpha), "bone-soup", 1.0, cfg, specs, cache)
        for alpha in alphas
    }
    reference, source = _reference(store, fronts)
    result = choose_by_hypervolume(fronts, cfg.preferences, reference)
    if write:
        _write(cfg.store, lambda data: data.update(alpha=float(result["chosen"])))
    return {
        "chosen_alpha": float(result["chosen"]),
        **result,
        "reference_source": source,
        "fronts": {k: np.round(v.mean(axis=1), 5).tolist() for k, v in fronts.items()},
    }


def tune_gamma(
    cfg: EvalConfig,
    methods: list[str],
    gammas: list[float],
    write: bool = False,
    work: Path | None = None,
) -> dict:
    """Per method, its front at each gamma; the chosen gamma per method, written (with
    `write`) as the store's default for the method's guidance mode (defaults.gamma_by_mode)."""
    unknown = [m for m in methods if m not in METHODS or METHODS[m].mode == "none"]
    if unknown:
        raise ValueError(f"gamma tuning needs guided methods; not guided or unknown: {unknown}")
    store = load_store(cfg.store)
    specs = list(cfg.rewards or store.objectives)
    cache = ResponseCache(work)
    out: dict = {}
    for method in methods:
        fronts = {str(g): front_per_prompt(store, method, g, cfg, specs, cache) for g in gammas}
        reference, source = _reference(store, fronts)
        result = choose_by_hypervolume(fronts, cfg.preferences, reference)
        out[method] = {
            "mode": METHODS[method].mode,
            "chosen_gamma": float(result["chosen"]),
            **result,
            "reference_source": source,
            "fronts": {k: np.round(v.mean(axis=1), 5).tolist() for k, v in fronts.items()},
        }
    if write:  # only a mode's own method sets its default; ablations are reported only
        chosen = {TUNED_MODES[m]: r["chosen_gamma"] for m, r in out.items() if m in TUNED_MODES}

        def update(data: dict) -> None:
            data["defaults"].setdefault("gamma_by_mode", {}).update(chosen)

        _write(cfg.store, update)
    return out


def tune_beta(
    cfg: EvalConfig,
    base: Path,
    rewards: list[str],
    betas: list[float],
    work: Path,
    **train_settings,
) -> dict:
    """Short backbone runs per beta (the paper uses 20% of the steps), then the front's HV."""
    from training.backbone import train_backbone_store

    fronts, first = {}, None
    for beta in betas:
        store_dir = work / f"beta-{beta}"
        train_backbone_store(
            base, rewards, beta, store_dir, work=work / f"beta-{beta}-work", **train_settings
        )
        run = dataclasses.replace(cfg, store=store_dir)
        loaded = load_store(store_dir)
        first = first or loaded
        fronts[str(beta)] = front_per_prompt(loaded, "bone-soup", 1.0, run, list(rewards))
    reference, source = _reference(first, fronts)  # one fitted scale: same base, same seed
    result = choose_by_hypervolume(fronts, cfg.preferences, reference)
    return {
        "chosen_beta": float(result["chosen"]),
        **result,
        "reference_source": source,
        "fronts": {k: np.round(v.mean(axis=1), 5).tolist() for k, v in fronts.items()},
    }
