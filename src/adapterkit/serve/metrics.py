"""Prometheus metrics of one server, in a registry of its own."""

from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter

from ..generation import Generation

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """Prometheus metrics of one server, in a registry of its own."""

    def __init__(self, server) -> None:  # the Server, whose engine, pool and queue the gauges read
        self.registry = registry = CollectorRegistry()
        adapter = ["adapter"]
        self.requests = PromCounter("adapterkit_requests",
                                    "Requests (prompts) by adapter and outcome: ok, error, cancelled, rejected.",
                                    ["adapter", "outcome"], registry=registry)
        self.prompt_tokens = PromCounter("adapterkit_prompt_tokens", "Prompt tokens by adapter.", adapter,
                                         registry=registry)
        self.completion_tokens = PromCounter("adapterkit_completion_tokens", "Generated tokens by adapter.", adapter,
                                             registry=registry)
        self.queue = Histogram("adapterkit_queue_seconds",
                               "From arrival to the first engine step that takes the request "
                               "(adapter loading included).",
                               adapter, buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("adapterkit_time_to_first_token_seconds", "From arrival to the first generated token.",
                              adapter, buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("adapterkit_time_per_output_token_seconds",
                              "Mean time between generated tokens, per request.", adapter,
                              buckets=TOKEN_BUCKETS, registry=registry)
        self.latency = Histogram("adapterkit_request_latency_seconds", "From arrival to the last token.", adapter,
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.errors = PromCounter("adapterkit_http_errors", "Requests refused or failed, by HTTP status.", ["status"],
                                  registry=registry)
        self.steps = PromCounter("adapterkit_engine_steps", "Engine steps run.", registry=registry)
        self.adapter_loads = PromCounter("adapterkit_adapter_loads",
                                         "Adapters read from the folder: loads on first use, after eviction, "
                                         "and reloads.", registry=registry)
        self.step_rows = Histogram("adapterkit_engine_step_rows",
                                   "Rows that generated a token in an engine step (sum / count: the mean batch).",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
        self._recent_steps: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)
        Gauge("adapterkit_tokens_per_second", "Tokens generated per second over the last 10 seconds.",
              registry=registry
              ).set_function(self._tokens_per_second)
        Gauge("adapterkit_rows_in_flight", "Rows being prefilled or decoded.", registry=registry
              ).set_function(lambda: server.engine.in_flight)
        Gauge("adapterkit_requests_queued", "Requests waiting for an adapter or a place in the batch.",
              registry=registry
              ).set_function(lambda: server.queued)
        Gauge("adapterkit_adapters_resident", "Adapters loaded now.", registry=registry
              ).set_function(lambda: len(server.pool.resident))

    def step(self, tokens: int) -> None:
        """One engine step that generated ``tokens`` tokens (one per row that took part)."""
        self.steps.inc()
        self.step_rows.observe(tokens)
        self._recent_steps.append((time.perf_counter(), tokens))

    def _tokens_per_second(self) -> float:
        since = time.perf_counter() - 10.0
        return sum(tokens for when, tokens in list(self._recent_steps) if when >= since) / 10.0

    def finished(self, label: str, generation: Generation, arrived: float) -> None:
        outcome = {"stop": "ok", "length": "ok"}.get(generation.finish_reason, generation.finish_reason)
        self.requests.labels(label, outcome).inc()
        self.prompt_tokens.labels(label).inc(len(generation.prompt))
        self.completion_tokens.labels(label).inc(len(generation.tokens))
        if generation.started is not None:
            self.queue.labels(label).observe(generation.started - arrived)
        if generation.first_token is not None:
            self.ttft.labels(label).observe(generation.first_token - arrived)
            if len(generation.tokens) > 1:
                per_token = (generation.finished - generation.first_token) / (len(generation.tokens) - 1)
                self.tpot.labels(label).observe(per_token)
        self.latency.labels(label).observe(generation.finished - arrived)

    def render(self) -> bytes:
        return generate_latest(self.registry)

