"""The router's per-model and per-key figures against real answers: tokens counted per API
key name equal the ``usage`` the clients received; attempts, time before the worker and
client-seen TTFT are observed once per request; the optional JSON access log."""

from __future__ import annotations

import json

import pytest
import requests
from test_router_helpers import MODEL, RouterFleet, metric_sum

from gpufleet.common.ids import API_KEY_PREFIX, new_secret, sha256_hex


@pytest.fixture
def fleet(daemons, redis_url):
    f = RouterFleet(daemons, redis_url)
    yield f
    f.redis.close()


def named_key(fleet: RouterFleet, name: str) -> str:
    key = new_secret(API_KEY_PREFIX)
    fleet.publisher.publish_api_key(sha256_hex(key), f"id-{name}", name, ())
    return key


def stream_usage(resp: requests.Response) -> tuple[int, int] | None:
    usage = None
    for line in resp.iter_lines():
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = (event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"])
    return usage


def test_tokens_per_key_match_the_answers_usage_and_the_access_log_has_each_request(fleet):
    fleet.sim("w1", "--itl-ms", "1")
    fleet.sim("w2", "--itl-ms", "1")
    router = fleet.router(GPUFLEET_ROUTER_ACCESS_LOG="true")
    keys = {"team-a": named_key(fleet, "team-a"), "team-b": named_key(fleet, "team-b")}
    expected = {"team-a": [0, 0], "team-b": [0, 0]}
    request_ids = []

    def add(name, usage):
        expected[name][0] += usage[0]
        expected[name][1] += usage[1]

    for i in range(6):  # team-a: plain answers, usage in the body
        resp = router.chat(f"question {i}", max_tokens=5 + i, key=keys["team-a"])
        assert resp.status_code == 200, resp.text
        add("team-a", (resp.json()["usage"]["prompt_tokens"], resp.json()["usage"]["completion_tokens"]))
        request_ids.append(resp.headers["X-Request-Id"])
    for i in range(4):  # team-b: streams asking for the final usage chunk
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"stream {i}"}], "max_tokens": 6 + i,
                "stream": True, "stream_options": {"include_usage": True}}
        resp = requests.post(router.url + "/v1/chat/completions", json=body, headers=router.headers(keys["team-b"]),
                             stream=True, timeout=30)
        usage = stream_usage(resp)
        assert usage is not None
        add("team-b", usage)
        request_ids.append(resp.headers["X-Request-Id"])
    # a stream without include_usage: no usage reaches the client, none is counted
    body = {"model": MODEL, "prompt": "no usage", "max_tokens": 4, "stream": True}
    resp = requests.post(router.url + "/v1/completions", json=body, headers=router.headers(keys["team-b"]),
                         stream=True, timeout=30)
    assert stream_usage(resp) is None
    request_ids.append(resp.headers["X-Request-Id"])

    m = router.metrics()
    for name, (prompt, completion) in expected.items():
        assert prompt > 0 and completion > 0
        assert metric_sum(m, "gpufleet_router_prompt_tokens_total", model=MODEL, api_key=name) == prompt
        assert metric_sum(m, "gpufleet_router_completion_tokens_total", model=MODEL, api_key=name) == completion
    total = len(request_ids)
    assert metric_sum(m, "gpufleet_router_attempts_per_request_count", model=MODEL) == total
    assert metric_sum(m, "gpufleet_router_attempts_per_request_bucket", model=MODEL, le="1.0") == total
    assert metric_sum(m, "gpufleet_router_time_before_upstream_seconds_count", model=MODEL) == total
    assert metric_sum(m, "gpufleet_router_client_ttft_seconds_count", model=MODEL) == 5  # the streams

    lines = [json.loads(line) for line in router.daemon.output().splitlines() if line.startswith("{")]
    by_id = {entry["request_id"]: entry for entry in lines}
    assert set(request_ids) <= set(by_id)
    first = by_id[request_ids[0]]
    assert first["api_key"] == "team-a" and first["model"] == MODEL and first["status"] == 200
    assert first["worker"] in ("w1", "w2") and first["attempts"] == 1 and first["duration_ms"] > 0
    assert (first["prompt_tokens"], first["completion_tokens"]) != (None, None)
    assert by_id[request_ids[6]]["ttft_ms"] > 0 and by_id[request_ids[0]]["ttft_ms"] is None
    assert not any(k in line for line in router.daemon.output().splitlines() for k in keys.values())


def test_retries_show_in_attempts_per_request_and_the_access_log_is_off_by_default(fleet):
    bad = fleet.sim("bad")
    fleet.sim("good")
    bad.faults("error")  # every completion on "bad" answers 500: a request landing there is retried
    router = fleet.router(processes=1)
    for i in range(12):
        assert router.chat(f"retry {i}").status_code == 200
    m = router.metrics()
    assert metric_sum(m, "gpufleet_router_attempts_per_request_count", model=MODEL) == 12
    retried = 12 - metric_sum(m, "gpufleet_router_attempts_per_request_bucket", model=MODEL, le="1.0")
    assert retried >= 1
    assert retried == metric_sum(m, "gpufleet_router_retries_total")
    assert not [line for line in router.daemon.output().splitlines() if line.startswith("{")]
