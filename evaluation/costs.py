"""Training cost per compared method, as the paper's Sec. 6.1 weighs it: the adapters a method
needs stored, and the CPU hours their training took (the store's training_costs.json, written
by training/costs.py). Inference cost (ms per token, peak memory) is measured by the run."""

from __future__ import annotations

from pathlib import Path

from evaluation.methods import METHODS, EvalMethod
from model_store.costs import SAMPLES, read_store_costs
from model_store.manifest import StoreManifest
from objectives.preferences import preference_label


def _names(specs) -> list[str]:
    return [Path(spec.path).name for spec in specs]


def method_parts(manifest: StoreManifest, method: EvalMethod) -> list[tuple[str, str]]:
    """(component, name) of every trained part `method` decodes with (and MODPO's sampling
    pass, which its pairs come from)."""
    baselines = manifest.baselines
    if method.merge in ("morlhf", "modpo"):
        entries = getattr(baselines, method.merge)
        data = [(method.merge, SAMPLES)] if method.merge == "modpo" else []
        return [(method.merge, preference_label(e.preference)) for e in entries] + data
    if method.merge == "ric":
        return [("ric", "ric")] if baselines.ric else []
    if method.merge.startswith("rewarded-soup") or method.policy == "logit-ensemble":
        parts = [("specialists", n) for n in _names(manifest.specialists)]
    elif method.policy == "base" and method.mode.startswith("explicit"):
        parts = []  # the SFT model itself (Observation 3's diagnostic), guided by V alone
    else:  # Bone Soup's backbones: the policy, and pi* of the implicit modes (Eq. 23)
        parts = [("backbones", n) for n in _names(manifest.backbones)]
    if method.mode.startswith("explicit"):  # the value models of Eq. (16) or the ARM kind
        parts += [("values", n) for n in _names(manifest.guidance.explicit)]
    return parts


def method_training_cost(store: Path, manifest: StoreManifest, method: str) -> dict:
    """{"adapters": parts stored, "train_cpu_s": CPU seconds of the recorded parts (None if
    none is), "unrecorded": parts whose cost the store does not know}. An oracle is charged
    its policy's parts: it trains nothing, but needs the true rewards at inference."""
    costs = read_store_costs(store)
    parts = method_parts(manifest, METHODS[method])
    known = [costs[c][n] for c, n in parts if n in costs.get(c, {})]
    return {
        "adapters": sum(name != SAMPLES for _, name in parts),
        "train_cpu_s": round(sum(c["cpu_s"] for c in known), 1) if known else None,
        "unrecorded": [f"{c}/{n}" for c, n in parts if n not in costs.get(c, {})],
    }
