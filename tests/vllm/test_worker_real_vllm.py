"""The agent and the control plane with real vLLM: readiness through load and warm-up, the
figures the agent reads from vLLM's real metrics, and a dead EngineCore leaving the ready set.

Server "a" is shared with the conformance suite and the router tests; server "b" is the one
these tests restart and kill (the session's pool starts it again for whoever needs it next).
"""

from __future__ import annotations

import threading
import time

import requests

from gpufleet.agent.vllm_metrics import parse_vllm_metrics
from gpufleet.agent.window import histogram_quantile
from support.procs import wait_until
from support.vllm_fixtures import VLLM_KEY
from support.vllm_fleet import MODEL, vllm_metric

SLACK_S = 10.0  # a loaded 2-core machine running two vLLM servers


def readyz(agent_url: str) -> tuple[int, dict]:
    resp = requests.get(agent_url + "/readyz", timeout=5)
    return resp.status_code, resp.json()


def agent_metric(agent_url: str, name: str, **labels) -> float:
    return vllm_metric(agent_url, name, **labels)


def vllm_health(url: str) -> str:
    try:
        return str(requests.get(url + "/health", timeout=2).status_code)
    except requests.ConnectionError:
        return "refused"


def test_ready_only_after_load_and_warm_up_again_after_restart_and_out_when_the_engine_dies(
        fleet, vllm_servers, vllm_figures):
    server = vllm_servers.get("b")
    agent_url = fleet.worker("gpu-b", server.url)
    wait_until(lambda: fleet.ready() == {"gpu-b"}, timeout=30, what="the worker to join the ready set")

    # vLLM restarts: the agent turns unready at once, stays so while the port is closed (loading),
    # and is ready again only after its warm-up completion on the new process
    server.stop()
    wait_until(lambda: readyz(agent_url)[0] == 503, timeout=5, what="/readyz 503 with vLLM stopped")
    server.start()
    seen: list[tuple[str, int, list]] = []
    while True:
        health = vllm_health(server.url)
        code, body = readyz(agent_url)
        seen.append((health, code, body.get("failing", [])))
        if code == 200:
            break
        assert server.alive(), server.output()[-4000:]
        assert time.monotonic() - server.started_at < 240, "vLLM did not come back"
        time.sleep(0.1)
    back_s = time.monotonic() - server.started_at
    vllm_figures.setdefault("vLLM restart to agent ready (s)", []).append(round(back_s, 1))
    assert {h for h, _, _ in seen} >= {"refused"}, "the port must be closed while vLLM loads"
    assert all(code == 503 and "vllm_health" in failing for health, code, failing in seen if health != "200")
    # the only request this fresh vLLM has seen is the agent's warm-up, and it came before "ready"
    assert vllm_metric(server.url, "vllm:request_success_total") == 1
    wait_until(lambda: fleet.ready() == {"gpu-b"}, timeout=SLACK_S, what="the worker to rejoin the ready set")

    # the EngineCore dies (an OOM kill, a GPU fault): the API server answers 503 and exits
    killed = time.monotonic()
    server.kill_engine_core()
    wait_until(lambda: "gpu-b" not in fleet.ready(), timeout=SLACK_S, interval=0.05,
               what="the worker to leave the ready set")
    left_s = time.monotonic() - killed
    vllm_figures.setdefault("EngineCore killed to out of the ready set (s)", []).append(round(left_s, 2))
    code, body = readyz(agent_url)
    assert code == 503 and "vllm_health" in body["failing"]


class Streams:
    """``n`` long streamed completions held open until ``close()``."""

    def __init__(self, url: str, n: int):
        self.responses = []
        self._threads = []
        for _ in range(n):
            resp = requests.post(url + "/v1/completions", headers={"Authorization": f"Bearer {VLLM_KEY}"},
                                 json={"model": MODEL, "prompt": "Count:", "max_tokens": 3900, "ignore_eos": True,
                                       "stream": True}, stream=True, timeout=60)
            assert resp.status_code == 200, resp.text
            self.responses.append(resp)
            thread = threading.Thread(target=self._drain, args=(resp,), daemon=True)
            thread.start()
            self._threads.append(thread)

    @staticmethod
    def _drain(resp) -> None:
        try:
            for _ in resp.iter_content(4096):
                pass
        except (requests.RequestException, AttributeError, ValueError, OSError):
            pass

    def close(self) -> None:
        for resp in self.responses:
            resp.close()


def test_agent_reads_real_load_kv_cache_ttft_and_prefix_cache(fleet, vllm_servers):
    server = vllm_servers.get("a")
    # the agent's window holds what vLLM served since the agent started (its warm-up, the
    # streams below and the eight timed requests): compare against that same span
    since_agent = parse_vllm_metrics(requests.get(server.url + "/metrics", timeout=10).text).ttft
    agent_url = fleet.worker("gpu-a", server.url, METRICS_WINDOW_S="300")
    wait_until(lambda: readyz(agent_url)[0] == 200, timeout=30, what="the agent to be ready")

    # 2 more long streams than --max-num-seqs: the agent reports vLLM's own running/waiting split
    streams = Streams(server.url, server.max_num_seqs + 2)
    try:
        wait_until(lambda: (agent_metric(agent_url, "gpufleet_agent_vllm_requests_running"),
                            agent_metric(agent_url, "gpufleet_agent_vllm_requests_waiting"))
                   == (server.max_num_seqs, 2), timeout=90, what="running = max-num-seqs, 2 waiting, at the agent")
        assert 0 < agent_metric(agent_url, "gpufleet_agent_vllm_kv_cache_usage_ratio") < 1
    finally:
        streams.close()
    wait_until(lambda: agent_metric(agent_url, "gpufleet_agent_vllm_requests_running") == 0, timeout=15,
               what="the agent to see the aborted streams go")

    # TTFT p95: the agent's figure is the quantile of vLLM's real histogram over the same requests
    before = parse_vllm_metrics(requests.get(server.url + "/metrics", timeout=10).text).ttft
    prompts = [" ".join(["queue"] * 300 + [str(i)]) for i in range(8)]
    threads = [threading.Thread(target=requests.post, args=(server.url + "/v1/completions",), kwargs={
        "headers": {"Authorization": f"Bearer {VLLM_KEY}"}, "timeout": 120,
        "json": {"model": MODEL, "prompt": p, "max_tokens": 200, "ignore_eos": True}}) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = parse_vllm_metrics(requests.get(server.url + "/metrics", timeout=10).text).ttft
    assert after.minus(before).count == len(prompts)
    window = after.minus(since_agent)
    low, high = histogram_quantile(0.85, window), histogram_quantile(1.0, window)

    seen = []

    def agent_p95():
        seen.append(agent_metric(agent_url, "gpufleet_agent_vllm_ttft_seconds", quantile="0.95"))
        return seen[-1] if low - 1e-9 <= seen[-1] <= high + 1e-9 else None
    try:
        wait_until(agent_p95, timeout=30, what="the agent's TTFT p95 within vLLM's p85..p100 over its window")
    except TimeoutError:
        raise AssertionError(f"agent TTFT p95 {seen[-3:]} outside vLLM's [{low:.3f}, {high:.3f}]") from None

    # the eight prompts share 300 words: vLLM's prefix cache served part of them, and the agent says how much
    wait_until(lambda: 0 < agent_metric(agent_url, "gpufleet_agent_vllm_prefix_cache_hit_ratio") < 1, timeout=30,
               what="the agent's prefix-cache hit ratio to show vLLM's hits")
