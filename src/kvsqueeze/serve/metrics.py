"""Prometheus metrics: requests, latency, batches, tokens, and the store (read when scraped)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))


class Metrics:
    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, service):
        self.service = service
        self.registry = CollectorRegistry()  # one per server: several can live in one process (tests)
        self.requests = Counter("kvsqueeze_requests", "HTTP requests answered", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("kvsqueeze_request_seconds", "Time to answer a request (to its last byte)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("kvsqueeze_batch_rows", "Questions answered by one batched generate",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, float("inf")), registry=self.registry)
        self.tokens = Counter("kvsqueeze_generated_tokens", "Tokens generated", registry=self.registry)
        self.registry.register(_StoreCollector(service))

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def batch(self, rows: int, tokens: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.tokens.inc(tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StoreCollector:
    def __init__(self, service):
        self.service = service

    def collect(self):
        usage = self.service.store.usage()
        for name, help, value in (
                ("kvsqueeze_contexts", "Contexts stored (unexpired, this model)", usage.contexts),
                ("kvsqueeze_context_bytes_in_memory", "Bytes of contexts held in memory", usage.bytes_in_memory),
                ("kvsqueeze_context_bytes_on_disk", "Bytes of context files on disk", usage.bytes_on_disk),
                ("kvsqueeze_context_bytes_held", "Bytes the stored contexts' caches hold, compressed", usage.bytes_held),
                ("kvsqueeze_context_bytes_saved", "Bytes compression saved over the stored contexts' full caches",
                 usage.bytes_full - usage.bytes_held),
                ("kvsqueeze_context_files_skipped", "Context files found damaged and moved aside since start",
                 self.service.store.skipped),
                ("kvsqueeze_queue_length", "Requests waiting for the model", self.service.batcher.pending())):
            yield GaugeMetricFamily(name, help, value=value)
