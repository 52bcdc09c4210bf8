"""The simulator's /metrics text: vLLM's names, labels and bucket layouts."""

from prometheus_client.parser import text_string_to_metric_families

from gpufleet.sim.metrics import PER_TOKEN_BUCKETS, TTFT_BUCKETS, SimMetrics, build_1_2_5_buckets


def families(metrics: SimMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def test_vllm_names_labels_and_process_start_time():
    metrics = SimMetrics("served", 4096, running=lambda: 3, waiting=lambda: 2, kv_usage=lambda: 0.25)
    found = families(metrics)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:inter_token_latency_seconds", "vllm:request_success", "vllm:prompt_tokens",
                 "vllm:generation_tokens", "process_start_time_seconds"):
        assert name in found, name
    running = found["vllm:num_requests_running"].samples[0]
    assert running.labels == {"model_name": "served", "engine": "0"} and running.value == 3
    assert found["vllm:kv_cache_usage_perc"].samples[0].value == 0.25
    reasons = {s.labels["finished_reason"] for s in found["vllm:request_success"].samples}
    assert reasons == {"stop", "length", "abort", "error", "repetition"}  # as vLLM 0.32
    assert found["vllm:prompt_tokens"].type == "counter"
    text = metrics.render().decode()
    assert 'vllm:prompt_tokens_total{engine="0",model_name="served"} 0.0' in text


def test_histogram_buckets_are_vllms_and_cumulative():
    metrics = SimMetrics("m", 4096, running=lambda: 0, waiting=lambda: 0, kv_usage=lambda: 0)
    metrics.ttft.observe(0.03)
    metrics.ttft.observe(0.04)        # on a bound: counts in le="0.04"
    metrics.ttft.observe(5000)        # beyond the last bound
    metrics.itl.observe(0.0, 7)
    found = families(metrics)
    ttft = {s.labels["le"]: s.value for s in found["vllm:time_to_first_token_seconds"].samples
            if s.name.endswith("_bucket")}
    assert list(ttft) == [str(b) for b in TTFT_BUCKETS] + ["+Inf"]
    assert (ttft["0.02"], ttft["0.04"], ttft["2560.0"], ttft["+Inf"]) == (0, 2, 2, 3)
    samples = {s.name: s.value for s in found["vllm:inter_token_latency_seconds"].samples
               if not s.name.endswith("_bucket")}
    assert samples["vllm:inter_token_latency_seconds_count"] == 7
    itl_bounds = [s.labels["le"] for s in found["vllm:inter_token_latency_seconds"].samples
                  if s.name.endswith("_bucket")]
    assert itl_bounds == [str(b) for b in PER_TOKEN_BUCKETS] + ["+Inf"]


def test_1_2_5_buckets():
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(4096)[-1] == 2000


def test_step_engine_families_prefix_cache_from_the_scheduler_and_cache_config_info():
    from gpufleet.sim.metrics import ITERATION_TOKENS_BUCKETS
    from gpufleet.sim.scheduler import SchedulerStats

    stats = SchedulerStats(queries=1000, hits=640, preemptions=1)
    metrics = SimMetrics("m", 4096, running=lambda: 0, waiting=lambda: 0, kv_usage=lambda: 0, cache_stats=stats,
                         cache_info={"block_size": 16, "num_gpu_blocks": 4096, "enable_prefix_caching": True})
    metrics.iteration_tokens.observe(300)
    found = families(metrics)
    value = {s.name: s.value for f in found.values() for s in f.samples if not s.labels.get("le")}
    assert value["vllm:prefix_cache_queries_total"] == 1000 and value["vllm:prefix_cache_hits_total"] == 640
    assert value["vllm:num_preemptions_total"] == 1 and value["vllm:prompt_tokens_cached_total"] == 0
    bounds = [s.labels["le"] for s in found["vllm:iteration_tokens_total"].samples if s.name.endswith("_bucket")]
    assert bounds == [str(float(b)) for b in ITERATION_TOKENS_BUCKETS] + ["+Inf"]
    (info,) = found["vllm:cache_config_info"].samples
    assert info.value == 1
    assert info.labels == {"block_size": "16", "num_gpu_blocks": "4096", "enable_prefix_caching": "True",
                           "engine": "0"}
