"""gpufleet-vllm-sim's scheduler as a real process: --max-num-seqs, the FIFO waiting
queue as /metrics reports it, and clients that go away."""

from __future__ import annotations

import threading
import time

import requests

from support import sim
from support.procs import wait_until
from support.sim import metric


def start_sim(daemons, *args: str) -> str:
    return sim.start_sim(daemons, "--jitter", "0", "--ttft-ms", "10", *args)


def running_waiting(base: str) -> tuple[float, float]:
    return metric(base, "vllm:num_requests_running"), metric(base, "vllm:num_requests_waiting")


def test_max_num_seqs_queues_the_rest_in_fifo_order(daemons):
    base = start_sim(daemons, "--max-num-seqs", "2", "--itl-ms", "40", "--slowdown-per-seq", "0")
    first_token_at: dict[int, float] = {}
    errors: list[BaseException] = []
    # unequal lengths (x 40 ms) space the hand-overs out: 2 starts when 0 ends (0.6 s),
    # 3 when 1 ends (1.0 s), 4 when 2 ends (1.2 s); a LIFO queue would start 4 first
    lengths = [15, 25, 15, 25, 15]

    def stream(index: int):
        try:
            body = {"prompt": f"request {index}", "max_tokens": lengths[index], "ignore_eos": True, "stream": True}
            with requests.post(base + "/v1/completions", stream=True, timeout=60, json=body) as resp:
                for line in resp.iter_lines():
                    if line.startswith(b"data: {"):
                        first_token_at.setdefault(index, time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = []
    for index in range(5):
        thread = threading.Thread(target=stream, args=(index,), daemon=True)
        thread.start()
        threads.append(thread)
        # the next one arrives only once this one is admitted or queued: a known arrival order
        wait_until(lambda n=index + 1: sum(running_waiting(base)) == n, timeout=20,
                   what=f"{index + 1} requests at the server")

    assert running_waiting(base) == (2, 3)
    assert metric(base, "vllm:kv_cache_usage_perc") > 0
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert sorted(first_token_at, key=first_token_at.get) == [0, 1, 2, 3, 4]
    # two at a time: the fifth starts once two earlier requests have finished in turn
    assert first_token_at[4] - first_token_at[0] > 1.0
    assert running_waiting(base) == (0, 0)
    assert metric(base, "vllm:request_success_total", finished_reason="length") == 5
    assert metric(base, "vllm:request_queue_time_seconds_sum") > 1.0
    assert metric(base, "vllm:kv_cache_usage_perc") == 0


def test_stream_disconnect_frees_the_slot(daemons):
    base = start_sim(daemons, "--max-num-seqs", "1", "--itl-ms", "20")
    resp = requests.post(base + "/v1/chat/completions", stream=True, timeout=30, json={
        "messages": [{"role": "user", "content": "long"}], "max_tokens": 2000, "ignore_eos": True,
        "stream": True})
    lines = resp.iter_lines()
    assert next(line for line in lines if line).startswith(b"data: ")
    assert running_waiting(base) == (1, 0)
    resp.close()
    wait_until(lambda: running_waiting(base) == (0, 0), timeout=20, what="the slot to be freed")
    assert metric(base, "vllm:request_success_total", finished_reason="abort") == 1
    # the single slot is free for the next one
    started = time.monotonic()
    ok = requests.post(base + "/v1/completions", json={"prompt": "next", "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200 and time.monotonic() - started < 10


def test_non_stream_disconnect_frees_the_slot_and_leaves_the_queue(daemons):
    base = start_sim(daemons, "--max-num-seqs", "1", "--itl-ms", "20")
    long_body = {"prompt": "long", "max_tokens": 2000, "ignore_eos": True}
    outcomes: dict[str, str] = {}

    def call(name: str, timeout: float):
        try:
            requests.post(base + "/v1/completions", json=long_body, timeout=timeout)
            outcomes[name] = "answered"
        except requests.exceptions.ReadTimeout:
            outcomes[name] = "timeout"

    holder = threading.Thread(target=call, args=("holder", 4.0), daemon=True)
    holder.start()
    wait_until(lambda: running_waiting(base) == (1, 0), timeout=20, what="the first request to run")
    queued = threading.Thread(target=call, args=("queued", 1.0), daemon=True)
    queued.start()
    wait_until(lambda: running_waiting(base) == (1, 1), timeout=20, what="the second request to wait")
    queued.join(timeout=30)
    wait_until(lambda: running_waiting(base) == (1, 0), timeout=20, what="the waiter to leave the queue")
    holder.join(timeout=30)
    wait_until(lambda: running_waiting(base) == (0, 0), timeout=20, what="the running slot to be freed")
    assert outcomes == {"holder": "timeout", "queued": "timeout"}
    assert metric(base, "vllm:request_success_total", finished_reason="abort") == 2
    ok = requests.post(base + "/v1/completions", json={"prompt": "next", "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200


def test_running_sequences_slow_each_other_down(daemons):
    base = start_sim(daemons, "--max-num-seqs", "64", "--itl-ms", "10", "--slowdown-per-seq", "0.1")
    body = {"prompt": "x", "max_tokens": 30, "ignore_eos": True}

    def timed():
        started = time.monotonic()
        requests.post(base + "/v1/completions", json=body, timeout=60).raise_for_status()
        return time.monotonic() - started

    alone = timed()
    durations: list[float] = []
    threads = [threading.Thread(target=lambda: durations.append(timed()), daemon=True) for _ in range(11)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # with up to 10 others running each step is up to 2x slower
    assert len(durations) == 11
    assert max(durations) > alone * 1.4


def test_latency_knobs_shape_the_timing(daemons):
    base = start_sim(daemons, "--ttft-ms", "150", "--itl-ms", "20", "--prefill-ms-per-token", "1",
                     "--slowdown-per-seq", "0")
    started = time.monotonic()
    times = []
    with requests.post(base + "/v1/completions", stream=True, timeout=30, json={
            "prompt": "short", "max_tokens": 11, "ignore_eos": True, "stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith(b"data: {"):
                times.append(time.monotonic() - started)
    assert len(times) == 11
    assert 0.14 <= times[0] < 1.5                       # 150 ms + 1 ms x 1 prompt token
    assert 0.34 <= times[-1] < 2.5                      # + 10 x 20 ms
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert 0.015 < sum(gaps) / len(gaps) < 0.1
    assert 0.0155 < metric(base, "vllm:inter_token_latency_seconds_sum") / 10 < 0.1
    assert 0.14 < metric(base, "vllm:time_to_first_token_seconds_sum") < 1.5

    # a 300-token prompt adds 300 x 1 ms of prefill before the first token
    started = time.monotonic()
    body = {"prompt": list(range(300)), "max_tokens": 1}
    assert requests.post(base + "/v1/completions", json=body, timeout=30).status_code == 200
    assert time.monotonic() - started >= 0.44
