"""`mage tune alpha` and `mage tune beta`: pick Eq. (13)'s alpha and Eq. (12)'s beta by the
hypervolume of the Bone Soup front on validation prompts (Sec. 5.2.1)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from evaluation.metrics import default_reference_point, hypervolume
from evaluation.run import EvalConfig, generate_texts
from model_store.builder import write_manifest
from model_store.loader import LoadedStore, load_store
from model_store.manifest import MANIFEST_NAME
from training.common import encode_prompt
from training.prompts import load_prompts
from training.rewards import get_reward


def bone_soup_front(store: LoadedStore, cfg: EvalConfig, specs: list[str]) -> np.ndarray:
    """(len(preferences), n) mean rewards of Stage 1 alone over the config's prompts."""
    eos = store.eos_ids
    prompts = load_prompts(cfg.split)[: cfg.limit]
    ids = [encode_prompt(store.tokenizer, p["prompt"]) for p in prompts]
    texts = [p["prompt"] for p in prompts]
    rows = []
    for mu in cfg.preferences:
        responses = [text for text, _ in generate_texts(store, "bone-soup", mu, ids, cfg, eos)]
        rows.append([float(np.mean(get_reward(s)(texts, responses))) for s in specs])
    return np.array(rows)


def choose_by_hypervolume(fronts: dict[str, np.ndarray]) -> tuple[str, dict[str, float]]:
    """The key whose front has the largest hypervolume, under one shared reference point."""
    reference = default_reference_point(*fronts.values())
    volumes = {key: hypervolume(front, reference) for key, front in fronts.items()}
    return max(volumes, key=volumes.get), volumes


def tune_alpha(cfg: EvalConfig, alphas: list[float], write: bool = False) -> dict:
    """Evaluate the Bone Soup front for each alpha on one loaded store (no re-loading)."""
    store = load_store(cfg.store)
    specs = list(cfg.rewards or store.objectives)
    fronts = {}
    for alpha in alphas:
        manifest = store.checked.manifest.model_copy(update={"alpha": alpha})
        variant = dataclasses.replace(
            store, checked=dataclasses.replace(store.checked, manifest=manifest)
        )
        fronts[str(alpha)] = bone_soup_front(variant, cfg, specs)
    best, volumes = choose_by_hypervolume(fronts)
    if write:
        path = Path(cfg.store) / MANIFEST_NAME
        data = json.loads(path.read_text())
        data["alpha"] = float(best)
        write_manifest(Path(cfg.store), data)
    return {
        "chosen_alpha": float(best),
        "hypervolume": volumes,
        "fronts": {k: v.tolist() for k, v in fronts.items()},
    }


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

    fronts = {}
    for beta in betas:
        store_dir = work / f"beta-{beta}"
        train_backbone_store(
            base, rewards, beta, store_dir, work=work / f"beta-{beta}-work", **train_settings
        )
        run = dataclasses.replace(cfg, store=store_dir)
        fronts[str(beta)] = bone_soup_front(load_store(store_dir), run, list(rewards))
    best, volumes = choose_by_hypervolume(fronts)
    return {
        "chosen_beta": float(best),
        "hypervolume": volumes,
        "fronts": {k: v.tolist() for k, v in fronts.items()},
    }
