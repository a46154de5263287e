"""Prometheus metrics for the server: engine state read at scrape time, request timings observed as they finish.

Each family is served under its ``kvserve:`` name and, where vLLM has one, under vLLM's ``vllm:`` name(s) too, with
vLLM's ``model_name`` label, so that dashboards built for vLLM read kvserve unchanged (docs/metrics.md). The ``vllm:``
families are copies of the ``kvserve:`` ones made at scrape time: one measurement, two names."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvserve.core.engine.stats import engine_stats

PREFIX = "kvserve:"
VLLM_PREFIX = "vllm:"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0)
TOKEN_BUCKETS = tuple(m * 10 ** e for e in range(6) for m in (1, 2, 5))   # 1, 2, 5, 10, ... 500000

# kvserve name -> the vLLM names it is also served under. The first is vLLM's current name; a second is an older
# name that vLLM's example Grafana dashboard (examples/online_serving/prometheus_grafana) still reads.
# Families missing here have no vLLM counterpart: kv_cache_free_blocks, failed_steps, num_swap_outs.
VLLM_NAMES = {
    "num_requests_running": ("num_requests_running",),
    "num_requests_waiting": ("num_requests_waiting",),
    "num_requests_swapped": ("num_requests_swapped",),   # vLLM V0's; V1 does not swap
    "kv_cache_usage_perc": ("kv_cache_usage_perc", "gpu_cache_usage_perc"),
    "prompt_tokens": ("prompt_tokens",),
    "generation_tokens": ("generation_tokens",),
    "num_preemptions": ("num_preemptions",),
    "prefix_cache_queries": ("prefix_cache_queries",),
    "prefix_cache_hits": ("prefix_cache_hits",),
    "spec_decode_num_drafts": ("spec_decode_num_drafts",),
    "spec_decode_num_draft_tokens": ("spec_decode_num_draft_tokens",),
    "spec_decode_num_accepted_tokens": ("spec_decode_num_accepted_tokens",),
    "spec_decode_num_accepted_tokens_per_pos": ("spec_decode_num_accepted_tokens_per_pos",),
    "request_success": ("request_success",),
    "time_to_first_token_seconds": ("time_to_first_token_seconds",),
    "inter_token_latency_seconds": ("inter_token_latency_seconds", "time_per_output_token_seconds"),
    "time_per_output_token_seconds": ("request_time_per_output_token_seconds",),   # per request, as kvserve's
    "e2e_request_latency_seconds": ("e2e_request_latency_seconds",),
    "request_prompt_tokens": ("request_prompt_tokens",),
    "request_generation_tokens": ("request_generation_tokens",),
}


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


def renamed(family: Metric, name: str, model_name: str) -> Metric:
    """``family`` under another name (its samples' suffixes kept: _total, _bucket, ...), labelled with the model."""
    copy = Metric(name, family.documentation, family.type)
    copy.samples = [sample._replace(name=name + sample.name[len(family.name):],
                                    labels={"model_name": model_name, **sample.labels})
                    for sample in family.samples]
    return copy


class ServerMetrics:
    """The server's metrics; a prometheus_client collector whose ``collect`` yields the ``kvserve:`` families of
    ``registry`` and then their ``vllm:`` copies, labelled with ``model_name`` (the first served name, as vLLM's)."""

    def __init__(self, async_engine_ref, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(async_engine_ref))

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=buckets, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between a request's outputs after the first",
                             TPOT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "A request's mean time per output token after the "
                              "first", TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from a request's start to its last output",
                             E2E_BUCKETS)
        self.prompt_len = histogram("request_prompt_tokens", "A finished request's prompt tokens", TOKEN_BUCKETS)
        self.generation_len = histogram("request_generation_tokens", "A finished request's generated tokens, "
                                        "summed over its choices", TOKEN_BUCKETS)
        self.success = Counter(PREFIX + "request_success", "Requests finished, by the first choice's finish reason",
                               ["finished_reason"], registry=self.registry)

    def collect(self):
        families = list(self.registry.collect())
        yield from families
        for family in families:
            for name in VLLM_NAMES.get(family.name.removeprefix(PREFIX), ()):
                yield renamed(family, VLLM_PREFIX + name, self.model_name)

    def render(self) -> bytes:
        return generate_latest(self)


class RequestTimer:
    """Observes one engine request's latencies and, when it finishes, its lengths and finish reason."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None

    def on_output(self, output) -> None:
        now = time.perf_counter()
        metrics = self.metrics
        if self.first is None:
            self.first = now
            metrics.ttft.observe(now - self.start)
        else:
            metrics.itl.observe(now - self.last)
        self.last = now
        if output.finished:
            generated = max(len(c.token_ids) for c in output.outputs)
            if generated > 1:
                metrics.tpot.observe((now - self.first) / (generated - 1))
            metrics.e2e.observe(now - self.start)
            metrics.prompt_len.observe(len(output.prompt_token_ids))
            metrics.generation_len.observe(sum(len(c.token_ids) for c in output.outputs))
            metrics.success.labels(finished_reason=output.outputs[0].finish_reason).inc()
