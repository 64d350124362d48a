"""Serve many LoRA adapters over one copy of the base weights, with per-row coefficients.

Every targeted nn.Linear of the base model is wrapped by MultiLoraLinear. Before each
forward the engine sets, in the shared RowCoefficients, a (rows, adapters) matrix: row b
then computes with the weight W + sum_k C[b, k] * Delta_k. A Bone Soup policy, a merged
value model, and the reference model are therefore just different coefficient rows of one
batched forward (the base weights are never copied or modified).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from merging.lora import LoraFactors, StackedLora, add_row_lora, row_columns, stack_adapters


class RowCoefficients:
    """Mutable holder the engine fills before each forward; read by every wrapped layer."""

    def __init__(self) -> None:
        self.matrix: torch.Tensor | None = None  # (rows, adapters)
        self.active: frozenset[int] = frozenset()  # adapters non-zero in some row
        self._columns: dict[tuple, torch.Tensor] = {}  # per stack layout, this forward

    def set(self, matrix: torch.Tensor | None, active: list[int] | None = None) -> None:
        """Install the (rows, adapters) matrix for the next forward. `active` lists the
        adapters with a non-zero coefficient when the caller knows them (no device read)."""
        self.matrix, self._columns = matrix, {}
        if matrix is None:
            self.active = frozenset()
        elif active is not None:
            self.active = frozenset(active)
        else:
            self.active = frozenset(int(k) for k in torch.nonzero(matrix.abs().sum(0)).flatten())

    def columns(self, stacked: StackedLora) -> torch.Tensor:
        """(rows, R) column weights of a stack, computed once per forward for all the
        layers that share its layout (usually every layer)."""
        cached = self._columns.get(stacked.layout)
        if cached is None:
            cached = self._columns[stacked.layout] = row_columns(stacked, self.matrix)
        return cached


class MultiLoraLinear(nn.Module):
    """nn.Linear (or GPT-2's Conv1D) plus any number of LoRA adapters applied with per-row
    coefficients. Conv1D computes x W + b with W stored (in, out); a LoRA adapter on it adds
    x A^T B^T exactly as on a Linear, so only the weight's orientation differs."""

    def __init__(self, base: nn.Linear | Conv1D, coefficients: RowCoefficients) -> None:
        super().__init__()
        self.base = base
        self.coefficients = coefficients
        self.adapters: dict[int, LoraFactors] = {}
        self.stacked: StackedLora | None = None

    @property
    def in_features(self) -> int:
        base = self.base
        return base.weight.shape[0] if isinstance(base, Conv1D) else base.in_features

    @property
    def out_features(self) -> int:
        base = self.base
        return base.weight.shape[1] if isinstance(base, Conv1D) else base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def add_adapter(self, index: int, factors: LoraFactors) -> None:
        shape = (factors.lora_b.shape[0], factors.lora_a.shape[1])
        if shape != (self.out_features, self.in_features):
            raise ValueError(
                f"adapter of shape (out, in) = {shape} on a layer of "
                f"{(self.out_features, self.in_features)}"
            )
        self.adapters[index] = factors
        self.stacked = stack_adapters(self.adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        coefficients = self.coefficients
        if coefficients.matrix is None or self.stacked is None:
            return out
        if coefficients.active.isdisjoint(self.adapters):
            return out  # e.g. the reference row alone, or adapters of other layers
        columns = coefficients.columns(self.stacked)  # (rows, R)
        if x.dim() == 2:  # (rows * tokens, in): OPT's MLP, Qwen2-MoE's shared expert
            rows = columns.shape[0]
            if x.shape[0] % rows:
                raise ValueError(f"{x.shape[0]} flattened tokens do not split into {rows} rows")
            # flattened row-major, so row b's tokens are the b-th block (the matrix test checks
            # every served architecture against PEFT)
            x3, out3 = x.view(rows, -1, x.shape[-1]), out.view(rows, -1, out.shape[-1])
            return add_row_lora(out3, x3, self.stacked, columns).view(out.shape)
        return add_row_lora(out, x, self.stacked, columns)


def wrap_linear_layers(
    model: nn.Module, module_names: set[str], coefficients: RowCoefficients
) -> dict[str, MultiLoraLinear]:
    """Replace the named nn.Linear modules by MultiLoraLinear wrappers (in place)."""
    wrapped: dict[str, MultiLoraLinear] = {}
    for name in sorted(module_names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, MultiLoraLinear):
            wrapped[name] = module
            continue
        if not isinstance(module, nn.Linear | Conv1D):
            raise TypeError(f"{name} is a {type(module).__name__}, LoRA needs nn.Linear or Conv1D")
        wrapper = MultiLoraLinear(module, coefficients)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped
