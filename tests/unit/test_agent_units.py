"""Pure parts of the agent: vLLM metric parsing, readiness, tokens on disk, back-off, GPUs."""

import logging
import os
import random
import stat

import pytest

from gpufleet.agent import readiness
from gpufleet.agent.backoff import Backoff
from gpufleet.agent.gpus import GpuReader
from gpufleet.agent.tokens import TokenStore, read_token_file, write_token_file
from gpufleet.agent.vllm_metrics import parse_vllm_metrics

VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 10.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 5.0
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 672.0
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 256.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.25",model_name="m"} 14.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 15.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 15.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 3.1
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1.7e9
"""


def test_parse_vllm_metrics_sums_series_and_reads_histograms():
    sample = parse_vllm_metrics(VLLM_TEXT)
    assert (sample.running, sample.waiting, sample.kv_cache_usage) == (2, 4, 0.25)
    assert sample.request_success_total == 15
    assert (sample.prefix_cache_queries, sample.prefix_cache_hits) == (672, 256)
    assert sample.process_start_time == 1.7e9
    assert sample.ttft.count == 15 and sample.ttft.total == pytest.approx(3.1)
    assert sample.ttft.buckets == ((0.1, 1.0), (0.25, 14.0), (float("inf"), 15.0))
    assert sample.e2e is None


def test_parse_falls_back_to_the_legacy_kv_cache_gauge():
    text = "# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\n"
    sample = parse_vllm_metrics(text)
    assert sample.kv_cache_usage == 0.5 and sample.running == 0 and sample.ttft is None


def test_prefix_cache_hit_ratio_over_the_window():
    from gpufleet.agent.config import load_config
    from gpufleet.agent.vllm import VllmMonitor
    from gpufleet.agent.vllm_metrics import VllmSample

    now = [100.0]
    monitor = VllmMonitor(load_config({"INSTANCE_ID": "i", "CONTROL_PLANE_URL": "http://127.0.0.1:9", "MODEL_ID": "m"}))
    monitor._clock = lambda: now[0]
    assert monitor.prefix_cache_hit_ratio() == 0.0
    monitor.observe_sample(VllmSample(prefix_cache_queries=1000, prefix_cache_hits=900))  # before the window
    now[0] += 1
    monitor.observe_sample(VllmSample(prefix_cache_queries=1400, prefix_cache_hits=1000))
    assert monitor.prefix_cache_hit_ratio() == 0.25  # 100 of the 400 tokens queried meanwhile


def _inputs(**overrides):
    base = dict(vllm_healthy=True, vllm_detail="ok", poll_stale=False, model_listed=True, model_detail="ok",
                warmed=True, warmup_detail="ok", token_held=True, registration_accepted=True,
                registration_detail="ok", draining=False)
    base.update(overrides)
    return readiness.Inputs(**base)


def test_ready_only_when_every_condition_holds():
    ready, _ = readiness.verdict(_inputs())
    assert ready and readiness.local_status(_inputs()) == "ready"
    for field, check in [("vllm_healthy", "vllm_health"), ("model_listed", "model_listed"), ("warmed", "warmup"),
                         ("token_held", "token"), ("registration_accepted", "registration"),
                         ("draining", "not_draining")]:
        value = field == "draining"
        ready, checks = readiness.verdict(_inputs(**{field: value}))
        assert not ready
        assert check in [c.name for c in checks if not c.ok], field


def test_a_stale_poll_is_not_healthy_and_status_follows_local_conditions():
    ready, checks = readiness.verdict(_inputs(poll_stale=True))
    failing = {c.name: c.detail for c in checks if not c.ok}
    assert not ready and "not polled recently" in failing["vllm_health"]
    assert readiness.local_status(_inputs(warmed=False)) == "starting"
    # the heartbeat status does not depend on the control plane's verdict (that would be circular)
    assert readiness.local_status(_inputs(registration_accepted=False, token_held=False)) == "ready"
    assert readiness.local_status(_inputs(draining=True)) == "draining"


def test_token_file_is_written_atomically_with_mode_0600(tmp_path):
    path = tmp_path / "token"
    write_token_file(str(path), "gfw_first")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_token_file(str(path)) == "gfw_first"
    write_token_file(str(path), "gfw_second")
    assert read_token_file(str(path)) == "gfw_second"
    assert sorted(os.listdir(tmp_path)) == ["token"]  # no temp files left behind


def test_token_store_sources_and_reload(tmp_path, caplog):
    path = tmp_path / "token"
    store = TokenStore(None, str(path))
    assert store.token is None and store.source == "none"
    with caplog.at_level(logging.INFO):
        store.store_bootstrapped("gfw_bootstrapped_secret")
    assert "gfw_bootstrapped_secret" not in caplog.text
    assert TokenStore(None, str(path)).token == "gfw_bootstrapped_secret"  # reloaded at start
    assert TokenStore("gfw_from_env", str(path)).token == "gfw_from_env"  # the explicit setting wins
    assert not store.reload_if_changed()
    write_token_file(str(path), "gfw_rotated")
    assert store.reload_if_changed() and store.token == "gfw_rotated"


def test_backoff_grows_to_the_cap_with_jitter_and_resets():
    backoff = Backoff(base_s=0.5, cap_s=8, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [0.5, 1, 2, 4, 8, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_no_nvidia_driver_means_zero_gpus_logged_once(caplog):
    if GpuReader().read():
        pytest.skip("this host has NVIDIA GPUs")
    caplog.clear()
    reader = GpuReader()  # the real pynvml; the test hosts have no driver
    with caplog.at_level(logging.WARNING, logger="gpufleet.agent.gpus"):
        assert reader.read() == []
        assert reader.read() == []
    assert len([r for r in caplog.records if "NVML is not available" in r.getMessage()]) == 1
    assert reader.unavailable_reason


def test_a_new_vllm_process_start_time_forgets_the_warm_up():
    from gpufleet.agent.config import load_config
    from gpufleet.agent.vllm import VllmMonitor
    from gpufleet.agent.vllm_metrics import VllmSample

    monitor = VllmMonitor(load_config({"INSTANCE_ID": "i", "CONTROL_PLANE_URL": "http://127.0.0.1:9", "MODEL_ID": "m"}))
    monitor.observe_sample(VllmSample(process_start_time=1000.0, running=1))
    monitor.snapshot.warmed = True
    epoch = monitor.snapshot.epoch
    monitor.observe_sample(VllmSample(process_start_time=1000.0, running=2))
    assert monitor.snapshot.warmed and monitor.snapshot.sample.running == 2
    monitor.observe_sample(VllmSample(process_start_time=1042.0))  # restarted between two polls
    assert not monitor.snapshot.warmed and monitor.snapshot.epoch > epoch
    assert "restarted" in monitor.snapshot.warmup_detail


def test_registrar_waits_the_interval_when_well_and_backs_off_when_not():
    from gpufleet.agent.config import load_config
    from gpufleet.agent.registration import Registrar

    config = load_config({"INSTANCE_ID": "i", "CONTROL_PLANE_URL": "http://127.0.0.1:9", "MODEL_ID": "m",
                          "HEARTBEAT_INTERVAL_S": "2", "CONTROL_PLANE_RETRY_MAX_S": "8"})
    registrar = Registrar(config, TokenStore(), dict, dict)
    assert registrar.next_delay(True) == 2.0
    failures = [registrar.next_delay(False) for _ in range(8)]
    assert failures[0] <= 0.5 and max(failures) <= 8 and failures[-1] >= 4  # grows to the cap
    registrar.registered = True  # a failed heartbeat is retried no later than the next interval
    assert all(registrar.next_delay(False) <= 2.0 for _ in range(5))
    registrar._adopt_interval({"heartbeat_interval_s": 1})
    assert registrar.next_delay(True) == 1.0


def test_an_unwritable_token_file_keeps_the_token_in_memory(tmp_path, caplog):
    folder = tmp_path / "gone"
    folder.mkdir()
    store = TokenStore(None, str(folder / "token"))
    folder.rmdir()  # e.g. the folder vanished after the start-up check
    with caplog.at_level(logging.ERROR):
        store.store_bootstrapped("gfw_kept_in_memory_only")
    assert store.token == "gfw_kept_in_memory_only"
    assert "could not write the worker token" in caplog.text and "gfw_kept" not in caplog.text
