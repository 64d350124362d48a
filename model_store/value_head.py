"""Value heads: one value per vocabulary token from a final hidden state (Sec. 3.4.1).

Two layouts, both linear in their parameters, so merging heads by Eq. (24) is a weighted
sum of their tensors, and equally a weighted sum of their outputs (HeadBank):
- `dense`: V = W h + b with W: (vocab, hidden). Exact but large (vocab x hidden floats).
- `tied`:  V = E (P h + p) + c, where E: (vocab, hidden) is the model's own output
  embedding (not stored), P: (hidden, hidden), p: (hidden,), c: (vocab,). This keeps a
  head at hidden^2 + hidden + vocab floats (about 1.5 MB for SmolLM2-135M in fp32)
  while still scoring every token in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_store.errors import StoreError

HEAD_TENSORS = {"dense": ("weight", "bias"), "tied": ("proj", "proj_bias", "out_bias")}


@dataclass(frozen=True)
class ValueHead:
    """A value head's tensors; `kind` selects the layout above."""

    kind: str
    """'dense' or 'tied'."""
    tensors: dict[str, torch.Tensor]
    """Named tensors of the layout (see HEAD_TENSORS)."""

    @property
    def vocab_size(self) -> int:
        return int(self.tensors["bias" if self.kind == "dense" else "out_bias"].shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.tensors["weight" if self.kind == "dense" else "proj"].shape[1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __call__(self, hidden: torch.Tensor, output_embedding: torch.Tensor) -> torch.Tensor:
        """hidden: (rows, hidden) -> values (rows, vocab)."""
        t = self.tensors
        if self.kind == "dense":
            return hidden @ t["weight"].T + t["bias"]
        return (hidden @ t["proj"].T + t["proj_bias"]) @ output_embedding.T + t["out_bias"]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied layout's P h + p (rows, hidden): what the output embedding then scores,
        so a batch can score many heads' projections in one product with E."""
        return hidden @ self.tensors["proj"].T + self.tensors["proj_bias"]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ValueHead:
        return ValueHead(self.kind, {k: v.to(device, dtype) for k, v in self.tensors.items()})


@dataclass(frozen=True)
class HeadBank:
    """A store's value heads stacked on a leading objective axis.

    Heads are linear in their parameters, so the merged head of Eq. (24) applied to h,
    (sum_i w_i theta_i)(h), equals sum_i w_i head_i(h). The bank computes that mix for many
    rows with different weights at once, so no preference ever materialises a merged head.
    """

    kind: str
    """'dense' or 'tied', shared by every head."""
    tensors: dict[str, torch.Tensor]
    """HEAD_TENSORS of the kind, each stacked: (objectives, ...)."""

    @classmethod
    def stack(cls, heads: Sequence[ValueHead]) -> HeadBank | None:
        if not heads:
            return None
        kinds = {head.kind for head in heads}
        if len(kinds) != 1:
            raise ValueError(f"cannot mix value heads of different kinds: {sorted(kinds)}")
        kind = heads[0].kind
        names = HEAD_TENSORS[kind]
        return cls(kind, {n: torch.stack([h.tensors[n] for h in heads]) for n in names})

    def project(self, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Tied layout: sum_i w_i (P_i h + p_i), (rows, hidden); weights (rows, objectives).
        What the output embedding E then scores, so many rows share one product with E."""
        t = self.tensors
        per_head = torch.einsum("rj,nij->rni", hidden, t["proj"]) + t["proj_bias"]  # (r, n, h)
        return torch.einsum("rn,rni->ri", weights, per_head)

    def out_bias(self, weights: torch.Tensor) -> torch.Tensor:
        """Tied layout: sum_i w_i c_i, (rows, vocab)."""
        return weights @ self.tensors["out_bias"]

    def __call__(
        self, hidden: torch.Tensor, weights: torch.Tensor, output_embedding: torch.Tensor
    ) -> torch.Tensor:
        """Values (rows, vocab) of the mixed heads for hidden (rows, hidden)."""
        if self.kind == "tied":
            projected = self.project(hidden, weights)
            return projected @ output_embedding.T + self.out_bias(weights)
        t = self.tensors  # dense: sum_i w_i (W_i h + b_i)
        per_head = torch.einsum("rj,nvj->rnv", hidden, t["weight"]) + t["bias"]
        return torch.einsum("rn,rnv->rv", weights, per_head)


def save_value_head(head: ValueHead, path: Path) -> None:
    save_file(
        {k: v.contiguous() for k, v in head.tensors.items()},
        str(path),
        metadata={"kind": head.kind},
    )


def load_value_head(path: Path) -> ValueHead:
    """Load a head file; StoreError names the file when it is malformed."""
    if not path.is_file():
        raise StoreError(path, "missing value head file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            kind = (handle.metadata() or {}).get("kind", "")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise StoreError(path, f"not a readable safetensors file: {exc}") from None
    if kind not in HEAD_TENSORS:
        raise StoreError(
            path, f"metadata 'kind' must be one of {sorted(HEAD_TENSORS)}, got {kind!r}"
        )
    missing = set(HEAD_TENSORS[kind]) - set(tensors)
    if missing:
        raise StoreError(path, f"{kind} head lacks tensors {sorted(missing)}")
    return ValueHead(kind, {name: tensors[name] for name in HEAD_TENSORS[kind]})
