"""Prometheus metrics, in one registry per server so tests can run several apps in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # the *_created series only add noise to scrapes

LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
TOKEN_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)


class ServerMetrics:
    """Requests, tokens, time to first token, time per output token, queue depth; labelled by variant."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "slimserve_requests",
            "Requests finished, by endpoint and HTTP status.",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "slimserve_prompt_tokens", "Prompt tokens processed.", ["model"], registry=self.registry
        )
        self.completion_tokens = Counter(
            "slimserve_completion_tokens", "Tokens generated.", ["model"], registry=self.registry
        )
        self.ttft = Histogram(
            "slimserve_time_to_first_token_seconds",
            "Time from a sequence's arrival at the engine to its first generated token.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "slimserve_time_per_output_token_seconds",
            "Time between consecutive generated tokens of one sequence.",
            ["model"],
            buckets=TOKEN_BUCKETS_S,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "slimserve_queue_depth", "Sequences waiting for a batch slot.", ["model"], registry=self.registry
        )
        self.running = Gauge(
            "slimserve_running_sequences", "Sequences in the running batch.", ["model"], registry=self.registry
        )

        self.loads = Counter(
            "slimserve_variant_loads", "Variants loaded into memory.", ["model"], registry=self.registry
        )
        self.evictions = Counter(
            "slimserve_variant_evictions",
            "Variants evicted to make room (LRU, idle).",
            ["model"],
            registry=self.registry,
        )
        self.resident_mb = Gauge(
            "slimserve_variant_resident_mb",
            "Estimated resident memory of a loaded variant.",
            ["model"],
            registry=self.registry,
        )
        self.routed = Counter(
            "slimserve_routed_requests",
            "Requests the router sent to a variant, by whether its latency budget was predicted to be met.",
            ["model", "budget"],
            registry=self.registry,
        )
        self.budget_outcome = Counter(
            "slimserve_budget_outcomes",
            "Routed requests with a latency budget, by whether they finished within it.",
            ["model", "outcome"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
