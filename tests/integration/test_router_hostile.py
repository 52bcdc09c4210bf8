"""The router against hostile workers (issue 8): a real router (gunicorn, two processes),
real Redis, and workers that are real separate processes — tests/support/hostile_worker.py,
which answers each request in the way its prompt asks (``hostile:<mode>``), and
gpufleet-vllm-sim as the healthy one.

For every case: the client gets the documented status with an OpenAI error body (or the
correct answer when a healthy worker can serve it), the Redis leases and the in-flight
gauge return to where they were, the breaker counts only real worker faults, and the next
request to the worker succeeds. The routers, Redis and workers are shared by the module's
tests (CI has two cores); each case publishes the hostile server under a worker id of its
own, so its lease count and breaker are its own.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from dataclasses import dataclass

import openai
import pytest
import requests
from test_router_helpers import MODEL, RouterFleet, metric_sum, run_load, sse_events

from support.hostile_worker import HostileWorker
from support.procs import wait_until

FAULT_OPENS = {"GPUFLEET_ROUTER_BREAKER_FAILURES": 1, "GPUFLEET_ROUTER_BREAKER_COOLDOWN_S": 0.5}


# -- the shared fleet ------------------------------------------------------------------------

class Suite:
    def __init__(self, daemons, redis_url: str):
        self.fleet = RouterFleet(daemons, redis_url)
        self.redis = self.fleet.redis
        # idle connections are closed late here: the tests of idle connections set it shorter
        self.hostile = HostileWorker(daemons, "hostile", "--idle-close-ms", "60000")
        self.sim = self.fleet.sim("healthy", publish=False)
        self.published: set[str] = set()
        # one attempt per request with a failing worker opens its breaker: every fault shows
        self.router = self.fleet.router(processes=2, name="router-strict", wait_workers=0,
                                        GPUFLEET_ROUTER_FIRST_BYTE_TIMEOUT_S=1, GPUFLEET_ROUTER_READ_TIMEOUT_S=3,
                                        **FAULT_OPENS)
        # default timeouts and breakers, as shipped
        self.patient = self.fleet.router(processes=2, name="router-default", wait_workers=0)

    # the view: which workers serve MODEL -----------------------------------------------------
    def publish(self, worker_id: str, url: str, queue_depth: int = 0, model: str = MODEL) -> None:
        self.fleet.publisher.publish_worker(worker_id, model, url, queue_depth=queue_depth)
        self.published.add(worker_id)

    def only(self, *workers: tuple[str, str, int]) -> None:
        """Make exactly these ``(id, url, queue_depth)`` the workers of MODEL, in every
        process of both routers. Equal loads go to the lowest queue depth first."""
        wanted = {w[0] for w in workers}
        for wid in sorted(self.published - wanted):
            self.fleet.publisher.unpublish_worker(wid, MODEL, "removed")
            self.published.discard(wid)
        for wid, url, depth in workers:
            self.publish(wid, url, depth)
        keys = self.fleet.keys
        others = sum(self.redis.scard(keys.ready_set(m)) for m in self.redis.smembers(keys.models) if m != MODEL)
        for router in (self.router, self.patient):
            wait_until(lambda r=router: all(r.readyz()["workers"] == len(wanted) + others for _ in range(8)),
                       timeout=10, what=f"{router.daemon.name} to see {sorted(wanted)}")

    # accounting --------------------------------------------------------------------------
    def leases(self, worker_id: str | None = None) -> int:
        if worker_id:
            return self.redis.zcard(self.fleet.keys.inflight(worker_id))
        return sum(self.redis.zcard(k) for k in self.redis.scan_iter(self.fleet.keys.inflight("*")))

    def inflight(self, router=None) -> float:
        return metric_sum((router or self.router).metrics(), "gpufleet_router_inflight_requests")

    def settled(self, gauge_before: float, router=None, worker_id: str | None = None) -> None:
        wait_until(lambda: (self.leases(worker_id) if worker_id else self.leases()) == 0, timeout=10,
                   what="every lease to be released")
        wait_until(lambda: self.inflight(router) == gauge_before, timeout=10,
                   what="the in-flight gauge to come back")

    def breaker_open(self, worker_id: str, router=None) -> float:
        return metric_sum((router or self.router).metrics(), "gpufleet_router_breaker_open", worker=worker_id)

    def sim_requests(self) -> float:
        return metric_sum(self.sim.metrics(), "vllm:request_success_total")

    def served_by_hostile(self, mode: str) -> list[dict]:
        return [r for r in self.hostile.requests() if r["mode"] == mode]


@pytest.fixture(scope="module")
def suite(module_daemons, redis_server):
    client = redis_server.client()
    client.flushall()
    client.close()
    s = Suite(module_daemons, redis_server.url)
    yield s
    s.redis.close()


def assert_openai_error(resp, statuses: int | tuple, type_: str | None = None) -> dict:
    statuses = statuses if isinstance(statuses, tuple) else (statuses,)
    assert resp.status_code in statuses, (resp.status_code, resp.text[:300])
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"], err
    if type_:
        assert err["type"] == type_, err
    return err


def assert_good_answer(resp, stream: bool) -> None:
    assert resp.status_code == 200, (resp.status_code, resp.text[:300])
    if stream:
        events = sse_events(resp)
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events[-3:]
        assert any(e["choices"] and e["choices"][0]["delta"].get("content") for e in events[:-1])
    else:
        assert resp.json()["choices"][0]["message"]["content"], resp.text[:300]


# -- the cases -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    mode: str
    stream: bool = False
    fault: bool = True           # a real worker fault: counted by the breaker, retried elsewhere
    status: int = 502            # what the client gets when no other worker can serve it
    type_: str | None = "upstream_error"

    def __str__(self):
        return self.mode.replace("_", "-") + ("-stream" if self.stream else "")


CASES = [
    Case("ok", fault=False, status=200),
    Case("ok", stream=True, fault=False, status=200),
    Case("bad_content_length"),
    Case("control_char_header"),
    Case("two_digit_status"),
    Case("many_headers"),
    Case("duplicate_content_length"),
    Case("chunk_negative"),
    Case("chunk_negative", stream=True),
    Case("chunk_underscore"),
    Case("chunk_underscore", stream=True),
    Case("connection_listed", fault=False, status=200),
    Case("trickle", fault=False, status=200),
    Case("trickle", stream=True, fault=False, status=200),
    Case("reset_mid_body"),
    Case("close"),
    Case("hang", status=504, type_="timeout_error"),
    Case("hang", stream=True, status=504, type_="timeout_error"),
    Case("error_500"),
    Case("error_400", fault=False, status=400, type_=None),
]
CASE_PARAMS = [pytest.param(case, alone, id=f"{case}-{'alone' if alone else 'with-healthy'}")
               for case in CASES for alone in (True, False)]


@pytest.mark.parametrize(("case", "alone"), CASE_PARAMS)
def test_hostile_answer(suite, case: Case, alone: bool):
    wid = f"h-{case}-{'alone' if alone else 'healthy'}"
    workers = [(wid, suite.hostile.url, 0)]
    if not alone:
        workers.append(("healthy", suite.sim.url, 5))  # tried second: the hostile one has the lower queue
    suite.only(*workers)
    suite.hostile.reset()
    gauge, sim_before = suite.inflight(), suite.sim_requests()

    resp = suite.router.chat(content=f"hostile:{case.mode}", max_tokens=6, stream=case.stream, timeout=60)

    sent = suite.served_by_hostile(case.mode)
    assert sent, "the router did not try the hostile worker first"
    if case.fault and not alone:
        assert_good_answer(resp, case.stream)  # retried on the healthy worker
        assert suite.sim_requests() == sim_before + 1
    elif case.status == 200:
        assert_good_answer(resp, case.stream)
    else:
        assert_openai_error(resp, case.status, case.type_)
    if case.mode == "connection_listed":
        assert "X-Hop-Secret" not in resp.headers
    if not case.fault:
        assert len(sent) == 1 and suite.sim_requests() == sim_before  # never retried
    suite.settled(gauge, worker_id=wid)
    assert suite.breaker_open(wid) == (1 if case.fault else 0)
    if case.mode == "hang":
        # the router gave up on it: the connection is closed, so the worker stops generating
        wait_until(lambda: suite.served_by_hostile("hang")[0]["client_closed_after_s"] is not None, timeout=5,
                   what="the hung request's connection to be closed")

    # the next request succeeds when the worker is fine (the breaker's probe, after a fault)
    def fine_again():
        before = len(suite.served_by_hostile("ok"))
        ok = suite.router.chat(content="hostile:ok").status_code == 200
        return ok and len(suite.served_by_hostile("ok")) > before
    wait_until(fine_again, timeout=10, interval=0.3, what="the worker to serve again")
    assert suite.breaker_open(wid) == 0
    suite.settled(gauge, worker_id=wid)


def test_an_answer_over_the_size_bound_is_a_502_and_memory_stays_bounded(suite):
    suite.only(("h-huge", suite.hostile.url, 0))
    gauge = suite.inflight()
    resp = requests.post(suite.router.url + "/v1/chat/completions", headers=suite.router.headers(), stream=True,
                         json={"model": MODEL, "messages": [{"role": "user", "content": "hostile:huge"}]}, timeout=120)
    try:
        if resp.status_code == 200:
            for _ in resp.iter_content(1 << 20):
                pass
        else:
            assert_openai_error(resp, 502, "upstream_error")
    finally:
        resp.close()
    assert resp.status_code == 502
    suite.settled(gauge)
    peak_mib = max(peak_rss_mib(pid) for pid in process_tree(suite.router.daemon.pid))
    assert peak_mib < 256, f"a router process peaked at {peak_mib:.0f} MiB"


def test_a_host_label_of_64_characters_is_an_upstream_error_not_a_leak(suite):
    bad = "http://" + "a" * 64 + ".localhost:8000"
    suite.only(("h-label-alone", bad, 0))
    gauge = suite.inflight()
    resp = suite.router.chat(timeout=30)
    assert_openai_error(resp, (502, 503))
    suite.settled(gauge, worker_id="h-label-alone")
    suite.only(("h-label-healthy", bad, 0), ("healthy", suite.sim.url, 5))
    assert_good_answer(suite.router.chat(timeout=30), stream=False)
    suite.settled(gauge)


def test_idle_connections_closed_by_the_worker_are_no_fault(suite):
    wid = "h-idle"
    suite.only((wid, suite.hostile.url, 0))
    gauge = suite.inflight()
    suite.hostile.mode(idle_close_ms=300, delay_ms=300)
    try:
        for _ in range(3):
            # many pooled connections in every router process, then a quiet moment that the
            # worker ends by closing them all
            assert run_load(lambda i: suite.router.chat(max_tokens=2).status_code, 16, 16).count(200) == 16
            time.sleep(0.8)
            assert [suite.router.chat(max_tokens=2).status_code for _ in range(6)] == [200] * 6
            assert suite.breaker_open(wid) == 0
    finally:
        suite.hostile.mode(idle_close_ms=60000, delay_ms=0)
    suite.settled(gauge)


# -- bursts after quiet moments longer than the workers' keep-alive -------------------------

BURSTS = (48, 12, 48, 12, 10)  # 130 requests


def burst_load(suite, model: str, worker_ids: list[str], quiet_s: float) -> list:
    results = []
    for i, size in enumerate(BURSTS):
        if i:
            time.sleep(quiet_s)
        results += run_load(lambda n: suite.patient.chat(model=model, max_tokens=4).status_code, size, size)
        assert all(suite.breaker_open(w, suite.patient) == 0 for w in worker_ids), (i, results)
    return results


def breakers_opened(suite, worker_ids) -> float:
    m = suite.patient.metrics()
    return sum(metric_sum(m, "gpufleet_router_breaker_transitions_total", worker=w, state="open")
               for w in worker_ids)


def all_bursts_served(suite, model: str, worker_ids: list[str], quiet_s: float) -> None:
    """Once the workers answer: the bursts with ``quiet_s`` lulls all get 200, no breaker
    opens, and the router's in-flight gauge settles back."""
    wait_until(lambda: suite.patient.chat(model=model).status_code == 200, timeout=10,
               what=f"the burst workers {worker_ids}")
    gauge = suite.inflight(suite.patient)
    results = burst_load(suite, model, worker_ids, quiet_s=quiet_s)
    assert results.count(200) == 130, [r for r in results if r != 200][:5]
    assert breakers_opened(suite, worker_ids) == 0
    suite.settled(gauge, suite.patient)


def test_bursts_against_workers_closing_idle_connections_after_1s(suite, module_daemons):
    model = "burst-model"
    ids = [f"burst{i}" for i in range(3)]
    for wid in ids:
        worker = HostileWorker(module_daemons, wid, "--idle-close-ms", "1000", "--delay-ms", "150", model=model)
        suite.fleet.publisher.publish_worker(wid, model, worker.url)
    all_bursts_served(suite, model, ids, quiet_s=3)


def test_bursts_against_simulators_with_vllms_5s_keep_alive(suite):
    model = "sim-burst-model"
    ids = [f"simburst{i}" for i in range(2)]
    for wid in ids:
        suite.fleet.sim(wid, "--keep-alive-timeout", "5", model=model)
    all_bursts_served(suite, model, ids, quiet_s=6)


# -- clients that go away ---------------------------------------------------------------------

def test_a_client_that_gives_up_on_a_non_streamed_request_cancels_it_on_the_worker(suite):
    wid = "h-cancel"
    suite.only((wid, suite.hostile.url, 0))
    suite.hostile.reset()
    gauge = suite.inflight(suite.patient)
    with pytest.raises(requests.exceptions.ReadTimeout):
        suite.patient.chat(content="hostile:hang", timeout=1)
    gave_up = time.monotonic()
    wait_until(lambda: suite.served_by_hostile("hang")[0]["client_closed_after_s"] is not None, timeout=2,
               what="the worker to see its request aborted")
    assert time.monotonic() - gave_up < 2
    suite.settled(gauge, suite.patient)
    assert suite.breaker_open(wid, suite.patient) == 0  # the client's choice, not the worker's fault

    # the same against the simulator: it counts the request as aborted
    suite.only(("healthy", suite.sim.url, 0))
    aborted = metric_sum(suite.sim.metrics(), "vllm:request_success_total", finished_reason="abort")
    with pytest.raises(requests.exceptions.ReadTimeout):
        suite.patient.chat(content="a long story", max_tokens=3000, timeout=1)
    wait_until(lambda: metric_sum(suite.sim.metrics(), "vllm:request_success_total",
                                  finished_reason="abort") == aborted + 1,
               timeout=2, interval=0.1, what="the simulator to abort the request")
    suite.settled(gauge, suite.patient)


# -- surfaces that clients use ---------------------------------------------------------------

def test_health_answers_like_vllms(suite):
    resp = requests.get(suite.router.url + "/health", timeout=5)
    assert resp.status_code == 200


def test_the_openai_sdk_retrieves_a_model(suite):
    suite.only(("healthy", suite.sim.url, 0))
    client = openai.OpenAI(base_url=suite.router.url + "/v1", api_key=suite.router.key, max_retries=0)
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_every_answer_carries_a_request_id_which_the_worker_gets_too(suite):
    suite.only(("h-reqid", suite.hostile.url, 0))
    suite.hostile.reset()
    url, headers = suite.router.url, suite.router.headers()

    # the client's own id, when sane, is kept, sent to the worker and returned
    resp = requests.post(
        url + "/v1/chat/completions", timeout=10, headers={**headers, "X-Request-Id": "client-id-123"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hostile:ok"}]})
    assert resp.status_code == 200 and resp.headers.get("X-Request-Id") == "client-id-123"
    assert suite.hostile.requests()[-1]["headers"].get("x-request-id") == "client-id-123"

    # none, or one not fit for logs: a new one, also the worker's
    for sent in (None, "bad id\twith spaces", "x" * 500):
        extra = {"X-Request-Id": sent} if sent else {}
        resp = requests.post(url + "/v1/chat/completions", timeout=10, headers={**headers, **extra},
                             json={"model": MODEL, "messages": [{"role": "user", "content": "hostile:ok"}]})
        rid = resp.headers.get("X-Request-Id")
        assert resp.status_code == 200 and rid and rid != sent and len(rid) <= 128 and rid.isprintable()
        assert suite.hostile.requests()[-1]["headers"].get("x-request-id") == rid

    # and every other answer: errors of the client, of the worker, streams, other paths
    answers = [
        requests.post(url + "/v1/chat/completions", json={"model": MODEL}, timeout=10),  # 401
        requests.post(url + "/v1/chat/completions", data=b"{", headers=headers, timeout=10),  # 400
        requests.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}, headers=headers, timeout=10),
        requests.get(url + "/v1/models", headers=headers, timeout=10),
        requests.get(url + "/no/such/path", timeout=10),
        suite.router.chat(content="hostile:error_500"),  # 502
        suite.router.chat(content="hostile:hang"),  # 504
        suite.router.chat(content="hostile:ok", stream=True),
        suite.router.chat(content="hostile:error_400"),
    ]
    missing = [(r.request.method, r.request.path_url, r.status_code) for r in answers
               if not r.headers.get("X-Request-Id")]
    assert not missing


def test_a_503_says_when_to_retry(suite):
    model = "ghost-model"
    suite.fleet.publisher.publish_worker("ghost", model, suite.hostile.url)
    wait_until(lambda: all(suite.router.chat(model=model, content="hostile:ok").status_code == 200
                           for _ in range(6)), timeout=10, what="every router process to know the model")
    suite.fleet.publisher.unpublish_worker("ghost", model, "removed")
    resp, = wait_until(lambda: (r := suite.router.chat(model=model)).status_code != 200 and [r], timeout=10,
                       what="the model to have no worker")
    assert_openai_error(resp, 503, "service_unavailable_error")
    assert resp.headers.get("Retry-After", "").isdigit(), resp.headers


def test_deeply_nested_json_is_a_400(suite):
    depth = 100_000
    body = b'{"model": "' + MODEL.encode() + b'", "messages": ' + b"[" * depth + b"]" * depth + b"}"
    resp = requests.post(suite.router.url + "/v1/chat/completions", data=body, timeout=30,
                         headers={**suite.router.headers(), "Content-Type": "application/json"})
    assert_openai_error(resp, 400, "invalid_request_error")


def test_a_64mib_body_sent_without_expect_gets_its_413(suite):
    body = b'{"model": "' + MODEL.encode() + b'", "prompt": "' + b"x" * (64 << 20) + b'"}'
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {suite.router.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    # a plain client: it sends the whole body, then reads the answer
    with socket.create_connection(("127.0.0.1", suite.router.port), timeout=60) as sock:
        sock.sendall(head + body)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 413, answer.status
        assert json.loads(answer.read())["error"]["type"] == "invalid_request_error"
    # urllib3 (requests, the openai SDK) stops sending when the answer comes early, and reads it
    resp = requests.post(suite.router.url + "/v1/completions", data=body, timeout=60,
                         headers={**suite.router.headers(), "Content-Type": "application/json"})
    assert_openai_error(resp, 413, "invalid_request_error")


# -- last: nothing leaked by any test of this module ------------------------------------------

def test_zz_after_the_suite_no_lease_is_left_and_the_gauges_read_zero(suite):
    # (the module's last test: pytest runs a module's tests in their order in the file)
    suite.only()
    wait_until(lambda: suite.leases() == 0, timeout=15, what="no inflight:* member left in Redis")
    left = {k: suite.redis.zrange(k, 0, -1) for k in suite.redis.scan_iter(suite.fleet.keys.inflight("*"))}
    assert not any(left.values()), left
    for router in (suite.router, suite.patient):
        assert suite.inflight(router) == 0, router.daemon.name


# -- helpers ---------------------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def peak_rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0

