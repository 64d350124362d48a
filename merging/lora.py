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


def apply_row_lora(
    x: torch.Tensor, factors: LoraFactors, row_coefficients: torch.Tensor
) -> torch.Tensor:
    """One adapter's contribution to a batch whose rows use different coefficients.

    x: (rows, tokens, in); row_coefficients: (rows,). Returns (rows, tokens, out) equal to
    x @ (c_row * scale * B @ A)^T for each row, computed through the rank-r bottleneck
    so the dense delta is never formed. Summing this over adapters is the exact merge.
    """
    hidden = x @ factors.lora_a.T  # (rows, tokens, r)
    hidden = hidden * (row_coefficients * factors.scale)[:, None, None]
    return hidden @ factors.lora_b.T  # (rows, tokens, out)
