"""Exact LoRA merging as pure tensor functions.

A LoRA adapter i changes a linear layer's weight by Delta_i = scale_i * B_i @ A_i with
A_i: (r_i, in), B_i: (out, r_i). Merging with coefficients c must give exactly
sum_i c_i * scale_i * B_i @ A_i (what PEFT calls the 'cat' combination), never
(sum_i c_i B_i)(sum_i c_i A_i), which adds cross terms B_i A_j.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraFactors:
    """The two factors of one adapter on one linear layer."""

    lora_a: torch.Tensor
    """A, shape (rank, in_features)."""
    lora_b: torch.Tensor
    """B, shape (out_features, rank)."""
    scale: float
    """lora_alpha / rank (or / sqrt(rank) for rsLoRA)."""


def lora_delta(factors: LoraFactors) -> torch.Tensor:
    """Dense weight delta of one adapter: scale * B @ A, shape (out, in)."""
    return factors.scale * (factors.lora_b @ factors.lora_a)


def exact_merged_delta(
    adapters: Sequence[LoraFactors], coefficients: Sequence[float]
) -> torch.Tensor:
    """Dense merged delta sum_i c_i * scale_i * B_i @ A_i (Eq. 6 / Eq. 24 on LoRA deltas)."""
    if len(adapters) != len(coefficients):
        raise ValueError(f"{len(adapters)} adapters but {len(coefficients)} coefficients")
    total = torch.zeros_like(lora_delta(adapters[0]))
    for factors, coefficient in zip(adapters, coefficients, strict=True):
        total += float(coefficient) * lora_delta(factors)
    return total


@dataclass(frozen=True)
class StackedLora:
    """Several adapters of one layer concatenated along the rank axis ('cat' layout)."""

    lora_a: torch.Tensor
    """(total rank R, in_features): the A factors stacked."""
    lora_b: torch.Tensor
    """(out_features, R): the B factors side by side."""
    column_slot: torch.Tensor
    """(R,) long: which adapter slot each rank column belongs to."""
    column_scale: torch.Tensor
    """(R,): that adapter's LoRA scale."""
    layout: tuple
    """(slots, ranks, scales): layers with equal layouts share their per-row column
    weights, computed once per forward (model_store.multi_lora.RowCoefficients)."""


def stack_adapters(adapters: dict[int, LoraFactors]) -> StackedLora:
    """Concatenate adapters (any ranks) so one pair of matmuls applies them all."""
    slots = sorted(adapters)
    a = torch.cat([adapters[k].lora_a for k in slots], dim=0)
    b = torch.cat([adapters[k].lora_b for k in slots], dim=1)
    ranks = [adapters[k].lora_a.shape[0] for k in slots]
    slot = torch.tensor([k for k, r in zip(slots, ranks, strict=True) for _ in range(r)])
    scale = torch.tensor(
        [adapters[k].scale for k, r in zip(slots, ranks, strict=True) for _ in range(r)],
        dtype=a.dtype,
    )
    layout = (tuple(slots), tuple(ranks), tuple(adapters[k].scale for k in slots))
    return StackedLora(a, b, slot.to(a.device), scale.to(a.device), layout)


def row_columns(stacked: StackedLora, coefficients: torch.Tensor) -> torch.Tensor:
    """(rows, R): each rank column's weight in each row, C[b, slot(col)] * scale(col)."""
    return coefficients[:, stacked.column_slot] * stacked.column_scale


def apply_row_lora(
    x: torch.Tensor, stacked: StackedLora, coefficients: torch.Tensor
) -> torch.Tensor:
    """The adapters' contribution to a batch whose rows use different coefficients.

    x: (rows, tokens, in); coefficients: (rows, slots). Row b gets
    x_b @ (sum_k C[b, k] * scale_k * B_k @ A_k)^T — the exact merge of Eq. (6)/(24) —
    computed through the rank bottleneck, so no dense delta is ever formed.
    """
    return add_row_lora(torch.zeros(()), x, stacked, row_columns(stacked, coefficients))


def add_row_lora(
    out: torch.Tensor, x: torch.Tensor, stacked: StackedLora, columns: torch.Tensor
) -> torch.Tensor:
    """out + the adapters' contribution, given the row_columns (rows, R) of the stack; x:
    (rows, tokens, in), out: (rows, tokens, out) or a scalar. Three kernels: the rank
    projection, the per-row column weights (in place) and one fused multiply-add."""
    hidden = x @ stacked.lora_a.T  # (rows, tokens, R)
    hidden.mul_(columns[:, None, :])
    if out.dim() == 0:
        return hidden @ stacked.lora_b.T
    flat = out.view(-1, out.shape[-1])  # (rows * tokens, out): add in place, no new tensor
    flat.addmm_(hidden.view(-1, hidden.shape[-1]), stacked.lora_b.T)
    return out
