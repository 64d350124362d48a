"""Value heads: one value per vocabulary token from a final hidden state (Sec. 3.4.1).

Two layouts, both linear in their parameters, so merging heads by Eq. (24) is a weighted
sum of their tensors:
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

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ValueHead:
        return ValueHead(self.kind, {k: v.to(device, dtype) for k, v in self.tensors.items()})


def merge_heads(heads: Sequence[ValueHead], weights: Sequence[float]) -> ValueHead:
    """Eq. (24) on heads: theta_merge = sum_i mu_i theta_i, tensor by tensor."""
    kinds = {head.kind for head in heads}
    if len(kinds) != 1:
        raise ValueError(f"cannot merge value heads of different kinds: {sorted(kinds)}")
    names = HEAD_TENSORS[heads[0].kind]
    merged = {
        name: sum(float(w) * head.tensors[name] for head, w in zip(heads, weights, strict=True))
        for name in names
    }
    return ValueHead(heads[0].kind, merged)  # type: ignore[arg-type]


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
