"""Reading vLLM's Prometheus text into the few numbers the agent reports. Pure: no I/O.

vLLM serves one model per process, so series are summed over their labels
(``model_name``, ``finished_reason``, ``engine``…) rather than filtered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from .window import HistogramSnapshot

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_CACHE = "vllm:kv_cache_usage_perc"
KV_CACHE_LEGACY = "vllm:gpu_cache_usage_perc"  # vLLM < 0.10
TTFT = "vllm:time_to_first_token_seconds"
E2E = "vllm:e2e_request_latency_seconds"
SUCCESS = "vllm:request_success_total"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"  # prompt tokens looked up in the prefix cache
PREFIX_HITS = "vllm:prefix_cache_hits_total"        # of which found there
PROCESS_START = "process_start_time_seconds"


@dataclass
class VllmSample:
    waiting: float = 0.0
    running: float = 0.0
    kv_cache_usage: float = 0.0  # 0..1
    request_success_total: float | None = None
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None
    process_start_time: float | None = None
    ttft: HistogramSnapshot | None = None
    e2e: HistogramSnapshot | None = None
    gauges: dict[str, float] = field(default_factory=dict)


def parse_vllm_metrics(text: str) -> VllmSample:
    """The sample in ``text``; unknown or missing metrics read as 0 / None."""
    sums: dict[str, float] = {}
    histograms: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if math.isnan(sample.value):
                continue
            base = _histogram_of(sample.name)
            if base is not None:
                _add_histogram_sample(histograms.setdefault(base, {}), base, sample)
            else:
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    kv = sums.get(KV_CACHE)
    if kv is None:
        kv = sums.get(KV_CACHE_LEGACY, 0.0)
    return VllmSample(
        waiting=sums.get(WAITING, 0.0),
        running=sums.get(RUNNING, 0.0),
        kv_cache_usage=kv,
        request_success_total=sums.get(SUCCESS, sums.get(SUCCESS.removesuffix("_total"))),
        prefix_cache_queries=sums.get(PREFIX_QUERIES),
        prefix_cache_hits=sums.get(PREFIX_HITS),
        process_start_time=sums.get(PROCESS_START),
        ttft=_snapshot(histograms.get(TTFT)),
        e2e=_snapshot(histograms.get(E2E)),
        gauges=sums,
    )


def _histogram_of(sample_name: str) -> str | None:
    for base in (TTFT, E2E):
        if sample_name.startswith(base) and sample_name[len(base):] in ("_bucket", "_count", "_sum"):
            return base
    return None


def _add_histogram_sample(acc: dict, family_name: str, sample) -> None:
    suffix = sample.name[len(family_name):]
    if suffix == "_bucket":
        le = float(sample.labels.get("le", "inf"))
        buckets = acc.setdefault("buckets", {})
        buckets[le] = buckets.get(le, 0.0) + sample.value
    elif suffix == "_count":
        acc["count"] = acc.get("count", 0.0) + sample.value
    elif suffix == "_sum":
        acc["sum"] = acc.get("sum", 0.0) + sample.value


def _snapshot(acc: dict | None) -> HistogramSnapshot | None:
    if not acc or not acc.get("buckets"):
        return None
    buckets = tuple(sorted(acc["buckets"].items()))
    count = acc.get("count", buckets[-1][1])
    return HistogramSnapshot(buckets=buckets, count=count, total=acc.get("sum", 0.0))
