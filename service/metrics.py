"""Prometheus metrics of one app instance (its own registry, so tests can build many apps).

Names follow Prometheus conventions: ``memrec_`` prefix, seconds, ``_total`` on counters; labels never
hold user or item ids.

Under ``memrec serve --workers N`` a scrape reaches whichever worker the kernel hands the connection to,
so per-process numbers would jump between workers from scrape to scrape. The supervisor therefore
points ``PROMETHEUS_MULTIPROC_DIR`` at a directory the workers share before it starts them;
prometheus_client then keeps every value in a per-process file there, and any worker's ``/metrics``
answers for the whole server: counters and histograms summed over the workers (those that died
included, so counters never go back), gauges combined as each one's ``multiprocess_mode`` says.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from memory_store import StoreStats

# 1 ms .. 100 ms resolved finely, then a coarse tail.
LATENCY_BUCKETS = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
K_BUCKETS = (0, 1, 2, 3, 5, 8, 10, 15, 20, 30, 50, 100)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("history", "encode", "retrieve", "score")  # service.pipeline: store, model, store, model


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        # Read when prometheus_client is imported, which decides where values live: set by then.
        self.shared_dir = os.environ.get(MULTIPROC_ENV)
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram(
            "memrec_http_request_duration_seconds",
            "HTTP request latency by route and status class",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "memrec_http_requests_in_flight",
            "HTTP requests being served",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.stage_latency = Histogram(
            "memrec_stage_duration_seconds",
            "Recommend pipeline stage latency per micro-batch",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.k_used = Histogram(
            "memrec_k_used", "Memories fused per recommendation", buckets=K_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "memrec_batch_size", "Requests per micro-batch", buckets=BATCH_BUCKETS, registry=r
        )
        # Per model version (service.versions): what an operator compares between two versions served
        # side by side. ``version`` is a model version, never a user or an item.
        self.recommend_latency = Histogram(
            "memrec_recommend_duration_seconds",
            "POST /recommend latency by the model version that answered",
            ["version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.recommendations = Counter(
            "memrec_recommendations_total",
            "Answers by model version and strategy (retrieval, encoder, popular)",
            ["version", "strategy"],
            registry=r,
        )
        self.outcomes = Counter(
            "memrec_recommendation_outcomes_total",
            "Interactions after an answer, by the version that gave it: hit (the item was in it) or miss",
            ["version", "outcome"],
            registry=r,
        )
        self.model_info = Gauge(  # 1 for each version a worker serves, 0 once it moved away
            "memrec_model_version_info",
            "Model versions served (1) and left (0) by a hot swap",
            ["version"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.model_swaps = Counter(
            "memrec_model_swaps_total",
            "Hot model swaps by outcome (switched or failed)",
            ["outcome"],
            registry=r,
        )
        self.model_swap_seconds = Gauge(
            "memrec_model_swap_seconds",
            "Duration of the last hot model swap, from the check to the switch",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.events = Counter("memrec_events_total", "Interactions by outcome", ["outcome"], registry=r)
        self.user_states = Counter(
            "memrec_user_states_total",
            "Recommendations by where the user's encoder state came from: kept with the history, or encoded",
            ["source"],
            registry=r,
        )
        self.degraded = Counter(
            "memrec_degraded_total", "Recommendations answered without the store (unreachable)", registry=r
        )
        self.errors = Counter("memrec_errors_total", "Failed requests by kind", ["kind"], registry=r)
        self.erasures = Counter(
            "memrec_user_erasures_total", "Users erased (DELETE /users/{id}), repeats included", registry=r
        )
        self.unavailable_items = Gauge(  # the shared store's set: every worker reads the same
            "memrec_unavailable_items",
            "Items marked unavailable (never recommended)",
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.new_items = Gauge(
            "memrec_new_items",
            "Items registered after training (ids beyond the model's vocabulary)",
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.bank_size = Gauge(  # the shared store's count: every worker reads the same
            "memrec_memory_bank_size",
            "Collaborative memories in the store",
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.index_size = Gauge(  # one series per worker (a ``pid`` label): each keeps its own
            "memrec_index_size",
            "Vectors in this replica's FAISS index",
            multiprocess_mode="liveall",
            registry=r,
        )
        self.ingest_lag = Gauge(
            "memrec_ingest_lag_seconds",
            "Age of the oldest store write not yet in this index (the most behind worker's)",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.ingest_pending = Gauge(
            "memrec_ingest_pending_entries",
            "Replication log entries not yet in this index (the most behind worker's)",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.loop_lag = Histogram(
            "memrec_event_loop_lag_seconds",
            "How late a periodic timer ran: time the event loop spent on other work first",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for stage in STAGES:
            self.stage_latency.labels(stage)
        for source in ("stored", "encoded"):
            self.user_states.labels(source)
        for outcome in ("switched", "failed"):
            self.model_swaps.labels(outcome)

    def observe_store(self, stats: StoreStats) -> None:
        self.bank_size.set(stats.memories)
        self.index_size.set(stats.index_size)
        self.ingest_lag.set(stats.replication.lag_s)
        self.ingest_pending.set(stats.replication.pending)
        self.unavailable_items.set(stats.unavailable_items)
        self.new_items.set(stats.new_items)

    def render(self) -> bytes:
        """The text exposition: this app's registry, or with a shared directory every worker's values."""
        if self.shared_dir is None:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined, path=self.shared_dir)  # type: ignore[no-untyped-call]
        return generate_latest(combined)
