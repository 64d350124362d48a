"""KV caches of a padded batch whose rows join and leave between decode steps.

A lane holds, per layer, keys and values of shape (rows, kv_heads, capacity, head_dim) and
a 0/1 attention mask (rows, capacity); the first `length` columns are in use. Rows are
left-padded so every row's newest token sits in the same column:

- a step appends one block of columns to every row, written in place (no concatenation);
- a joining lane is left-padded to the longer of the two lengths (one copy, once per join);
- leaving rows are dropped by one index_select, after which the columns that are padding in
  every remaining row are cut, so the lane is never longer than its longest sequence;
- positions come from each row's count of real tokens, so padding never shifts RoPE;
- a sliding-window layer (Mistral, Gemma 2/3, gpt-oss) keeps only the columns its window
  can still reach, so its memory stops growing at the window (per-layer windows).

Why padded rather than paged (README "Batching"): transformers' attention takes a dense
(rows, heads, keys, dim) cache and a 2D mask, so a padded lane runs any causal LM unchanged,
on CPU and CUDA, with per-row LoRA coefficients applied as plain batch rows. A paged layout
needs its own attention kernels and per-token adapter indices.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch
from transformers.cache_utils import Cache, DynamicLayer

from model_store.architectures import layer_windows

GROWTH = 64
"""Columns added beyond what is needed when a buffer grows (amortises the copies)."""


def _load_libc_trim():
    """glibc's malloc_trim, or None (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_MALLOC_TRIM = _load_libc_trim()


def return_free_memory() -> None:
    """Hand freed host memory back to the OS. KV buffers are many MiB and change shape with
    every join and leave; glibc keeps such freed blocks in its heap (its mmap threshold grows
    after the first large free), so without this the server's RSS ratchets up with the
    largest batches it has seen. The engine calls it when its batch drains and at most every
    TRIM_EVERY_S under load; one call took 2-21 ms (mean 8) in a load run on the demo store."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _capacity(needed: int) -> int:
    return -(-needed // GROWTH) * GROWTH + GROWTH


class LaneLayer(DynamicLayer):
    """One layer's keys and values in a preallocated buffer, in lane columns.

    Buffer column j holds lane column `base + j`; lane columns [base, seen) are stored. A
    full-attention layer keeps every column (base stays 0). A sliding-window layer of window W
    only ever attends to the last W - 1 columns before a query, so columns older than that are
    dropped when the buffer fills (one copy of W - 1 columns every GROWTH steps, not one per
    step); its mask sizes tell transformers where its first stored column sits, and the
    lane's 2D padding mask is indexed in the same lane columns.
    """

    def __init__(self, window: int | None = None) -> None:
        super().__init__()
        self.window = window
        self.is_sliding = window is not None
        self.seen = 0  # lane columns appended
        self.base = 0  # lane column of buffer column 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states.new_zeros((*key_states.shape[:2], 0, key_states.shape[3]))
        self.values = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[3]))
        self.is_initialized = True

    def lowest_needed(self, length: int) -> int:
        """The first lane column a query at column `length` (or later) can attend to."""
        return 0 if self.window is None else max(0, length - self.window + 1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        low = max(self.base, self.lowest_needed(self.seen))
        if self.seen + new - self.base > self.keys.shape[-2]:
            self.rebuild(low, _capacity(self.seen + new - low))
        at = self.seen - self.base
        self.keys[:, :, at : at + new] = key_states
        self.values[:, :, at : at + new] = value_states
        self.seen += new
        return self.keys[:, :, low - self.base : at + new], self.values[
            :, :, low - self.base : at + new
        ]

    def rebuild(self, first: int, capacity: int, rows: torch.Tensor | None = None) -> None:
        """Reallocate to `capacity` columns holding lane columns [first, seen), of the rows
        `rows` (all when None)."""
        old_keys, old_values = self.keys, self.values
        if rows is not None:
            old_keys, old_values = old_keys[rows], old_values[rows]
        shape = (old_keys.shape[0], old_keys.shape[1], capacity, old_keys.shape[3])
        self.keys, self.values = old_keys.new_zeros(shape), old_values.new_zeros(shape)
        kept = self.seen - first
        self.keys[:, :, :kept] = old_keys[:, :, first - self.base : self.seen - self.base]
        self.values[:, :, :kept] = old_values[:, :, first - self.base : self.seen - self.base]
        self.base = first

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        low = max(self.base, self.lowest_needed(self.seen))
        return self.seen + query_length - low, low


class LaneCache(Cache):
    """A transformers Cache made of LaneLayers (one per decoder layer)."""

    def __init__(self, windows: list[int | None]) -> None:
        super().__init__(layers=[LaneLayer(window) for window in windows])


class KVLane:
    """The padded KV batch of one decoder (the shared base, or a standalone value model).

    Invariant: each row is [padding][real tokens], its real tokens in the last
    `real_host[row]` of the `length` columns in use; every layer has seen `length` columns.
    """

    def __init__(self, decoder: torch.nn.Module, device: torch.device) -> None:
        self.windows = layer_windows(decoder.config)
        self.decoder, self.device = decoder, device
        self._reset()

    def _reset(self) -> None:
        self.cache = LaneCache(self.windows)
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (rows, capacity)
        self.real = torch.zeros(0, dtype=torch.long, device=self.device)  # (rows,) real tokens
        self.real_host: list[int] = []  # the same counts on the host, so nothing syncs
        self.length = 0  # columns in use

    @property
    def rows(self) -> int:
        return len(self.real_host)

    def open(self, rows: int) -> None:
        """Start empty rows (before their first forward)."""
        assert self.rows == 0 and self.length == 0, "open a new lane"
        self.mask = torch.zeros((rows, 0), dtype=torch.long, device=self.device)
        self.real = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.real_host = [0] * rows

    def _layers(self) -> list[LaneLayer]:
        return [layer for layer in self.cache.layers if layer.is_initialized]

    def nbytes(self) -> int:
        """Bytes held by the key and value buffers."""
        return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in self._layers())

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        block_mask: torch.Tensor,
        real_tokens: list[int],
        every_position: bool = False,
    ) -> torch.Tensor:
        """Append a block: ids and 0/1 mask (rows, width), each row's padding on its left;
        `real_tokens` is each row's count of ones in the block, known to the caller.
        Returns the last column's hidden states (rows, hidden), or with `every_position`
        every column's (rows, width, hidden). On failure the lane is as it was before the
        call."""
        width = ids.shape[1]
        if self.length + width > self.mask.shape[1]:
            self._resize_mask(_capacity(self.length + width))
        self.mask[:, self.length : self.length + width] = block_mask
        positions = (self.real[:, None] + block_mask.cumsum(1) - 1).clamp(min=0)  # (rows, width)
        # Without padding anywhere the mask is all ones: leave it out, which lets attention
        # take its unmasked (causal) path, as transformers' own generate does.
        padded = any(r != self.length for r in self.real_host) or min(real_tokens) < width
        try:
            out = self.decoder(
                input_ids=ids,
                attention_mask=self.mask[:, : self.length + width] if padded else None,
                position_ids=positions,
                cache=self.cache,
                use_cache=True,
            )
        except BaseException:
            for layer in self._layers():  # undo the layers already written
                layer.seen = min(layer.seen, self.length)
            raise
        self.length += width
        self.real = self.real + block_mask.sum(1)
        self.real_host = [r + t for r, t in zip(self.real_host, real_tokens, strict=True)]
        return out.last_hidden_state if every_position else out.last_hidden_state[:, -1]

    def join(self, other: KVLane) -> None:
        """Append the rows of `other` (a lane of the same decoder), left-padding the shorter:
        a lane's column c becomes column c + (joined length - its length)."""
        if other.rows == 0:
            return
        if self.rows == 0:
            self.cache, self.mask, self.real = other.cache, other.mask, other.real
            self.real_host, self.length = list(other.real_host), other.length
            return
        length = max(self.length, other.length)
        rows = self.rows + other.rows
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            first = mine.lowest_needed(length)  # in joined columns
            capacity = _capacity(length - first)
            for name in ("keys", "values"):
                a = getattr(mine, name)
                joined = a.new_zeros((rows, a.shape[1], capacity, a.shape[3]))
                for layer, lane, at in (
                    (mine, self, slice(None, self.rows)),
                    (theirs, other, slice(self.rows, None)),
                ):
                    shift = length - lane.length
                    start = max(layer.base, first - shift)  # the side's own columns
                    source = getattr(layer, name)[
                        :, :, start - layer.base : lane.length - layer.base
                    ]
                    joined[at, :, start + shift - first : length - first] = source
                setattr(mine, name, joined)
            mine.seen, mine.base = length, first
        capacity = _capacity(length)
        mask = torch.zeros((rows, capacity), dtype=torch.long, device=self.device)
        mask[: self.rows, length - self.length : length] = self.mask[:, : self.length]
        mask[self.rows :, length - other.length : length] = other.mask[:, : other.length]
        self.mask, self.length = mask, length
        self.real = torch.cat([self.real, other.real])
        self.real_host = self.real_host + other.real_host

    def keep(self, index: list[int]) -> None:
        """Keep these rows, in this order (repeats allowed: beam search), and cut the
        columns that are padding in every kept row."""
        if not index:
            self._reset()
            return
        pad = min(self.length - self.real_host[i] for i in index)
        length = self.length - pad
        rows = torch.tensor(index, device=self.device)
        for layer in self._layers():
            first = max(layer.base, pad, layer.lowest_needed(self.length))
            layer.rebuild(first, _capacity(self.length - first), rows)
            layer.seen, layer.base = length, first - pad
        mask = torch.zeros((len(index), _capacity(length)), dtype=torch.long, device=self.device)
        mask[:, :length] = self.mask[rows, pad : self.length]
        self.mask, self.length = mask, length
        self.real = self.real[rows]
        self.real_host = [self.real_host[i] for i in index]

    # --- prefix cache (guidance.prefix_cache) ---------------------------------------------
    def held_from(self, row: int) -> list[int]:
        """Per layer, the first token position of `row` its buffer still holds (0, or later
        where a sliding window dropped older columns)."""
        pad = self.length - self.real_host[row]
        return [max(0, layer.base - pad) for layer in self.cache.layers]

    def read(
        self, row: int, first: list[int], stop: int
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Copies of one row's keys and values at its token positions [first[l], stop), per
        layer l: (kv_heads, columns, head_dim) each; None where first[l] >= stop."""
        pad = self.length - self.real_host[row]
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for layer, start in zip(self.cache.layers, first, strict=True):
            if start >= stop:
                out.append(None)
                continue
            assert pad + start >= layer.base, "the lane no longer holds these columns"
            a, b = pad + start - layer.base, pad + stop - layer.base
            out.append((layer.keys[row, :, a:b].clone(), layer.values[row, :, a:b].clone()))
        return out

    def load(self, layers: list[tuple[torch.Tensor, torch.Tensor, int]], length: int) -> None:
        """Start rows from known KV instead of `open`: per layer (keys, values, first), keys
        and values (rows, kv_heads, length - first, head_dim) holding every row's token
        positions [first, length); no padding. A sliding layer needs only the columns its
        window still reaches (first >= length - window + 1)."""
        assert self.rows == 0 and self.length == 0, "load into a new lane"
        rows = layers[0][0].shape[0]
        for layer, (keys, values, first) in zip(self.cache.layers, layers, strict=True):
            layer.lazy_initialization(keys, values)
            shape = (rows, keys.shape[1], _capacity(length - first), keys.shape[3])
            layer.keys, layer.values = keys.new_zeros(shape), values.new_zeros(shape)
            layer.keys[:, :, : length - first] = keys
            layer.values[:, :, : length - first] = values
            layer.seen, layer.base = length, first
        self.mask = torch.zeros((rows, _capacity(length)), dtype=torch.long, device=self.device)
        self.mask[:, :length] = 1
        self.real = torch.full((rows,), length, dtype=torch.long, device=self.device)
        self.real_host, self.length = [length] * rows, length

    def _resize_mask(self, capacity: int) -> None:
        mask = torch.zeros((self.rows, capacity), dtype=torch.long, device=self.device)
        mask[:, : self.length] = self.mask[:, : self.length]
        self.mask = mask
