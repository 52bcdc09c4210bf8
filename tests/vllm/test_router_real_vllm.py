"""The router in front of real vLLM: answers passed through byte for byte, a client that
hangs up aborts the request in vLLM, and a minute of bursty traffic with lulls longer than
vLLM's 5 s keep-alive timeout to two real servers fails nothing."""

from __future__ import annotations

import random
import threading
import time

import openai
import pytest
import requests

from support.procs import wait_until
from support.vllm_fleet import MODEL, RecordingRelay, vllm_metric

MESSAGES = [{"role": "user", "content": "Tell me about GPUs."}]


@pytest.fixture
def one_worker_behind_a_relay(fleet, vllm_servers):
    """Server "a" as worker gpu-a, advertised through a relay that records what vLLM sends."""
    server = vllm_servers.get("a")
    relay = RecordingRelay(server.port)
    fleet.worker("gpu-a", server.url, advertise_url=relay.url)
    wait_until(lambda: fleet.ready() == {"gpu-a"}, timeout=30, what="gpu-a to be routable")
    yield server, relay, fleet.router(), fleet.api_key()
    relay.close()


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 40, "stream": True,
                              "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 40}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 40, "stream": True}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 40}),
], ids=["chat-stream", "chat", "text-stream", "text"])
def test_router_passes_real_vllm_answers_through_byte_for_byte(one_worker_behind_a_relay, path, body):
    _, relay, router_url, key = one_worker_behind_a_relay
    seen = len(relay.responses())
    resp = requests.post(router_url + path, json={"model": MODEL, **body}, timeout=60,
                         headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    answered = relay.responses()[seen:]
    assert len(answered) == 1, "one request through the router, one answer from vLLM"
    status, headers, sent = answered[0]
    assert status == 200 and resp.content == sent
    assert resp.headers["Content-Type"] == headers["content-type"]
    if body.get("stream"):
        assert sent.startswith(b"data: {") and sent.endswith(b"data: [DONE]\n\n")


def test_client_hanging_up_through_the_router_aborts_the_request_in_vllm(one_worker_behind_a_relay):
    server, _, router_url, key = one_worker_behind_a_relay
    resp = requests.post(router_url + "/v1/completions", stream=True, timeout=60,
                         headers={"Authorization": f"Bearer {key}"},
                         json={"model": MODEL, "prompt": "Count:", "max_tokens": 3900, "ignore_eos": True,
                               "stream": True})
    assert resp.status_code == 200
    next(resp.iter_content(64))                # generating
    wait_until(lambda: vllm_metric(server.url, "vllm:num_requests_running") == 1, timeout=5,
               what="vLLM to report the request running")
    resp.close()
    hung_up = time.monotonic()
    wait_until(lambda: vllm_metric(server.url, "vllm:num_requests_running") == 0, timeout=10, interval=0.05,
               what="vLLM to drop the request")
    assert time.monotonic() - hung_up < 5      # 3,900 tokens would take far longer
    generated = vllm_metric(server.url, "vllm:generation_tokens_total")
    time.sleep(1)
    assert vllm_metric(server.url, "vllm:generation_tokens_total") == generated, "vLLM still generating"


def test_a_minute_of_bursts_and_lulls_over_5_s_to_two_real_servers_fails_nothing(fleet, vllm_servers, vllm_figures):
    a, b = vllm_servers.get("a", "b")
    fleet.worker("gpu-a", a.url)
    fleet.worker("gpu-b", b.url)
    wait_until(lambda: fleet.ready() == {"gpu-a", "gpu-b"}, timeout=60, what="both workers to be routable")
    router_url = fleet.router()
    key = fleet.api_key()
    served = {s.name: vllm_metric(s.url, "vllm:request_success_total") for s in (a, b)}

    failures: list[str] = []
    done = [0]
    lock = threading.Lock()
    burst = threading.Event()
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        # the OpenAI SDK keeps its connection to the router alive across the lulls, as users' clients do
        with openai.OpenAI(base_url=router_url + "/v1", api_key=key, max_retries=0, timeout=60) as api:
            while not stop.is_set():
                if not burst.wait(0.2):
                    continue
                stream, chat, tokens = rng.random() < 0.5, rng.random() < 0.5, rng.randint(1, 48)
                # ignore_eos: the random-weight model may end early, and every answer is checked in full
                options = {"max_tokens": tokens, "stream": stream, "extra_body": {"ignore_eos": True}}
                try:
                    if chat:
                        out = api.chat.completions.create(model=MODEL, messages=MESSAGES, **options)
                    else:
                        out = api.completions.create(model=MODEL, prompt=f"Request {seed}", **options)
                    if stream:
                        chunks = list(out)
                        assert chunks and chunks[-1].choices[0].finish_reason == "length", chunks[-1:]
                    else:
                        assert out.usage.completion_tokens == tokens
                    with lock:
                        done[0] += 1
                except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                    with lock:
                        failures.append(f"{time.monotonic() - started:.1f}s {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    lulls = 0
    while time.monotonic() - started < 60:
        burst.set()
        time.sleep(random.uniform(4, 7))
        burst.clear()
        time.sleep(random.uniform(5.5, 7))      # every pooled connection to vLLM has been idle > 5 s
        lulls += 1
    stop.set()
    for thread in threads:
        thread.join(timeout=90)
    vllm_figures.setdefault("60 s bursts/lulls: requests, failures, lulls", []).append((done[0], len(failures), lulls))
    assert not failures, "\n".join(failures[:5])
    assert done[0] >= 40 and lulls >= 4
    # both real servers served (the router spread the load), and nothing was retried behind our back
    # into a double answer: vLLM finished exactly what the clients received, plus two warm-ups at most
    delta = {s.name: vllm_metric(s.url, "vllm:request_success_total") - served[s.name] for s in (a, b)}
    assert all(v > 0 for v in delta.values()), delta
    assert done[0] <= sum(delta.values()) <= done[0] + 2, (done[0], delta)
