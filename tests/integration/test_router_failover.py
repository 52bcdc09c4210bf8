"""Failover: dead, hung, draining and failing workers, breakers, streams cut mid-way and
clients that go away. Real routers, real Redis, simulator workers."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from test_router_helpers import MODEL, RouterFleet, metric_sum, run_load, sse_events

from support.procs import wait_until


@pytest.fixture
def fleet(daemons, redis_url):
    return RouterFleet(daemons, redis_url)


def background_load(router, count: int, concurrency: int, max_tokens: int = 8, **extra):
    """Run the load on a thread; ``.results`` once joined."""
    box = threading.Thread(daemon=True)
    box.results = []
    box.progress = [0]

    def one(i):
        resp = router.chat(content=f"load {i}", max_tokens=max_tokens, timeout=120, **extra)
        box.progress[0] += 1
        return resp.status_code if resp.status_code == 200 else (resp.status_code, resp.text[:200])

    def run():
        box.results = run_load(one, count, concurrency)

    box.run = run
    box.start()
    return box


def test_killed_worker_under_load_fails_no_request_and_its_breaker_opens_then_recovers(fleet):
    sims = [fleet.sim(f"w{i}") for i in range(3)]
    router = fleet.router(processes=2, GPUFLEET_ROUTER_BREAKER_FAILURES=3, GPUFLEET_ROUTER_BREAKER_COOLDOWN_S=2)
    load = background_load(router, 900, 30, max_tokens=16)
    wait_until(lambda: load.progress[0] >= 150, timeout=60, what="the load to get going")
    victim = sims[1]
    victim.daemon.kill9()
    wait_until(lambda: metric_sum(router.metrics(), "gpufleet_router_breaker_open", worker=victim.id) == 1,
               timeout=20, what="the breaker of the dead worker to open")
    load.join(timeout=180)
    assert load.results.count(200) == 900, [r for r in load.results if r != 200][:5]
    m = router.metrics()
    assert metric_sum(m, "gpufleet_router_breaker_transitions_total", worker=victim.id, state="open") >= 1
    failed = sum(metric_sum(m, "gpufleet_router_upstream_attempts_total", worker=victim.id, outcome=o)
                 for o in ("connect_error", "reset", "timeout"))
    assert failed >= 1 and metric_sum(m, "gpufleet_router_retries_total") >= failed

    # the worker comes back on its address: after the cool-down a probe succeeds, and it gets traffic again
    fleet.restart_sim(victim)
    wait_until(lambda: router.chat().status_code == 200 and victim.finished() > 0, timeout=30, interval=0.2,
               what="the returned worker to serve again")
    wait_until(lambda: metric_sum(router.metrics(), "gpufleet_router_breaker_open", worker=victim.id) == 0,
               timeout=10, what="the breaker to close")
    before = victim.finished()
    assert run_load(lambda i: router.chat(max_tokens=8).status_code, 60, 6).count(200) == 60
    assert victim.finished() - before >= 5


def test_a_hung_worker_is_cut_off_by_the_first_byte_timeout_and_retried_elsewhere(fleet):
    sims = [fleet.sim(f"w{i}") for i in range(3)]
    sims[0].faults("hang")
    router = fleet.router(processes=2, GPUFLEET_ROUTER_FIRST_BYTE_TIMEOUT_S=1, GPUFLEET_ROUTER_BREAKER_FAILURES=2,
                          GPUFLEET_ROUTER_BREAKER_COOLDOWN_S=60)
    started = time.monotonic()
    results = run_load(lambda i: router.chat(max_tokens=4, timeout=60).status_code, 40, 8)
    assert results.count(200) == 40, results
    assert time.monotonic() - started < 40
    m = router.metrics()
    assert metric_sum(m, "gpufleet_router_upstream_attempts_total", worker="w0", outcome="timeout") >= 1
    assert metric_sum(m, "gpufleet_router_upstream_attempts_total", worker="w0", outcome="ok") == 0
    assert metric_sum(m, "gpufleet_router_breaker_open", worker="w0") == 1
    assert metric_sum(m, "gpufleet_router_retries_total", reason="timeout") >= 1


def test_draining_worker_finishes_in_flight_requests_and_gets_no_new_ones(fleet):
    sims = [fleet.sim(f"w{i}") for i in range(3)]
    router = fleet.router(processes=2)
    drained = sims[1]
    load = background_load(router, 360, 30, max_tokens=80)
    wait_until(lambda: drained.running() >= 3, timeout=60, what="requests running on the worker to drain")
    drained.unpublish("draining")
    time.sleep(0.3)  # the event reaches every router process within milliseconds
    # what the router had sent to it by now: its live leases (read first) plus the attempts
    # already answered (a request ending between the two reads is counted twice, never zero times)
    in_flight = fleet.redis.zcard(fleet.keys.inflight(drained.id))
    answered = metric_sum(router.metrics(), "gpufleet_router_upstream_attempts_total", worker=drained.id)
    received = in_flight + answered
    assert in_flight >= 1
    load.join(timeout=180)
    assert load.results.count(200) == 360, [r for r in load.results if r != 200][:5]
    wait_until(lambda: drained.load() == 0, timeout=30, what="the drained worker to finish its requests")
    # nothing new was sent after the drain, and everything it had was finished, none aborted
    final = metric_sum(router.metrics(), "gpufleet_router_upstream_attempts_total", worker=drained.id)
    assert final <= received
    assert metric_sum(router.metrics(), "gpufleet_router_upstream_attempts_total", worker=drained.id,
                      outcome="ok") == final == drained.finished()
    assert metric_sum(drained.metrics(), "vllm:request_success_total", finished_reason="abort") == 0
    assert received < 360 / 3
    assert all(s.finished() > received for s in (sims[0], sims[2]))


def test_stream_is_retried_before_its_first_byte_and_ends_with_an_sse_error_after(fleet):
    failing, healthy = fleet.sim("failing"), fleet.sim("healthy")
    # equal loads go to the lowest reported queue depth: the failing worker is tried first
    fleet.publisher.publish_worker("healthy", MODEL, healthy.url, queue_depth=5)
    router = fleet.router(processes=1, GPUFLEET_ROUTER_BREAKER_FAILURES=100)
    wait_until(lambda: router.chat().status_code == 200, timeout=10, what="the router to serve")
    failing.faults("error")
    resp = router.chat(max_tokens=5, stream=True)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    m = router.metrics()
    assert metric_sum(m, "gpufleet_router_upstream_attempts_total", worker="failing", outcome="server_error") >= 1
    assert metric_sum(m, "gpufleet_router_retries_total", reason="server_error") >= 1

    # once output has reached the client, a broken upstream ends the stream with an SSE error event
    failing.faults("reset")
    healthy.faults("reset")
    resp = router.chat(max_tokens=200, stream=True, timeout=30)
    assert resp.status_code == 200
    events = sse_events(resp)
    assert events[-1] == "[DONE]"
    assert "error" in events[-2] and events[-2]["error"]["code"] == "upstream_error"
    assert any("choices" in e for e in events[:-2])
    assert metric_sum(router.metrics(), "gpufleet_router_stream_errors_total") == 1


def test_client_disconnect_mid_stream_cancels_the_upstream_and_releases_the_lease(fleet):
    sim = fleet.sim("w1")
    router = fleet.router(processes=2)
    live = f"{fleet.keys.inflight('w1')}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": 3000, "stream": True}
    resp = requests.post(router.url + "/v1/chat/completions", json=body, headers=router.headers(), stream=True,
                         timeout=30)
    assert resp.status_code == 200
    chunks = resp.iter_lines()
    assert next(c for c in chunks if c.startswith(b"data: "))
    assert sim.running() == 1 and fleet.redis.zcard(live) == 1
    resp.close()
    wait_until(lambda: sim.running() == 0, timeout=10, what="the simulator to drop the cancelled request")
    wait_until(lambda: fleet.redis.zcard(live) == 0, timeout=5, what="the lease to be released")
    m = router.metrics()
    assert metric_sum(m, "gpufleet_router_client_disconnects_total") == 1
    assert metric_sum(m, "gpufleet_router_inflight_requests") == 0
    assert metric_sum(sim.metrics(), "vllm:request_success_total", finished_reason="abort") == 1


def test_all_breakers_open_gives_503_then_a_probe_recovers(fleet):
    sim = fleet.sim("only")
    router = fleet.router(processes=1, GPUFLEET_ROUTER_BREAKER_FAILURES=2, GPUFLEET_ROUTER_BREAKER_COOLDOWN_S=2)
    sim.faults("error")
    assert router.chat().status_code == 502
    assert router.chat().status_code == 502
    resp = router.chat()
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_healthy_worker"
    assert metric_sum(router.metrics(), "gpufleet_router_breaker_state", worker="only") == 1
    sim.faults("none", 0.0)
    wait_until(lambda: router.chat().status_code == 200, timeout=10, interval=0.25, what="the probe to close it")
    assert metric_sum(router.metrics(), "gpufleet_router_breaker_state", worker="only") == 0


def test_a_worker_restart_between_requests_costs_no_retry(fleet):
    sim = fleet.sim("w1")
    router = fleet.router(processes=1)
    assert all(router.chat().status_code == 200 for _ in range(3))  # pooled keep-alive connections exist now
    sim.daemon.stop()
    fleet.restart_sim(sim)
    # the pooled connections died with the old process: the router notices on reuse and
    # sends on a fresh connection, without counting it against the worker
    assert all(router.chat().status_code == 200 for _ in range(3))
    m = router.metrics()
    assert metric_sum(m, "gpufleet_router_upstream_attempts_total", worker="w1", outcome="ok") == 6
    assert metric_sum(m, "gpufleet_router_upstream_attempts_total", worker="w1") == 6
    assert metric_sum(m, "gpufleet_router_retries_total") == 0


def router_sockets_to(router, port: int) -> list[str]:
    """TCP states (``/proc/net/tcp``) of the router processes' sockets connected to ``port``."""
    import os
    pids = [router.daemon.pid] + [int(p) for p in os.listdir("/proc") if p.isdigit()
                                  and _parent(int(p)) == router.daemon.pid]
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    states = []
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port and fields[9] in inodes:
                states.append({"01": "ESTABLISHED", "08": "CLOSE_WAIT"}.get(fields[3], fields[3]))
    return states


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def test_the_connection_pool_of_a_worker_that_left_is_closed(fleet):
    leaving, staying = fleet.sim("leaving", "--keep-alive-timeout", "60"), fleet.sim("staying")
    router = fleet.router(processes=2)
    assert run_load(lambda i: router.chat(max_tokens=2).status_code, 40, 8).count(200) == 40
    assert "ESTABLISHED" in router_sockets_to(router, leaving.port)  # kept alive in the pools
    leaving.unpublish("removed")
    # its pooled sockets are closed at once (not left to idle, then to CLOSE_WAIT when the worker goes)
    wait_until(lambda: not {"ESTABLISHED", "CLOSE_WAIT"} & set(router_sockets_to(router, leaving.port)),
               timeout=5, what="the router to close its connections to the worker that left")
    assert run_load(lambda i: router.chat(max_tokens=2).status_code, 10, 2).count(200) == 10
    assert staying.finished() >= 10
