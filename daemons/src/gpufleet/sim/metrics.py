"""vLLM's Prometheus metrics (names, labels and buckets of vLLM v1's PrometheusStatLogger),
in one registry per app, plus the process collector (``process_start_time_seconds``
tells the agent that vLLM restarted).

The vLLM series are plain counters read by a custom collector at scrape time: the event
loop is single-threaded, so they need no locks, and a decode step costs one list update
instead of a locked ``Histogram.observe`` (which showed in profiles at 1,000s of req/s).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

LABELS = ("model_name", "engine")
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")  # vLLM 0.32 exports all five

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
PER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                     7.5, 10.0, 20.0, 40.0, 80.0)
# tokens per engine step: powers of two up to a typical max-num-batched-tokens (vLLM 0.32)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, … up to ``max_value`` (vLLM's token-count buckets)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class Count:
    __slots__ = ("value",)

    def __init__(self):
        self.value = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Histo:
    """Per-bucket counts (not cumulative) and a sum; ``observe(value, n)`` records n equal values."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = [float(b) for b in bounds] + [math.inf]
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def family(self, name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=LABELS)
        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds, self.counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric(labels, buckets, self.sum)
        return family


class SimMetrics:
    def __init__(self, model_name: str, max_model_len: int, *, running: Callable[[], float],
                 waiting: Callable[[], float], kv_usage: Callable[[], float], cache_stats=None,
                 cache_info: dict | None = None):
        self._labels = [model_name, "0"]
        # the scheduler's counters (prefix-cache queries and hits in tokens, preemptions), read at scrape time
        self._cache_stats = cache_stats
        # vllm:cache_config_info: an info-style gauge set to 1, labelled with the cache settings
        # (vLLM labels it with every CacheConfig field and ``engine``; here, those that are simulated)
        self._cache_info = {key: str(value) for key, value in (cache_info or {}).items()}
        self._gauges = [
            ("vllm:num_requests_running", "Number of requests in model execution batches.", running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv_usage),
            ("vllm:gpu_cache_usage_perc",
             "GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: Use vllm:kv_cache_usage_perc instead.",
             kv_usage),
        ]
        self.prompt_tokens = Count()
        self.generation_tokens = Count()
        self.prompt_tokens_cached = Count()
        self.success = {reason: Count() for reason in FINISH_REASONS}
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = Histo(token_buckets)
        self.request_generation_tokens = Histo(token_buckets)
        self.request_max_tokens = Histo(token_buckets)
        self.ttft = Histo(TTFT_BUCKETS)
        self.itl = Histo(PER_TOKEN_BUCKETS)
        self.tpot = Histo(PER_TOKEN_BUCKETS)
        self.e2e = Histo(REQUEST_LATENCY_BUCKETS)
        self.queue_time = Histo(REQUEST_LATENCY_BUCKETS)
        self.inference_time = Histo(REQUEST_LATENCY_BUCKETS)
        self.prefill_time = Histo(REQUEST_LATENCY_BUCKETS)
        self.decode_time = Histo(REQUEST_LATENCY_BUCKETS)
        self.iteration_tokens = Histo(ITERATION_TOKENS_BUCKETS)
        self._histograms = [
            ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", self.request_prompt_tokens),
            ("vllm:request_generation_tokens", "Number of generation tokens processed.",
             self.request_generation_tokens),
            ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
             self.request_max_tokens),
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", self.itl),
            ("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", self.tpot),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", self.e2e),
            ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
             self.queue_time),
            ("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
             self.inference_time),
            ("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
             self.prefill_time),
            ("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
             self.decode_time),
            ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", self.iteration_tokens),
        ]
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(self)

    def collect(self):
        labels = self._labels
        for name, doc, read in self._gauges:
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            family.add_metric(labels, float(read()))
            yield family
        stats = self._cache_stats
        for name, doc, value in (
                ("vllm:prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens.value),
                ("vllm:generation_tokens", "Number of generation tokens processed.", self.generation_tokens.value),
                ("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                 stats.preemptions if stats is not None else 0),
                ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                 stats.queries if stats is not None else 0),
                ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                 stats.hits if stats is not None else 0),
                ("vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).",
                 self.prompt_tokens_cached.value)):
            family = CounterMetricFamily(name, doc, labels=LABELS)
            family.add_metric(labels, value)
            yield family
        if self._cache_info:
            names = list(self._cache_info) + ["engine"]
            family = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                       labels=names)
            family.add_metric(list(self._cache_info.values()) + ["0"], 1.0)
            yield family
        family = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                     labels=LABELS + ("finished_reason",))
        for reason, count in self.success.items():
            family.add_metric(labels + [reason], count.value)
        yield family
        for name, doc, histo in self._histograms:
            yield histo.family(name, doc, labels)

    def observe_finished(self, *, reason: str, prompt_tokens: int, generated: int, max_tokens: int,
                         arrival: float, scheduled: float, first_token: float | None, finished: float) -> None:
        self.success[reason].inc()
        self.e2e.observe(finished - arrival)
        self.queue_time.observe(scheduled - arrival)
        self.inference_time.observe(finished - scheduled)
        if first_token is not None:
            self.prefill_time.observe(first_token - scheduled)
            self.decode_time.observe(finished - first_token)
            if generated > 1:
                self.tpot.observe((finished - first_token) / (generated - 1))
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generated)
        self.request_max_tokens.observe(max_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
