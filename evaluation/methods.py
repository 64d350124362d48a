"""The compared methods (Table 2-4 names) and how each one generates a batch of prompts.

Every method decodes greedily with the same settings through the serving code's plans
(guidance.plan) and the batched decoder (guidance.batch); only `beam` searches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from guidance.plan import build_plan
from guidance.search import PAPER_BEAMS, BeamSettings, beam_lookahead, greedy_generate
from model_store.loader import LoadedStore
from objectives.ric import preference_prompt
from training.common import encode_prompt


@dataclass(frozen=True)
class EvalMethod:
    """How one compared method decodes."""

    merge: str
    """Merge method of the policy (merging.registry)."""
    mode: str
    """Guidance mode (Eq. 25), 'none' for Stage 1 alone."""
    reference: str
    """Where the method is defined."""
    policy: str = "merged"
    """'merged' (one merged LoRA policy), 'logit-ensemble' (MOD) or 'base' (the SFT model,
    Observation 3's fixed LM)."""
    pistar_merge: str | None = None
    """Merge of the implicit pi* when it differs from the policy's (MAGE-I-M')."""
    beam: bool = False
    """Guided beam lookahead (Sec. 5.6.2) instead of greedy decoding."""
    beam_settings: BeamSettings | None = None
    """The beam's fixed b, c, l (the paper's named configurations); None: the run's flags."""
    implicit_mix: str = "lambda"
    """Weights of the MAGE-I ensemble's implicit values: lambda = B^-1 mu (Eq. 11-12), or
    mu (the earlier weighting, kept as the `mage-i-mu` ablation)."""
    alpha: float | None = None
    """Eq. (13)'s alpha for this method instead of the store's (Bone Soup at alpha = 0)."""
    oracle: str | None = None
    """'best-of-k' or 'controlled': guided by the true rewards instead of a value model
    (evaluation.oracle); decoded by evaluation.run, which has the rewards."""


METHODS: dict[str, EvalMethod] = {
    "rewarded-soup": EvalMethod("rewarded-soup", "none", "Rame et al. 2023: specialists, B = I"),
    "rewarded-soup-a": EvalMethod(
        "rewarded-soup-alpha", "none", "ablation: Rewarded Soup extrapolated by the store's alpha"
    ),
    "bone-soup": EvalMethod("bone-soup", "none", "Stage 1: lambda = B^-1 mu, Eq. (13)"),
    "bone-soup-a0": EvalMethod(
        "bone-soup", "none", "ablation: Bone Soup without extrapolation (alpha = 0)", alpha=0.0
    ),
    "direct": EvalMethod("direct", "none", "Sec. 5.6.3 'aba': backbones with lambda = mu"),
    "mod": EvalMethod(
        "rewarded-soup", "none", "Shi et al. 2024: sum_i mu_i log pi_i", policy="logit-ensemble"
    ),
    "mage-e": EvalMethod("bone-soup", "explicit-ensemble", "MAGE-E: sum_i mu_i V_i"),
    "mage-e-m": EvalMethod("bone-soup", "explicit", "MAGE-E-M: merged value model, Eq. (24)"),
    "mage-i": EvalMethod(
        "bone-soup", "implicit-ensemble", "MAGE-I: sum_i lambda_i log pi*_i/pi_ref, Eq. 11-12"
    ),
    "mage-i-mu": EvalMethod(
        "bone-soup",
        "implicit-ensemble",
        "ablation: MAGE-I weighted by mu, i.e. (B mu)^T r instead of mu^T r",
        implicit_mix="mu",
    ),
    "mage-i-m": EvalMethod("bone-soup", "implicit", "MAGE-I-M: pi* = Bone Soup merge"),
    "mage-i-m-naive": EvalMethod(
        "bone-soup",
        "implicit",
        "Table 3 MAGE-I-M': pi* merged with lambda = mu",
        pistar_merge="direct",
    ),
    "lmc-explicit": EvalMethod(
        "direct", "explicit", "Observation 3: SFT policy guided by merged V", policy="base"
    ),
    "lmc-implicit": EvalMethod(
        "direct",
        "implicit",
        "Observation 3: SFT policy guided by pi* merged with lambda = mu",
        policy="base",
        pistar_merge="direct",
    ),
    "beam": EvalMethod(
        "bone-soup", "implicit", "Sec. 5.6.2: MAGE-I-M with beam lookahead", beam=True
    ),
    "ric": EvalMethod(
        "ric", "none", "Yang et al. 2024: one adapter, mu as RiC's desired rewards in the prompt"
    ),
    "morlhf": EvalMethod("morlhf", "none", "Wu et al. 2023: the GRPO adapter trained on mu^T r~"),
    "modpo": EvalMethod("modpo", "none", "Zhou et al. 2024: the MODPO adapter trained for mu"),
    "oracle-bok": EvalMethod(
        "bone-soup",
        "none",
        "oracle: best of K Bone Soup answers by true mu^T r~",
        oracle="best-of-k",
    ),
    "oracle-cd": EvalMethod(
        "bone-soup",
        "none",
        "oracle: controlled decoding of Bone Soup, top-k tokens scored by true mu^T r~",
        oracle="controlled",
    ),
    **{
        f"beam-{name}": EvalMethod(
            "bone-soup", "implicit", f"Table 4: MAGE-I-M-{name}", beam=True, beam_settings=s
        )
        for name, s in PAPER_BEAMS.items()
    },
}


def needs_preference_adapters(methods) -> bool:
    """Whether a method answers with an adapter trained per preference (MORLHF, MODPO), which
    the store then loads (the server never does)."""
    return any(METHODS[m].merge in ("morlhf", "modpo") for m in methods if m in METHODS)


def method_prompt_ids(
    store: LoadedStore, method: str, mu, text: str, plain: list[int] | None = None
) -> list[int]:
    """The prompt ids `method` answers at `mu`: RiC's carry the desired rewards RiC maps mu to
    (objectives/ric.py, as the server writes them for merge_method "ric"); every other method
    gets the plain prompt (`plain` when already encoded)."""
    if METHODS[method].merge != "ric":
        return plain if plain is not None else encode_prompt(store.tokenizer, text)
    spec = store.checked.manifest.baselines.ric
    if spec is None:
        raise ValueError("method ric: this store has no RiC adapter (`mage train ric`)")
    tagged = preference_prompt(text, list(mu), spec.reward_low, spec.reward_high)
    return encode_prompt(store.tokenizer, tagged)


def with_alpha(store: LoadedStore, alpha: float) -> LoadedStore:
    """The same loaded store (nothing copied) with another alpha of Eq. (13)."""
    manifest = store.checked.manifest.model_copy(update={"alpha": alpha})
    return dataclasses.replace(store, checked=dataclasses.replace(store.checked, manifest=manifest))


def method_store(store: LoadedStore, method: str) -> LoadedStore:
    """The store as `method` decodes it: its own alpha where it fixes one."""
    alpha = METHODS[method].alpha
    return store if alpha is None else with_alpha(store, alpha)


def generate_batch(
    store: LoadedStore,
    method: str,
    mu: tuple[float, ...],
    prompts: list[list[int]],
    max_new_tokens: int,
    gamma: float,
    eos_ids: set[int],
    beam: BeamSettings,
) -> list[list[int]]:
    """Generated token ids for each prompt under `method` at preference `mu`."""
    spec = METHODS[method]
    if spec.oracle:
        raise ValueError(f"{method} needs the true rewards: evaluation.oracle decodes it")
    plan = build_plan(
        store,
        spec.mode,
        torch.tensor(mu, dtype=torch.float64),
        spec.merge,
        policy=spec.policy,
        pistar_merge=spec.pistar_merge,
        implicit_mix=spec.implicit_mix,
    )
    if not spec.beam:
        return greedy_generate(store, plan, prompts, max_new_tokens, gamma)
    settings = spec.beam_settings or beam
    found = beam_lookahead(store, plan, prompts, max_new_tokens, gamma, eos_ids, settings)
    return [tokens for tokens, _ in found]


def decode(store: LoadedStore, ids: list[int]) -> str:
    """Response text as the server's generated_text (special tokens such as EOS dropped)."""
    return store.tokenizer.decode(ids, skip_special_tokens=True)


def generate_responses(
    store: LoadedStore,
    method: str,
    mu: tuple[float, ...],
    prompts: list[list[int]],
    batch_size: int,
    **decoding: Any,
) -> list[tuple[str, int]]:
    """(response, generated tokens) per prompt under `method`, `batch_size` prompts per
    forward, on the store as the method decodes it (its own alpha where it fixes one);
    `decoding` is generate_batch's max_new_tokens, gamma, eos_ids and beam."""
    decoding_store = method_store(store, method)
    out: list[tuple[str, int]] = []
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        for tokens in generate_batch(decoding_store, method, tuple(mu), chunk, **decoding):
            out.append((decode(store, tokens), len(tokens)))
    return out
