"""gpufleet-vllm-sim's fault injection as a real process: each mode as documented."""

from __future__ import annotations

import time

import openai
import pytest
import requests

from support.procs import wait_http, wait_until


def start_sim(daemons, *args: str):
    port = daemons.port()
    proc = daemons.start("vllm-sim", [daemons.script("gpufleet-vllm-sim"), "org/tiny-model", "--port", str(port),
                                      "--jitter", "0", "--ttft-ms", "5", "--itl-ms", "2", *args])
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", proc=proc, timeout=30)
    return base


@pytest.fixture
def sim(daemons):
    return start_sim(daemons, "--enable-fault-api")


def set_fault(base: str, **config) -> dict:
    resp = requests.post(base + "/sim/faults", json=config, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def complete(base: str, timeout: float = 20, **extra) -> requests.Response:
    return requests.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 10, **extra}, timeout=timeout)


def running(base: str) -> int:
    for line in requests.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            return int(float(line.rsplit(" ", 1)[1]))
    raise AssertionError("no vllm:num_requests_running")


def test_fault_api_is_404_without_the_flag(daemons):
    base = start_sim(daemons)
    assert requests.get(base + "/sim/faults", timeout=10).status_code == 404
    assert requests.post(base + "/sim/faults", json={"mode": "error", "rate": 1}, timeout=10).status_code == 404
    assert complete(base).status_code == 200


def test_fault_api_reports_and_validates(sim):
    assert requests.get(sim + "/sim/faults", timeout=10).json() == {
        "mode": "none", "rate": 0.0, "scope": "completions", "injected": 0}
    bad = requests.post(sim + "/sim/faults", json={"mode": "explode"}, timeout=10)
    assert bad.status_code == 400 and "mode" in bad.json()["error"]["message"]
    assert requests.post(sim + "/sim/faults", data=b"{", timeout=10).status_code == 400


def test_error_mode_answers_500_in_openai_shape(sim):
    set_fault(sim, mode="error", rate=1)
    resp = complete(sim)
    assert resp.status_code == 500
    assert set(resp.json()["error"]) >= {"message", "type", "param", "code"}
    with openai.OpenAI(base_url=sim + "/v1", api_key="x", max_retries=0) as client, \
            pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="org/tiny-model", messages=[{"role": "user", "content": "x"}])
    assert requests.get(sim + "/health", timeout=10).status_code == 200   # scope: completions only
    assert requests.get(sim + "/sim/faults", timeout=10).json()["injected"] == 2
    set_fault(sim, mode="none")
    assert complete(sim).status_code == 200


def test_hang_mode_never_answers_until_the_client_gives_up(sim):
    set_fault(sim, mode="hang", rate=1)
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        complete(sim, timeout=1.0)
    assert time.monotonic() - started >= 0.9
    with pytest.raises(requests.exceptions.ReadTimeout):
        complete(sim, timeout=1.0, stream=True)
    assert running(sim) == 0                       # a hung request holds no slot
    assert requests.get(sim + "/health", timeout=5).status_code == 200


def test_reset_mode_closes_the_connection(sim):
    set_fault(sim, mode="reset", rate=1)
    with pytest.raises(requests.exceptions.ConnectionError):
        complete(sim)
    # a stream is cut after a few chunks, with no [DONE]
    events = []
    with pytest.raises((requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)), \
            requests.post(sim + "/v1/completions", stream=True, timeout=20, json={
                "prompt": "x", "max_tokens": 50, "ignore_eos": True, "stream": True}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line:
                events.append(line)
    assert 1 <= len(events) <= 3 and b"[DONE]" not in events
    wait_until(lambda: running(sim) == 0, timeout=20, what="the reset stream to free its slot")


def test_slow_mode_is_measurably_slower(sim):
    def timed() -> float:
        started = time.monotonic()
        assert complete(sim, max_tokens=10, ignore_eos=True).status_code == 200
        return time.monotonic() - started

    normal = min(timed() for _ in range(3))
    set_fault(sim, mode="slow", rate=1)
    slow = timed()
    assert slow > 0.35 and slow > 3 * normal, (normal, slow)


def test_scope_all_breaks_health_models_and_metrics(sim):
    set_fault(sim, mode="error", rate=1, scope="all")
    for path in ("/health", "/v1/models", "/metrics"):
        assert requests.get(sim + path, timeout=10).status_code == 500, path
    set_fault(sim, mode="hang")
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(sim + "/health", timeout=1.0)
    set_fault(sim, mode="error", scope="completions")
    assert requests.get(sim + "/health", timeout=10).status_code == 200
    assert requests.get(sim + "/sim/faults", timeout=10).status_code == 200   # never faulted itself


def test_partial_rate_fails_about_that_fraction(sim):
    set_fault(sim, mode="error", rate=0.5)
    statuses = [complete(sim, max_tokens=1).status_code for _ in range(60)]
    assert set(statuses) == {200, 500}
    assert 12 <= statuses.count(500) <= 48


def test_fault_flags_on_the_command_line(daemons):
    base = start_sim(daemons, "--fault-rate", "1", "--fault-mode", "error")
    assert complete(base).status_code == 500
    assert requests.get(base + "/health", timeout=10).status_code == 200
    assert requests.get(base + "/sim/faults", timeout=10).status_code == 404
