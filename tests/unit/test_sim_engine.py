"""The simulated engine without sockets: finish reasons, stop strings, timing, metrics."""

import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.sim import textgen
from gpufleet.sim.engine import Engine
from gpufleet.sim.latency import StepCost
from gpufleet.sim.metrics import SimMetrics
from gpufleet.sim.protocol import Limits, parse_completion

LIMITS = Limits(("m",), 4096, 16)


def engine(cost=None, natural=(32, 64), max_num_seqs=4, **kwargs) -> Engine:
    return Engine(cost=cost or StepCost(0, 0, 0, 0, 0), max_num_seqs=max_num_seqs,
                  kv_cache_tokens=kwargs.pop("kv_cache_tokens", 1008), seed=0, natural_range=natural,
                  metrics_factory=lambda **g: SimMetrics("m", 4096, **g), **kwargs)


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

    async def emit(text, finish, stop_reason, generated):
        pieces.append((text, finish, stop_reason))

    streamed = run(eng.run(req, emit))
    assert "".join(p[0] for p in pieces) == out.text == streamed.text
    assert pieces[-1][1:] == ("stop", word)
    assert all(p[1] is None for p in pieces[:-1])


def test_latency_model_is_slept():
    eng = engine(StepCost(step_s=0.02, step_s_per_token=0, ttft_s=0.1, jitter=0, slowdown_per_seq=0))
    req = parse_completion({"prompt": "p", "max_tokens": 11}, LIMITS)
    started = time.monotonic()
    run(eng.run(req))
    elapsed = time.monotonic() - started
    assert 0.3 - 0.02 <= elapsed < 1.5          # 100 ms to the first token + 10 steps of 20 ms
    assert 0.1 <= sample(eng, "vllm:time_to_first_token_seconds_sum") < 1.0


def test_kv_usage_follows_running_tokens_and_abort_is_counted():
    eng = engine(StepCost(step_s=0.01, step_s_per_token=0, ttft_s=0, jitter=0, slowdown_per_seq=0))

    async def scenario():
        req = parse_completion({"prompt": [1] * 100, "max_tokens": 500, "ignore_eos": True}, LIMITS)
        task = asyncio.create_task(eng.run(req, lambda *a: asyncio.sleep(0)))
        await asyncio.sleep(0.1)
        assert len(eng.scheduler.running) == 1
        assert 0.1 < eng.kv_usage() < 0.2       # 7 + a few decode blocks of 63
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(eng.scheduler.running) == 0 and eng.kv_usage() == 0

    run(scenario())
    assert sample(eng, "vllm:request_success_total", finished_reason="abort") == 1


def test_stream_interval_merges_tokens_into_fewer_events():
    eng = engine(stream_interval=4)
    events = []

    async def emit(text, finish, stop_reason, generated):
        events.append((text, generated))

    out = run(eng.run(parse_completion({"prompt": "p", "max_tokens": 10}, LIMITS), emit))
    assert [n for _, n in events] == [1, 5, 9, 10]          # the first token at once, then every 4
    assert "".join(t for t, _ in events) == out.text


def test_preempted_sequence_resumes_and_answers_the_same_text():
    # 6 blocks of 16: two 40-token prompts take 3 blocks each, the first decode block preempts
    eng = engine(kv_cache_tokens=96, max_num_seqs=2)

    async def both():
        reqs = [parse_completion({"prompt": [i] * 40, "max_tokens": 20, "ignore_eos": True}, LIMITS) for i in (1, 2)]
        return await asyncio.gather(*(eng.run(r) for r in reqs))

    a, b = run(both())
    assert sample(eng, "vllm:num_preemptions_total") >= 1
    alone = engine()
    assert (a.text, b.text) == tuple(run(alone.run(parse_completion(
        {"prompt": [i] * 40, "max_tokens": 20, "ignore_eos": True}, LIMITS))).text for i in (1, 2))
    assert (a.completion_tokens, b.completion_tokens) == (20, 20)
    assert eng.kv_usage() == 0


def test_prefix_hit_counts_and_a_cold_prefill_costs_a_long_step():
    eng = engine(StepCost(step_s=0.001, step_s_per_token=0.0002, ttft_s=0, jitter=0, slowdown_per_seq=0),
                 kv_cache_tokens=8192)
    prompt = {"prompt": list(range(1000)), "max_tokens": 2}
    started = time.monotonic()
    run(eng.run(parse_completion(prompt, LIMITS)))
    cold = time.monotonic() - started
    started = time.monotonic()
    run(eng.run(parse_completion(prompt, LIMITS)))
    warm = time.monotonic() - started
    assert cold >= 0.2 and warm < cold / 3, (cold, warm)      # 1,000 x 0.2 ms against 8 x 0.2 ms
    assert sample(eng, "vllm:prefix_cache_hits_total") == 992
    assert sample(eng, "vllm:prefix_cache_queries_total") == 2000
    assert sample(eng, "vllm:prompt_tokens_cached_total") == 992
    assert sample(eng, "vllm:iteration_tokens_total_count") == 4   # two prefill steps, two decode steps


def test_waiting_request_cancelled_leaves_the_queue_as_abort():
    eng = engine(StepCost(step_s=0.01, step_s_per_token=0, ttft_s=0, jitter=0, slowdown_per_seq=0), max_num_seqs=1)

    async def scenario():
        long = parse_completion({"prompt": "a", "max_tokens": 1000, "ignore_eos": True}, LIMITS)
        holder = asyncio.create_task(eng.run(long))
        waiter = asyncio.create_task(eng.run(long))
        await asyncio.sleep(0.05)
        assert (len(eng.scheduler.running), len(eng.scheduler.waiting)) == (1, 1)
        waiter.cancel()
        holder.cancel()
        await asyncio.gather(holder, waiter, return_exceptions=True)
        assert (len(eng.scheduler.running), len(eng.scheduler.waiting)) == (0, 0)

    run(scenario())
    assert sample(eng, "vllm:request_success_total", finished_reason="abort") == 2


def test_next_turn_of_a_conversation_hits_the_previous_prompt_and_answer():
    from gpufleet.sim.protocol import parse_chat

    eng = engine(kv_cache_tokens=8192)
    chat_limits = Limits(("m",), 4096, None)
    turn1 = [{"role": "system", "content": "You help with bicycles. " * 20}, {"role": "user", "content": "Hi"}]
    first = parse_chat({"messages": turn1, "max_tokens": 60, "ignore_eos": True}, chat_limits)
    answer = run(eng.run(first)).text
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And a helmet?"}]
    second = parse_chat({"messages": turn2, "max_tokens": 2}, chat_limits)
    run(eng.run(second))
    hits = sample(eng, "vllm:prefix_cache_hits_total")
    # the whole previous prompt and most of its answer (its full blocks), not just the prompt
    answer_tokens = len(textgen.tokenize(answer))
    assert hits > first.prompt_tokens
    assert hits >= (first.prompt_tokens + min(answer_tokens, 59)) // 16 * 16 - 16, (hits, first.prompt_tokens)
