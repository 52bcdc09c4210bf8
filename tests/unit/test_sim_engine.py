"""The simulated engine without sockets: finish reasons, stop strings, timing, metrics."""

import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.sim import textgen
from gpufleet.sim.engine import Engine
from gpufleet.sim.latency import LatencyModel
from gpufleet.sim.metrics import SimMetrics
from gpufleet.sim.protocol import Limits, parse_completion

LIMITS = Limits(("m",), 4096, 16)


def engine(latency=None, natural=(32, 64), max_num_seqs=4) -> Engine:
    return Engine(latency=latency or LatencyModel(0, 0, 0, 0, 0), max_num_seqs=max_num_seqs,
                  kv_capacity_tokens=1000, seed=0, natural_range=natural,
                  metrics_factory=lambda **g: SimMetrics("m", 4096, **g))


def sample(eng: Engine, name: str, **labels) -> float:
    for family in text_string_to_metric_families(eng.metrics.render().decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_length_finish_matches_the_deterministic_stream():
    eng = engine()
    req = parse_completion({"prompt": "hello", "max_tokens": 10}, LIMITS)
    out = run(eng.run(req))
    expected = "".join(textgen.TokenStream(textgen.seed_for("hello", 0), (32, 64)).take(10))
    assert (out.text, out.finish_reason, out.completion_tokens) == (expected, "length", 10)
    assert sample(eng, "vllm:request_success_total", finished_reason="length") == 1
    assert sample(eng, "vllm:generation_tokens_total") == 10
    assert sample(eng, "vllm:prompt_tokens_total") == 1
    assert sample(eng, "vllm:inter_token_latency_seconds_count") == 9
    assert sample(eng, "vllm:num_requests_running") == 0


def test_natural_end_is_stop_with_eos_counted():
    eng = engine(natural=(5, 5))
    out = run(eng.run(parse_completion({"prompt": "p", "max_tokens": 50}, LIMITS)))
    assert (out.finish_reason, out.stop_reason, out.completion_tokens) == ("stop", None, 6)
    ignore = run(eng.run(parse_completion({"prompt": "p", "max_tokens": 50, "ignore_eos": True}, LIMITS)))
    assert (ignore.finish_reason, ignore.completion_tokens) == ("length", 50)


def test_request_seed_overrides_server_seed():
    eng = engine()
    a = run(eng.run(parse_completion({"prompt": "p", "seed": 5}, LIMITS)))
    b = run(eng.run(parse_completion({"prompt": "p", "seed": 5}, LIMITS)))
    c = run(eng.run(parse_completion({"prompt": "p", "seed": 6}, LIMITS)))
    assert a.text == b.text != c.text


def test_stop_string_truncates_and_streams_the_same_text():
    eng = engine()
    full = run(eng.run(parse_completion({"prompt": "q", "max_tokens": 12}, LIMITS))).text
    word = full.split()[3]
    req = parse_completion({"prompt": "q", "max_tokens": 12, "stop": [word]}, LIMITS)
    out = run(eng.run(req))
    assert out.finish_reason == "stop" and out.stop_reason == word
    assert out.text == full[:full.index(word)]
    pieces = []

    async def emit(text, finish, stop_reason):
        pieces.append((text, finish, stop_reason))

    streamed = run(eng.run(req, emit))
    assert "".join(p[0] for p in pieces) == out.text == streamed.text
    assert pieces[-1][1:] == ("stop", word)
    assert all(p[1] is None for p in pieces[:-1])


def test_latency_model_is_slept():
    eng = engine(LatencyModel(ttft_s=0.1, itl_s=0.02, prefill_s_per_token=0, jitter=0, slowdown_per_seq=0))
    req = parse_completion({"prompt": "p", "max_tokens": 11}, LIMITS)
    started = time.monotonic()
    run(eng.run(req))
    elapsed = time.monotonic() - started
    assert 0.3 - 0.02 <= elapsed < 1.5          # 100 ms + 10 x 20 ms
    assert 0.1 <= sample(eng, "vllm:time_to_first_token_seconds_sum") < 1.0


def test_kv_usage_follows_running_tokens_and_abort_is_counted():
    eng = engine(LatencyModel(ttft_s=0, itl_s=0.01, prefill_s_per_token=0, jitter=0, slowdown_per_seq=0))

    async def scenario():
        req = parse_completion({"prompt": [1] * 100, "max_tokens": 500, "ignore_eos": True}, LIMITS)
        task = asyncio.create_task(eng.run(req, lambda *a: asyncio.sleep(0)))
        await asyncio.sleep(0.1)
        assert eng.scheduler.running == 1
        assert 0.1 < eng.kv_usage() < 0.2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert eng.scheduler.running == 0 and eng.kv_usage() == 0

    run(scenario())
    assert sample(eng, "vllm:request_success_total", finished_reason="abort") == 1
