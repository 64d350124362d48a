"""What one preference needs at decode time: which rows run, and how they combine.

The policy, the reference, the pi* models and LoRA value models all run as rows of one
batched forward of the shared base (model_store.multi_lora); standalone value models run
separately. A plan is built once per (mode, preference, merge method) and cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from guidance.value_head import ValueHead, merge_heads
from merging.registry import get_merge_method
from model_store.loader import LoadedStore

PREFERENCE_DECIMALS = 6


@dataclass(frozen=True)
class ValueSource:
    """One value model's contribution: V comes from a shared-base row or a standalone model."""

    head: ValueHead
    """Head giving one value per token."""
    row: int | None = None
    """Row of the shared forward, for LoRA value models."""
    model: PreTrainedModel | None = None
    """Standalone value model, run on its own."""


@dataclass(frozen=True)
class DecodePlan:
    """Rows and weights for one preference under one guidance mode."""

    mode: str
    """Guidance mode."""
    preference: torch.Tensor
    """mu, float64 (n,), rounded to PREFERENCE_DECIMALS."""
    lambdas: torch.Tensor
    """lambda = B^-1 mu (float64), as reported to clients."""
    coefficients: torch.Tensor
    """(rows, adapter slots) in model dtype: the merged adapters of every shared row."""
    policy_row: int
    """Row whose logits are the Bone Soup policy (Eq. 6 + Eq. 13)."""
    reference_row: int | None
    """pi_ref (base) row, for implicit modes."""
    pistar_rows: tuple[int, ...]
    """pi* rows for implicit modes: one merged row, or n ensemble rows."""
    values: tuple[ValueSource, ...]
    """Explicit value sources: one merged source, or n ensemble sources."""
    mix: torch.Tensor
    """(len(pistar_rows) or len(values),) weights of the guidance terms: [1] when merged,
    mu for the ensembles (MAGE-E / MAGE-I)."""

    def nbytes(self) -> int:
        total = self.coefficients.numel() * self.coefficients.element_size()
        for source in self.values:
            total += source.head.nbytes()
            if source.model is not None:
                total += sum(p.numel() * p.element_size() for p in source.model.parameters())
        return total


def round_preference(mu: torch.Tensor) -> torch.Tensor:
    return torch.round(mu * 10**PREFERENCE_DECIMALS) / 10**PREFERENCE_DECIMALS


def _merged_standalone(store: LoadedStore, mu: torch.Tensor) -> PreTrainedModel:
    """Eq. (24) on whole standalone value models: theta_merge = sum_i mu_i theta_i."""
    import copy

    models = store.standalone_values
    merged = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    merged.load_state_dict(
        {k: sum(float(w) * s[k] for w, s in zip(mu, states, strict=True)) for k in states[0]}
    )
    return merged.eval()


def _value_sources(store: LoadedStore, mode: str, mu: torch.Tensor, first_row: int):
    """Rows (coefficient vectors) and sources for the explicit modes."""
    n, slots = store.n_objectives, store.value_slots
    weights = (
        [mu] if mode == "explicit" else [torch.eye(n, dtype=torch.float64)[i] for i in range(n)]
    )
    rows: list[torch.Tensor] = []
    sources: list[ValueSource] = []
    for w in weights:
        head = (
            store.value_heads[int(w.argmax())]
            if mode != "explicit"
            else merge_heads(store.value_heads, w.tolist())
        )
        if store.value_kind == "lora":
            row = torch.zeros(2 * n, dtype=torch.float64)
            row[slots] = w  # Eq. (24): merged value adapter = sum_i mu_i Delta_i
            rows.append(row)
            sources.append(ValueSource(head=head, row=first_row + len(rows) - 1))
        else:
            model = (
                store.standalone_values[int(w.argmax())]
                if mode != "explicit"
                else (_merged_standalone(store, w))
            )
            sources.append(ValueSource(head=head, model=model))
    return rows, sources


def build_plan(store: LoadedStore, mode: str, mu: torch.Tensor, merge_method: str) -> DecodePlan:
    n = store.n_objectives
    slots = 2 * n if store.value_kind == "lora" else n
    matrix = store.checked.combination_matrix
    alpha = store.checked.manifest.alpha
    policy = torch.zeros(slots, dtype=torch.float64)
    method = get_merge_method(merge_method)
    policy[:n] = method.coefficients(matrix, mu, alpha)
    rows = [policy]
    reference_row, pistar_rows, values = None, (), ()
    mix = torch.ones(1, dtype=torch.float64)
    if mode.startswith("implicit"):
        rows.append(torch.zeros(slots, dtype=torch.float64))  # pi_ref: the bare base
        reference_row = 1
        if mode == "implicit":
            pistar_rows = (0,)  # pi*_merged is the Bone Soup merge: the policy row itself
        else:
            for i in range(n):  # MAGE-I: each backbone alone as pi*_i (Eq. 23)
                row = torch.zeros(slots, dtype=torch.float64)
                row[i] = 1.0
                rows.append(row)
            pistar_rows = tuple(range(2, 2 + n))
            mix = mu.clone()
    elif mode.startswith("explicit"):
        if store.value_kind is None:
            raise ValueError("this store has no explicit value models")
        value_rows, sources = _value_sources(store, mode, mu, first_row=len(rows))
        rows += value_rows
        values = tuple(sources)
        mix = mu.clone() if mode == "explicit-ensemble" else mix
    coefficients = torch.stack(rows).to(store.device, store.dtype)
    return DecodePlan(
        mode,
        mu,
        method.coefficients(matrix, mu, 0.0),
        coefficients,
        0,
        reference_row,
        pistar_rows,
        values,
        mix.to(store.device, torch.float32),
    )
