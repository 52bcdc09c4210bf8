"""gpufleet-vllm-sim's step engine and prefix cache as a real process, through HTTP: a
repeated prefix is a cache hit in /metrics and a shorter time to first token; a long
prefill slows the other sequences of the same worker."""

from __future__ import annotations

import json
import threading
import time

import requests

from support import sim
from support.sim import metric

SYSTEM = "You are the support assistant of a company that sells bicycles. " * 150   # ~1,800 tokens


def start_sim(daemons, *args: str) -> str:
    return sim.start_sim(daemons, "--profile", "llama-3.1-8b-h100", "--jitter", "0", *args)


def ttft(base: str, question: str) -> tuple[float, int]:
    """Seconds to the first streamed token of a chat with the shared system prompt, and its prompt tokens."""
    started = time.monotonic()
    first = None
    usage = None
    with requests.post(base + "/v1/chat/completions", stream=True, timeout=60, json={
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        for line in resp.iter_lines():
            if line.startswith(b"data: {") and first is None:
                first = time.monotonic() - started
            if b'"usage"' in line:
                usage = json.loads(line[6:])["usage"]
    return first, usage["prompt_tokens"]


def test_repeated_prefix_hits_the_cache_and_shortens_ttft(daemons):
    # x4: the cold ~1,800-token prefill takes ~4 x 115 ms, a warm one ~4 x 7 ms
    base = start_sim(daemons, "--time-scale", "4")
    cold, prompt_tokens = ttft(base, "Which bicycle for commuting?")
    assert metric(base, "vllm:prefix_cache_hits_total") == 0
    warm = [ttft(base, f"Question {i}: which helmet?")[0] for i in range(3)]
    hits = metric(base, "vllm:prefix_cache_hits_total")
    queries = metric(base, "vllm:prefix_cache_queries_total")
    # the system prompt's full blocks (not the question's) hit, three times
    assert hits >= 3 * (prompt_tokens - 48) and hits % 16 == 0, (hits, prompt_tokens)
    assert queries >= 4 * (prompt_tokens - 10)
    assert metric(base, "vllm:prompt_tokens_cached_total") == hits
    assert cold > 0.3 and max(warm) < cold / 3, (cold, warm)
    assert metric(base, "vllm:iteration_tokens_total_bucket", le="2048.0") >= 1   # the cold prefill's step
    assert metric(base, "vllm:request_prefill_time_seconds_sum") > cold * 0.8


def test_disabled_prefix_caching_and_a_long_prefill_slows_the_others(daemons):
    base = start_sim(daemons, "--no-enable-prefix-caching")
    gaps: list[float] = []

    def decode_stream():
        last = None
        with requests.post(base + "/v1/completions", stream=True, timeout=60, json={
                "prompt": "count", "max_tokens": 150, "ignore_eos": True, "stream": True}) as resp:
            for line in resp.iter_lines():
                if line.startswith(b"data: {"):
                    now = time.monotonic()
                    if last is not None:
                        gaps.append(now - last)
                    last = now

    thread = threading.Thread(target=decode_stream, daemon=True)
    thread.start()
    time.sleep(0.3)                                          # the stream decodes at ~6 ms per token
    # a cold 4,000-token prompt: one step of 6 + 4,000 x 0.06 ms = ~250 ms for everyone
    body = {"prompt": list(range(4000)), "max_tokens": 1}
    assert requests.post(base + "/v1/completions", json=body, timeout=60).status_code == 200
    thread.join(timeout=60)
    assert gaps and max(gaps) > 0.2, max(gaps)
    assert sorted(gaps)[len(gaps) // 2] < 0.05              # the other steps stay short
    assert metric(base, "vllm:prefix_cache_queries_total") == 0
    second = time.monotonic()
    assert requests.post(base + "/v1/completions", json=body, timeout=60).status_code == 200
    assert time.monotonic() - second > 0.2                  # no cache: the same prompt is computed again
    assert metric(base, "vllm:prefix_cache_hits_total") == 0
