"""Prefix cache: the KV of prompts already prefilled, reused by later prompts that start
with them (a chat's history), keyed by everything that changes the KV.

With per-row LoRA a row's KV depends on its adapter coefficients, not only on its tokens:
the same history prefilled under another preference (mu, merge method, alpha) or another
guidance mode has other keys and values. So every lane row is cached on its own, under an
exact key of what its forward computes:

- a row of the shared base: its coefficient row, the bytes of the tensor the forward applies
  (model_store.multi_lora), with its dtype; mu, merge method and alpha reach the KV only
  through these numbers, so rows that compute the same thing share entries (the bare-base
  pi_ref row of every implicit request) and rows that differ by one bit never do;
- a standalone value model's row: which model (a store model by index, or the Eq. 24 merge
  sum_i w_i theta_i), and its weights w as float64 bytes.

Each row key roots a tree whose edges are blocks of `block` tokens (a trie of token blocks,
like SGLang's radix tree, with vLLM's fixed-size blocks). Keys are compared whole (tuples
in dicts, never a digest), so a different preference, or a colliding hash, can never reach
another row's entries: unlike a chained block hash, a collision is impossible by
construction, not merely improbable.

A lookup takes, over every row of a request, the longest run of cached blocks all of them
share, never the prompt's last token (its logits are needed); a sliding-window layer must
still hold the columns its window reaches from there. The hit is restored into fresh lanes
(KVLane.load) and only the suffix is prefilled. After a prefill, each row's new full blocks
are copied out of the lane (one copy per layer and row, shared by its blocks), and so are a
finished request's generated tokens: the next turn of a chat sends them back as history.

Memory: a byte budget on the model's device, least-recently-used blocks evicted first. A
hit or store touches its path leaf first, so an ancestor is always more recent than its
descendants and the least recently used block is always a leaf: a chain is evicted from its
end, never cut in the middle.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from guidance.plan import DecodePlan, ValueSource
from model_store.architectures import layer_windows
from model_store.loader import LoadedStore

if TYPE_CHECKING:
    from guidance.batch import Batch
    from guidance.kv import KVLane

log = logging.getLogger("mage.prefix_cache")
LayerKV = tuple[torch.Tensor, torch.Tensor] | None
"""One layer's keys and values of one block (kv_heads, block, head_dim), or None where a
sliding window had dropped them."""


@dataclass(eq=False)
class _Copy:
    """One copy out of a lane (one row, every layer); its blocks are views into it."""

    nbytes: int
    blocks: int = 0  # blocks still cached that view it


@dataclass(eq=False)
class _Node:
    """A cached block (or a row key's root, with no KV)."""

    parent: _Node | None
    edge: Hashable
    """The block's tokens (a tuple), or the row key for a root."""
    kv: list[LayerKV] = field(default_factory=list)
    copy: _Copy | None = None
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)


@dataclass(frozen=True)
class RowKeys:
    """A plan's exact row keys: its base rows, then its value sources (None: on the base)."""

    base: tuple[Hashable, ...]
    values: tuple[Hashable | None, ...]


def _tensor_key(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """The exact bits of a tensor, with its dtype and shape."""
    host = tensor.detach().to("cpu").contiguous()
    return str(host.dtype), tuple(host.shape), host.view(torch.uint8).numpy().tobytes()


@dataclass
class CachedPrefix:
    """A hit: `tokens` cached tokens of one request, per lane row its chain of blocks.
    `restore` fills a starting Batch's lanes (guidance.batch.Batch.start)."""

    tokens: int
    block: int
    base: list[list[_Node]]
    """Per base row of the member, its blocks."""
    values: list[list[_Node] | None]
    """Per value source of the member's plan, its blocks (None: a base row's source)."""

    def restore(self, batch: Batch) -> None:
        layout = batch.layout
        batch.base.load(self._layers(self.base, batch.base), self.tokens)
        for key, lane in batch.lanes.items():
            rows = [self.values[k] for _, k in layout.lane_rows[key]]
            lane.load(self._layers(rows, lane), self.tokens)

    def _layers(self, rows: list, lane: KVLane) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        out = []
        for layer, window in enumerate(lane.windows):
            first = _first_block(self.tokens, window, self.block)
            parts = [
                [torch.cat([node.kv[layer][i] for node in chain[first:]], dim=1) for chain in rows]
                for i in (0, 1)
            ]
            out.append((torch.stack(parts[0]), torch.stack(parts[1]), first * self.block))
        return out


def _first_block(tokens: int, window: int | None, block: int) -> int:
    """The first block a query at position `tokens` still attends to, in a layer."""
    return 0 if window is None else max(0, tokens - window + 1) // block


class PrefixCache:
    """Block-granular KV of prompts per exact row key, under a byte budget (LRU)."""

    def __init__(
        self,
        store: LoadedStore,
        budget_bytes: int,
        block: int = 16,
        on_evict: Callable[[int], None] | None = None,
    ) -> None:
        if block < 1:
            raise ValueError("a prefix-cache block holds at least one token")
        self.loaded, self.budget_bytes, self.block = store, budget_bytes, block
        self.used_bytes = 0
        self._roots: dict[Hashable, _Node] = {}
        self._lru: OrderedDict[_Node, None] = OrderedDict()  # oldest first
        self._keys: OrderedDict[int, tuple[DecodePlan, RowKeys]] = OrderedDict()
        self._on_evict = on_evict or (lambda blocks: None)

    @property
    def blocks(self) -> int:
        """Blocks cached (roots excluded)."""
        return sum(node.parent is not None for node in self._lru)

    # --- keys ----------------------------------------------------------------------------
    def row_keys(self, plan: DecodePlan) -> RowKeys:
        """The plan's exact row keys (read from the device once per plan, then memoised)."""
        cached = self._keys.get(id(plan))
        if cached is not None and cached[0] is plan:
            self._keys.move_to_end(id(plan))
            return cached[1]
        coefficients = plan.coefficients
        keys = RowKeys(
            base=tuple(("base", *_tensor_key(coefficients[r])) for r in range(plan.rows)),
            values=tuple(self._source_key(source) for source in plan.values),
        )
        self._keys[id(plan)] = (plan, keys)
        while len(self._keys) > 1024:
            self._keys.popitem(last=False)
        return keys

    def _source_key(self, source: ValueSource) -> Hashable | None:
        if source.model is None:
            return None
        weights = _tensor_key(torch.tensor(source.weights, dtype=torch.float64))
        models = self.loaded.standalone_values or []
        index = next((i for i, m in enumerate(models) if m is source.model), None)
        # Not a store model: guidance.plan's Eq. (24) merge sum_i w_i theta_i of them.
        return ("standalone", "merged" if index is None else index, weights)

    # --- lookup --------------------------------------------------------------------------
    def lookup(self, plan: DecodePlan, prompt: list[int] | tuple[int, ...]) -> CachedPrefix | None:
        """The longest cached prefix every row of `plan` shares for `prompt`, in whole
        blocks, the last prompt token excluded; None when no block is usable."""
        keys = self.row_keys(plan)
        wanted = self._blocks(prompt[: len(prompt) - 1])  # the last token is recomputed
        if not wanted:
            return None
        base = [self._walk(key, wanted) for key in keys.base]
        values = [None if key is None else self._walk(key, wanted) for key in keys.values]
        chains = base + [chain for chain in values if chain is not None]
        length = min(len(chain) for chain in chains)
        windows = self._windows(plan)
        while length and not all(
            self._holds(chain, length, lane) for chain, lane in zip(chains, windows, strict=True)
        ):
            length -= 1
        if not length:
            return None
        for chain in chains:
            self._touch(chain[length - 1])
        return CachedPrefix(
            tokens=length * self.block,
            block=self.block,
            base=[chain[:length] for chain in base],
            values=[None if chain is None else chain[:length] for chain in values],
        )

    def _blocks(self, tokens: list[int] | tuple[int, ...]) -> list[tuple[int, ...]]:
        """The whole blocks of `tokens`."""
        whole = len(tokens) - len(tokens) % self.block
        return [tuple(tokens[i : i + self.block]) for i in range(0, whole, self.block)]

    def _walk(self, key: Hashable, wanted: list[tuple[int, ...]]) -> list[_Node]:
        node, chain = self._roots.get(key), []
        for blk in wanted:
            node = node.children.get(blk) if node is not None else None
            if node is None:
                break
            chain.append(node)
        return chain

    def _windows(self, plan: DecodePlan) -> list[list[int | None]]:
        """Per chain of `lookup` (base rows, then standalone sources), its layers' windows."""
        base = layer_windows(self.loaded.model.get_decoder().config)
        values = [
            layer_windows(source.model.get_decoder().config)
            for source in plan.values
            if source.model is not None
        ]
        return [base] * plan.rows + values

    def _holds(self, chain: list[_Node], length: int, windows: list[int | None]) -> bool:
        """Whether the first `length` blocks hold what every layer attends to from there."""
        return all(
            chain[i].kv[layer] is not None
            for layer, window in enumerate(windows)
            for i in range(_first_block(length * self.block, window, self.block), length)
        )

    # --- store ---------------------------------------------------------------------------
    def store(self, batch: Batch, members: list[int], started: Mapping[Any, DecodePlan]) -> None:
        """Cache the whole blocks of what `batch`'s lanes hold for these members: each
        member's tokens `ids` (prompt, then generated) up to its rows' length. `started`
        holds, per member, the plan its KV was computed with: a member whose plan has
        changed since (a preference changed while it ran) is skipped, its KV being that of
        no single key."""
        layout = batch.layout
        lane_index = {
            (m, k): (key, i)
            for key, rows in layout.lane_rows.items()
            for i, (m, k) in enumerate(rows)
        }
        for m in members:
            member = batch.members[m]
            plan = member.plan
            if started.get(member) is not plan or len(getattr(member, "plans", ())) > 1:
                continue
            held = batch.base.real_host[layout.base_rows[m][0]]
            blocks = self._blocks(member.ids[:held])
            if not blocks:
                continue
            keys = self.row_keys(plan)
            for r, key in zip(layout.base_rows[m], keys.base, strict=True):
                self._store(key, blocks, batch.base, r)
            for k, key in enumerate(keys.values):
                if key is not None:
                    lane, row = lane_index[(m, k)]
                    self._store(key, blocks, batch.lanes[lane], row)
        self._evict()

    def _store(self, key: Hashable, blocks: list[tuple[int, ...]], lane: KVLane, row: int) -> None:
        node = self._roots.get(key)
        if node is None:
            node = self._roots[key] = _Node(None, key)
        chain = self._walk(key, blocks)
        node = chain[-1] if chain else node
        new = len(chain)
        if new < len(blocks):
            start, stop = new * self.block, len(blocks) * self.block
            held = [-(-first // self.block) * self.block for first in lane.held_from(row)]
            kv = lane.read(row, [max(start, first) for first in held], stop)
            size = sum(2 * k.numel() * k.element_size() for k, _ in filter(None, kv))
            if size > self.budget_bytes:  # larger than the whole budget: not kept
                self._touch(node)
                return
            copy = _Copy(size)
            for i in range(new, len(blocks)):
                child = _Node(node, blocks[i], self._views(kv, held, i, stop), copy)
                node.children[blocks[i]] = child
                copy.blocks += 1
                node = child
            self.used_bytes += size
        self._touch(node)

    def _views(self, kv: list[LayerKV], held: list[int], i: int, stop: int) -> list[LayerKV]:
        """Block i's view of each layer's copy (which starts at max(block start, held))."""
        out: list[LayerKV] = []
        for layer, first in zip(kv, held, strict=True):
            start = i * self.block
            if layer is None or start < first:
                out.append(None)
                continue
            offset = start - (stop - layer[0].shape[1])
            out.append(tuple(t[:, offset : offset + self.block] for t in layer))
        return out

    # --- recency and eviction ------------------------------------------------------------
    def _touch(self, node: _Node | None) -> None:
        """Make `node` and its ancestors the most recent, leaf first."""
        while node is not None:
            self._lru[node] = None
            self._lru.move_to_end(node)
            node = node.parent

    def _evict(self) -> None:
        evicted = 0
        while self.used_bytes > self.budget_bytes and self._lru:
            node, _ = self._lru.popitem(last=False)  # a leaf (see the module docstring)
            if node.parent is None:
                del self._roots[node.edge]
                continue
            del node.parent.children[node.edge]
            evicted += 1
            node.copy.blocks -= 1
            if node.copy.blocks == 0:
                self.used_bytes -= node.copy.nbytes
        if evicted:
            self._on_evict(evicted)

    def clear(self) -> None:
        """Drop every entry."""
        self._roots.clear()
        self._lru.clear()
        self.used_bytes = 0
