"""Prometheus metrics for the server: engine state read at scrape time, request timings observed as they finish."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvserve.core.engine.stats import engine_stats

PREFIX = "kvserve:"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class EngineCollector:
    """Reads the engine's counters and queues each time /metrics is scraped."""

    def __init__(self, async_engine_ref):
        self.async_engine_ref = async_engine_ref   # a callable: the engine may still be loading

    def collect(self):
        async_engine = self.async_engine_ref()
        if async_engine is None:
            return
        engine = async_engine.engine
        stats = engine_stats(engine)   # one engine's, or summed over a data-parallel engine's replicas
        gauges = {
            "num_requests_running": ("Requests with a sequence running in the engine", stats.running),
            "num_requests_waiting": ("Requests waiting for admission", stats.waiting),
            "num_requests_swapped": ("Requests preempted with their KV blocks in host memory", stats.swapped),
            "kv_cache_usage_perc": ("Fraction of KV cache blocks in use (1 = full)",
                                    1.0 - stats.num_free_blocks / stats.num_blocks),
            "kv_cache_free_blocks": ("KV cache blocks free", stats.num_free_blocks),
        }
        for name, (doc, value) in gauges.items():
            family = GaugeMetricFamily(PREFIX + name, doc)
            family.add_metric([], value)
            yield family
        counters = {
            "prompt_tokens": ("Prompt tokens computed", stats.prompt_tokens),
            "generation_tokens": ("Tokens generated", stats.generation_tokens),
            "failed_steps": ("Model steps that raised", async_engine.failed_steps),
            "num_preemptions": ("Sequences preempted for lack of KV blocks", stats.num_preemptions),
            "num_swap_outs": ("Preempted sequences whose blocks went to host memory", stats.num_swap_outs),
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache", stats.prefix_queries),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache", stats.prefix_hits),
            "spec_decode_num_drafts": ("Speculative proposals verified", stats.spec_verifications),
            "spec_decode_num_draft_tokens": ("Tokens proposed by speculation", stats.spec_proposed_tokens),
            "spec_decode_num_accepted_tokens": ("Proposed tokens accepted", stats.spec_accepted_tokens),
        }
        for name, (doc, value) in counters.items():
            family = CounterMetricFamily(PREFIX + name, doc)
            family.add_metric([], value)
            yield family
        if engine.config.speculation is not None:
            family = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                         "Verifications that accepted the proposed token at this position",
                                         labels=["position"])
            for position in range(engine.config.speculation.num_speculative_tokens):
                family.add_metric([str(position)], stats.spec_accepted_per_position[position])
            yield family


class ServerMetrics:
    def __init__(self, async_engine_ref):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(async_engine_ref))
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Time per output token after the first",
                              buckets=TPOT_BUCKETS, registry=self.registry)
        self.success = Counter(PREFIX + "request_success", "Requests finished, by the first choice's finish reason",
                               ["finished_reason"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one request's time to first token and time per output token."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.start = time.perf_counter()
        self.first: float | None = None

    def on_output(self, output) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.start)
        if output.finished:
            generated = max(len(c.token_ids) for c in output.outputs)
            if generated > 1:
                self.metrics.tpot.observe((now - self.first) / (generated - 1))
            self.metrics.success.labels(finished_reason=output.outputs[0].finish_reason).inc()
