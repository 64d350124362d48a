"""The room Stage 2 has on a task: the best-of-K oracle against the Stage-1 greedy answer,
re-scored under candidate reward pairs without generating again.

`mage eval --methods bone-soup,oracle-bok` keeps every oracle candidate (the greedy answer
first, then K - 1 samples of the Bone Soup policy) in its generations.jsonl. This module
scores those candidates under other rewards, picks per prompt and preference the candidate
with the highest mu^T r~ of that task, and compares the front of the picks with the front of
the greedy answers: HV (Eq. 27) with paired-bootstrap intervals over prompts
(evaluation.stats), and the mean gain in mu^T r~ per preference, in standard deviations of
the scale used. The policy stays the one the store was trained for; a store retrained on a
candidate task samples differently, so this measures how much the candidate's reward
separates a realistic policy's own answers, which is what guidance can exploit.

    python -m evaluation.room --run runs/room/current --store demo/store-relevance \\
        --task current=relevance,positivity --task novel=answer-relevance,positivity
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evaluation.metrics import hypervolume
from evaluation.stats import _draw_weights, _interval, bootstrap, differences
from objectives.rewards import get_reward
from objectives.scale import HV_REFERENCE_SD, RewardScale


def read_pool(run: Path) -> tuple[list[tuple[float, ...]], list[str], dict]:
    """(preferences, prompt ids, {(mu, id): (prompt, [candidate texts])}) of a run's
    oracle-bok lines."""
    pool: dict = {}
    for line in (run / "generations.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["method"] == "oracle-bok":
            texts = [text for text, _ in row["candidates"]]
            pool[(tuple(row["preference"]), row["id"])] = (row["prompt"], texts)
    prefs = sorted({mu for mu, _ in pool}, reverse=True)
    ids = sorted({pid for _, pid in pool})
    complete = [pid for pid in ids if all((mu, pid) in pool for mu in prefs)]
    return prefs, complete, pool


def raw_rewards(specs: Sequence[str], prefs, ids, pool) -> np.ndarray:
    """(N preferences, P prompts, K candidates, n objectives) raw rewards."""
    keys = [(mu, pid) for mu in prefs for pid in ids]
    k = len(pool[keys[0]][1])
    prompts = [pool[key][0] for key in keys for _ in range(k)]
    texts = [text for key in keys for text in pool[key][1]]
    scored = np.array([get_reward(spec)(prompts, texts) for spec in specs]).T  # (N P K, n)
    return scored.reshape(len(prefs), len(ids), k, len(specs))


def fitted_scale(raw: np.ndarray) -> RewardScale:
    """Center and spread of every candidate in the pool, per objective (a task without a
    store scale: r~ = 0 at the Stage-1 pool's mean, 1 = its standard deviation)."""
    flat = raw.reshape(-1, raw.shape[-1])
    return RewardScale(tuple(flat.mean(0).tolist()), tuple(np.maximum(flat.std(0), 1e-9).tolist()))


def room(raw: np.ndarray, prefs, scale: RewardScale, replicates: int = 2000) -> dict:
    """Greedy (candidate 0) against the best candidate by mu^T r~, on `scale`."""
    scaled = scale.apply_rows(raw)  # (N, P, K, n)
    mu = np.array(prefs)  # (N, n)
    utility = np.einsum("npkj,nj->npk", scaled, mu)
    best = utility.argmax(-1)  # (N, P); ties: the first, the greedy answer
    picked = np.take_along_axis(scaled, best[..., None, None], 2)[:, :, 0]
    greedy = scaled[:, :, 0]
    reference = np.full(scaled.shape[-1], -HV_REFERENCE_SD)
    reps = bootstrap({"bone-soup": greedy, "oracle-bok": picked}, mu, reference, replicates)
    points = {
        label: {"hv": hypervolume(arr.mean(1), reference), "controllability": 0.0}
        for label, arr in (("bone-soup", greedy), ("oracle-bok", picked))
    }
    diff = differences(reps, points, [("oracle-bok", "bone-soup")])[0]
    gain = utility.max(-1) - utility[..., 0]  # (N, P) mu^T (r~_oracle - r~_greedy)
    weights = _draw_weights(gain.shape[1], replicates, 0)
    resampled = weights @ gain.T  # (replicates, N)
    return {
        "hv_bone_soup": points["bone-soup"]["hv"],
        "hv_oracle": points["oracle-bok"]["hv"],
        "hv_pct": diff["hv_pct"],
        "hv_pct_ci": diff["hv_pct_ci"],
        "gain_sd": gain.mean(1).round(4).tolist(),
        "gain_sd_ci": [_interval(resampled[:, i]) for i in range(len(prefs))],
        "greedy_front": greedy.mean(1).round(4).tolist(),
        "oracle_front": picked.mean(1).round(4).tolist(),
        "picked_greedy_share": float((best == 0).mean()),
        "scale": {"center": list(scale.center), "scale": list(scale.scale)},
    }


def store_scale(store: Path, specs: Sequence[str]) -> RewardScale | None:
    """The store's own scale when the task's rewards are the store's objectives."""
    from model_store.manifest import MANIFEST_NAME, StoreManifest

    manifest = StoreManifest.model_validate_json((store / MANIFEST_NAME).read_text())
    if list(specs) != list(manifest.objectives):
        return None
    return RewardScale.from_manifest(manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", type=Path, required=True, help="a mage eval folder with oracle-bok"
    )
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--task", action="append", required=True, help="name=spec1,spec2")
    parser.add_argument("--replicates", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="default: RUN/room.json")
    args = parser.parse_args(argv)
    prefs, ids, pool = read_pool(args.run)
    report = {"prompts": len(ids), "preferences": [list(p) for p in prefs], "tasks": {}}
    for task in args.task:
        name, specs = task.split("=", 1)
        specs = specs.split(",")
        raw = raw_rewards(specs, prefs, ids, pool)
        scales = {"pool": fitted_scale(raw)}
        if (own := store_scale(args.store, specs)) is not None:
            scales["store"] = own
        for kind, scale in scales.items():
            found = room(raw, prefs, scale, args.replicates)
            report["tasks"][f"{name} ({kind} scale)"] = {"rewards": specs, **found}
            pct, ci = found["hv_pct"], found["hv_pct_ci"]
            gains = ", ".join(f"{g:+.2f}" for g in found["gain_sd"])
            print(
                f"{name} ({kind}): HV {found['hv_bone_soup']:.2f} -> {found['hv_oracle']:.2f}"
                f" ({pct:+.1f}% [{ci[0]:+.1f}, {ci[1]:+.1f}]); gain per mu: {gains}"
            )
    out = args.out or args.run / "room.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
