"""Prometheus metrics, on a registry of our own so tests and embedders can create several apps."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from llm_endpoint.backends.base import BackendStats

# Token latencies on CPU run from milliseconds to seconds; request latencies up to minutes.
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, stats: Callable[[], BackendStats], open_sessions: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llm_requests", "Finished HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.queue_depth = Gauge("llm_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.queue_depth.set_function(lambda: stats().waiting)
        self.running = Gauge("llm_running_batch_size", "Requests in the running batch", registry=r)
        self.running.set_function(lambda: stats().running)
        self.kv_blocks = Gauge("llm_kv_cache_blocks", "KV-cache blocks of the engine's pool (ours only)", ["state"],
                               registry=r)
        self.kv_blocks.labels("used").set_function(lambda: stats().kv_blocks_used)
        self.kv_blocks.labels("free").set_function(lambda: stats().kv_blocks_free)
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds", "Time from request arrival to its first token",
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "llm_inter_token_latency_seconds", "Time between consecutive tokens of one request",
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "llm_request_duration_seconds", "Time from request arrival to its last token",
            buckets=_REQUEST_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.sessions = Gauge("llm_sessions_open", "Open stateful sessions", registry=r)
        self.sessions.set_function(open_sessions)
        self.session_kv = Gauge("llm_session_kv_cache_bytes", "KV cache idle stateful sessions keep (ours only)",
                                registry=r)
        self.session_kv.set_function(lambda: stats().session_kv_bytes)
        self.session_prompt_tokens = Counter(
            "llm_session_prompt_tokens", "Prompt tokens of session turns: reused from the engine's cache or computed",
            ["source"], registry=r,
        )
        self.generated_tokens = Counter("llm_generation_tokens", "Tokens generated", registry=r)
        self.draft_tokens = Counter(
            "llm_draft_tokens",
            "Prompt-lookup draft tokens proposed (ours, vLLM) and accepted by verification (ours, vLLM, OpenVINO)",
            ["result"], registry=r,
        )
        r.register(_EngineSteps(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineSteps(Collector):
    """`llm_engine_steps_total{forward=compiled|eager}`: the engine counts its steps, this reads them (a
    Counter cannot take its value from a function), so users can see that `option.compile_decode` is used."""

    def __init__(self, stats: Callable[[], BackendStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        family = CounterMetricFamily("llm_engine_steps", "Forward steps of our engine, through torch.compile "
                                     "(option.compile_decode) or eager", labels=["forward"])
        family.add_metric(["compiled"], stats.compiled_steps)
        family.add_metric(["eager"], stats.eager_steps)
        yield family
