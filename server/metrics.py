"""Prometheus metrics. Labels stay low-cardinality: never a preference, prompt or id."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from guidance.engine import Engine, EngineObserver

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# A new preference should cost well under a millisecond before its first forward.
MERGE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 0.01, 0.1, 1)


class Metrics(EngineObserver):
    """All server metrics in one registry, fed by the HTTP layer and the engine."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mage_requests", "Requests by outcome.", ["outcome"], registry=r)
        self.duration = Histogram(
            "mage_request_duration_seconds",
            "Arrival to last event.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "mage_queue_time_seconds",
            "Arrival to engine admission.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "mage_time_to_first_token_seconds",
            "Admission to first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "mage_inter_token_latency_seconds",
            "Between consecutive tokens.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generated = Counter("mage_generated_tokens", "Tokens generated.", registry=r)
        # Read from the engine's own state at scrape time (watch), never kept up by events:
        # a gauge set on events drifts whenever one is skipped.
        self.queue_size = Gauge("mage_queue_size", "Requests waiting.", registry=r)
        self.running = Gauge(
            "mage_running_requests", "Requests prefilling or decoding.", registry=r
        )
        self.cache_hits = Counter("mage_merge_cache_hits", "Merge-cache hits.", registry=r)
        self.cache_misses = Counter("mage_merge_cache_misses", "Merge-cache misses.", registry=r)
        self.cache_evictions = Counter(
            "mage_merge_cache_evictions", "Merge-cache evictions.", registry=r
        )
        self.cache_bytes = Gauge(
            "mage_merge_cache_bytes", "Bytes held by the merge cache.", registry=r
        )
        self.merge_latency = Histogram(
            "mage_merge_latency_seconds",
            "Building (or fetching) what a preference needs.",
            buckets=MERGE_BUCKETS,
            registry=r,
        )
        self.prefix_queries = Counter(
            "mage_prefix_cache_queries", "Prompts looked up in the prefix cache.", registry=r
        )
        self.prefix_hits = Counter(
            "mage_prefix_cache_hits", "Prompts that reused cached KV.", registry=r
        )
        self.prefix_query_tokens = Counter(
            "mage_prefix_cache_query_tokens", "Prompt tokens looked up.", registry=r
        )
        self.prefix_hit_tokens = Counter(
            "mage_prefix_cache_hit_tokens", "Prompt tokens whose KV was reused.", registry=r
        )
        self.prefix_evictions = Counter(
            "mage_prefix_cache_evictions", "Prefix-cache blocks evicted.", registry=r
        )
        self.prefix_bytes = Gauge(
            "mage_prefix_cache_bytes", "Bytes held by the prefix cache.", registry=r
        )
        self.ready = Gauge("mage_ready", "1 once the store is loaded.", registry=r)
        # 0 until an engine runs, and again once its thread died or stalled (see /health).
        self.engine_alive = Gauge("mage_engine_alive", "1 while the engine steps.", registry=r)
        self.kv_cache = Gauge("mage_kv_cache_bytes", "KV cache held by the batch.", registry=r)

    def watch(self, engine: Engine) -> None:
        """Gauges read from the engine at scrape time."""
        self.queue_size.set_function(lambda: engine.queue_size)
        self.running.set_function(lambda: engine.running)
        self.engine_alive.set_function(lambda: 1.0 if engine.health() is None else 0.0)
        self.kv_cache.set_function(engine.kv_bytes)
        self.cache_bytes.set_function(lambda: engine.plans.used_bytes)
        prefix = engine.prefix_cache
        self.prefix_bytes.set_function(lambda: prefix.used_bytes if prefix is not None else 0)

    # EngineObserver hooks (called on the engine thread; prometheus_client is thread-safe)
    def admitted(self, queue_seconds: float, running: int) -> None:
        self.queue_time.observe(queue_seconds)

    def token(self, seconds_since_last: float, first: bool) -> None:
        (self.ttft if first else self.itl).observe(seconds_since_last)
        self.generated.inc()

    def finished(self, outcome: str, seconds: float, generated: int, running: int) -> None:
        self.requests.labels(outcome=outcome).inc()
        self.duration.observe(seconds)

    def merge(self, seconds: float) -> None:
        self.merge_latency.observe(seconds)

    def prefix_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.prefix_queries.inc()
        self.prefix_query_tokens.inc(prompt_tokens)
        if cached_tokens:
            self.prefix_hits.inc()
            self.prefix_hit_tokens.inc(cached_tokens)

    def prefix_evicted(self, blocks: int) -> None:
        self.prefix_evictions.inc(blocks)

    def cache_event(self, event: str) -> None:
        {"hit": self.cache_hits, "miss": self.cache_misses, "eviction": self.cache_evictions}[
            event
        ].inc()

    def rejected(self, outcome: str) -> None:
        """A request refused before reaching the engine (validation, overloaded, not ready)."""
        self.requests.labels(outcome=outcome).inc()
