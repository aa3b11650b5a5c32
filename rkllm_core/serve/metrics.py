"""Prometheus metrics of one server (``GET /metrics``), kept in a registry of the app's own.

Requests by endpoint and status; tokens (prompt, completion, prefilled) by model; time to first
token and decode speed by model; and, read live from the model manager: requests in line, models
loaded, loads and unloads (swaps).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..chat.engine import ChatDone
from ..models.manager import ModelManager

__all__ = ["ServerMetrics"]

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
_SPEED_BUCKETS = (1, 2, 4, 6, 8, 10, 15, 20, 30, 50, 100, 1000)


class _ManagerCollector(Collector):
    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        m = self._manager
        yield GaugeMetricFamily("rkllm_queue_depth", "Requests in the model manager's line.", value=m.waiting())
        loaded = GaugeMetricFamily("rkllm_loaded_models", "Models loaded on the NPU.", labels=["model"])
        for entry in m.loaded():
            loaded.add_metric([entry.info.name], 1)
        yield loaded
        stats = dict(m.stats)
        yield CounterMetricFamily("rkllm_model_loads", "Models loaded (rkllm_init).", value=stats.get("loads", 0))
        yield CounterMetricFamily(
            "rkllm_model_unloads", "Models unloaded to make room or on request.", value=stats.get("unloads", 0)
        )


class ServerMetrics:
    """The metrics of one app."""

    def __init__(self, manager: ModelManager) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("rkllm_requests", "HTTP requests.", ["endpoint", "code"], registry=self.registry)
        self.tokens = Counter("rkllm_tokens", "Tokens by model and kind.", ["model", "kind"], registry=self.registry)
        self.ttft = Histogram(
            "rkllm_time_to_first_token_seconds",
            "Request start to first token.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.decode = Histogram(
            "rkllm_decode_tokens_per_second",
            "Decode speed reported by the runtime.",
            ["model"],
            buckets=_SPEED_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ManagerCollector(manager))

    def record_request(self, endpoint: str, status: int) -> None:
        """Count one answered HTTP request (``endpoint``: the matched route's path, or ``unmatched``)."""
        self.requests.labels(endpoint, str(status)).inc()

    def record_chat(self, done: ChatDone, ttft: float | None) -> None:
        """Count one finished chat request."""
        u = done.usage
        self.tokens.labels(done.model, "prompt").inc(u.input_tokens)
        self.tokens.labels(done.model, "completion").inc(u.output_tokens)
        self.tokens.labels(done.model, "prefilled").inc(u.prefilled_tokens)
        if ttft is not None:
            self.ttft.labels(done.model).observe(ttft)
        if done.stats is not None and done.stats.decode_tokens_per_s > 0:
            self.decode.labels(done.model).observe(done.stats.decode_tokens_per_s)

    def record_tokens(self, model: str, kind: str, count: int) -> None:
        """Count input tokens of an embedding or rerank request."""
        self.tokens.labels(model, kind).inc(count)
