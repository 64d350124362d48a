"""A flat registry of the merging methods the server and evaluation can use.

Each method maps a preference mu (on the simplex) to the per-adapter coefficients c with
which LoRA deltas are summed exactly: Delta = sum_i c_i B_i A_i scale_i.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from merging.coefficients import bone_soup_coefficients, solve_lambda


@dataclass(frozen=True)
class MergeMethod:
    """One way of turning a preference into merge coefficients."""

    name: str
    """Registry key."""
    reference: str
    """Where the method comes from."""
    coefficients: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    """(B, mu, alpha) -> per-adapter coefficients, float64 of shape (n,)."""
    adapters: str = "backbones"
    """Which adapters the coefficients weigh: the store's `backbones`, or its Rewarded-Soup
    `specialists` (trained on e_i; the backbones themselves when B = I), or one trained
    baseline's adapter: `ric` (the RiC policy), `morlhf` / `modpo` (the adapter trained for
    exactly this preference)."""


def _direct(matrix: torch.Tensor, mu: torch.Tensor, alpha: float) -> torch.Tensor:
    return mu.double().clone()


def _rewarded_soup(matrix: torch.Tensor, mu: torch.Tensor, alpha: float) -> torch.Tensor:
    # Rewarded Soup merges the specialists with lambda = mu; it is Bone Soup with B = I.
    return solve_lambda(torch.eye(len(mu), dtype=torch.float64), mu)


def _rewarded_soup_alpha(matrix: torch.Tensor, mu: torch.Tensor, alpha: float) -> torch.Tensor:
    # Eq. (13) on Rewarded Soup: separates what the extrapolation adds from what B^-1 adds.
    return bone_soup_coefficients(torch.eye(len(mu), dtype=torch.float64), mu, alpha)


def _one_adapter(matrix: torch.Tensor, mu: torch.Tensor, alpha: float) -> torch.Tensor:
    # A single trained policy applied whole: coefficient sum_j mu_j = 1 on the simplex (written
    # as a sum so the map stays linear in mu, as every merge method is).
    return mu.double().sum().reshape(1)


MERGE_METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        MergeMethod(
            "bone-soup",
            "MAGE Sec. 3.3.5, lambda = B^-1 mu, then Eq. (13) extrapolation by alpha",
            bone_soup_coefficients,
        ),
        MergeMethod(
            "rewarded-soup",
            "Rame et al. 2023; MAGE Eq. (1) with lambda = mu over the specialists",
            _rewarded_soup,
            adapters="specialists",
        ),
        MergeMethod(
            "direct",
            "MAGE Sec. 5.6.3 'aba' ablation / Eq. (24): weights merged with lambda = mu",
            _direct,
        ),
        MergeMethod(
            "ric",
            "Yang et al. 2024 (Rewards-in-Context): one adapter, mu written into the prompt as "
            "desired rewards (objectives/ric.py); no merge",
            _one_adapter,
            adapters="ric",
        ),
    )
}


ABLATION_MERGE_METHODS: dict[str, MergeMethod] = {
    "rewarded-soup-alpha": MergeMethod(
        "rewarded-soup-alpha",
        "evaluation ablation: Rewarded Soup's lambda = mu, then Eq. (13) extrapolation by alpha",
        _rewarded_soup_alpha,
        adapters="specialists",
    ),
    **{
        name: MergeMethod(name, reference, _one_adapter, adapters=name)
        for name, reference in (
            ("morlhf", "Wu et al. 2023: the GRPO adapter trained on this mu^T r~ (an oracle)"),
            ("modpo", "Zhou et al. 2024: the MODPO adapter trained for this mu"),
        )
    },
}
"""Merges evaluation compares but the server does not offer (its schema lists
MERGE_METHODS only)."""


def get_merge_method(name: str) -> MergeMethod:
    """Look up a merging method by name, with a message listing the known ones."""
    try:
        return MERGE_METHODS.get(name) or ABLATION_MERGE_METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {sorted(MERGE_METHODS)}") from None
