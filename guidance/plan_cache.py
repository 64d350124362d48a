"""LRU cache, under a byte budget, for what a preference needs materialised: the engine's
decode plans (guidance.plan), hence here beside them rather than in merging/, which stays
pure tensor functions plus their registry."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any


@dataclass
class CacheStats:
    """Counters since start-up."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


class MergeCache:
    """Least-recently-used map with a byte budget; an entry larger than the whole budget is
    built and returned but not kept."""

    def __init__(self, budget_bytes: int, on_event: Callable[[str], None] | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._on_event = on_event or (lambda event: None)

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_build(self, key: Hashable, build: Callable[[], tuple[Any, int]]) -> tuple[Any, bool]:
        """Return (value, hit). `build` returns (value, size in bytes)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                self._on_event("hit")
                return self._entries[key][0], True
        value, size = build()
        with self._lock:
            self.stats.misses += 1
            self._on_event("miss")
            if size <= self.budget_bytes and key not in self._entries:
                self._entries[key] = (value, size)
                self._used += size
                while self._used > self.budget_bytes:
                    _, (_, evicted_size) = self._entries.popitem(last=False)
                    self._used -= evicted_size
                    self.stats.evictions += 1
                    self._on_event("eviction")
        return value, False
