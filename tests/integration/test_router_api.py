"""gpufleet-router's API: the official openai client, keys, and every error status with
OpenAI's error body. Real gunicorn router, real Redis, simulator workers."""

from __future__ import annotations

import os
import subprocess
import time

import openai
import pytest
import requests
from test_router_helpers import MODEL, RouterFleet, metric_sum

from gpufleet.common.ids import sha256_hex
from support.procs import wait_until


@pytest.fixture
def fleet(daemons, redis_url):
    return RouterFleet(daemons, redis_url)


def assert_openai_error(resp, status: int, code: str | None = None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


def test_openai_client_chat_text_streams_and_models(fleet):
    fleet.sim("w1")
    fleet.sim("w2")
    router = fleet.router(processes=2)
    client = openai.OpenAI(base_url=router.url + "/v1", api_key=fleet.key, max_retries=0, timeout=30)

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 5

    text = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4)
    assert text.choices[0].text and text.usage.completion_tokens == 4

    pieces = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True,
        stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert content
    assert pieces[-1].usage is not None and pieces[-1].usage.completion_tokens == 6  # include_usage honoured

    streamed_text = list(client.completions.create(model=MODEL, prompt="Once", max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in streamed_text if c.choices)

    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]

    m = router.metrics()
    assert metric_sum(m, "gpufleet_router_requests_total", model=MODEL, status="200") == 4
    assert metric_sum(m, "gpufleet_router_time_to_first_byte_seconds_count", model=MODEL) == 4
    assert metric_sum(m, "gpufleet_router_inflight_requests") == 0
    assert metric_sum(m, "gpufleet_router_redis_up") == 1


def test_revoked_key_gets_401_within_seconds(fleet):
    fleet.sim("w1")
    router = fleet.router(processes=2, GPUFLEET_ROUTER_KEY_CACHE_TTL_S=2)
    key = fleet.api_key()
    client = openai.OpenAI(base_url=router.url + "/v1", api_key=key, max_retries=0, timeout=30)
    for _ in range(4):  # warm both processes' caches
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    # revoke as the control plane does: delete the hash and publish a `keys` event
    fleet.publisher.delete_api_key(sha256_hex(key))
    wait_until(lambda: all(router.chat(key=key).status_code == 401 for _ in range(4)), timeout=5,
               what="the revoked key to be refused")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)

    # without the event (a missed message), the short positive TTL still ends it
    other = fleet.api_key()
    assert router.chat(key=other).status_code == 200
    fleet.redis.delete(fleet.keys.apikey(sha256_hex(other)))
    wait_until(lambda: all(router.chat(key=other).status_code == 401 for _ in range(4)), timeout=8,
               what="the deleted key to expire from the cache")


def test_invalid_key_flood_is_served_from_the_negative_cache(fleet):
    fleet.sim("w1")
    router = fleet.router(processes=2, GPUFLEET_ROUTER_KEY_NEGATIVE_TTL_S=30)
    session = requests.Session()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    for _ in range(200):
        resp = session.post(router.url + "/v1/chat/completions", json=body,
                            headers={"Authorization": "Bearer gfk_not_a_real_key"}, timeout=10)
        assert resp.status_code == 401
    lookups = metric_sum(router.metrics(), "gpufleet_router_key_lookups_total")
    assert 1 <= lookups <= 2, lookups  # one Redis read per process, not 200


def test_error_statuses_and_bodies(fleet):
    fleet.sim("w1", "--max-model-len", "256")
    fleet.sim("gone", model="retired-model")
    limited = fleet.api_key(models=("other-model",))
    router = fleet.router(processes=2, wait_workers=2, GPUFLEET_ROUTER_MAX_BODY_BYTES=4096)
    url = router.url + "/v1/chat/completions"
    ok_body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    err = assert_openai_error(requests.post(url, json=ok_body, timeout=10), 401, "missing_api_key")
    assert err["type"] == "authentication_error"
    assert_openai_error(requests.post(url, json=ok_body, headers={"Authorization": "Bearer nope"}, timeout=10),
                        401, "invalid_api_key")
    assert_openai_error(router.chat(key=limited), 403, "model_not_allowed")
    assert requests.get(router.url + "/v1/models", headers=router.headers(limited), timeout=10).json()["data"] == []
    assert_openai_error(requests.get(router.url + "/v1/models", timeout=10), 401)

    headers = {**router.headers(), "Content-Type": "application/json"}
    assert_openai_error(requests.post(url, data=b"{not json", headers=headers, timeout=10), 400, "invalid_json")
    assert_openai_error(requests.post(url, json=["a list"], headers=headers, timeout=10), 400, "invalid_json")
    err = assert_openai_error(requests.post(url, json={"messages": []}, headers=headers, timeout=10), 400,
                              "missing_model")
    assert err["param"] == "model"
    assert_openai_error(router.chat(model="no-such-model"), 404, "model_not_found")
    big = {**ok_body, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_openai_error(requests.post(url, json=big, headers=headers, timeout=10), 413, "request_too_large")

    # a model whose only worker left the ready set: known, but nothing can serve it
    fleet.sims[1].unpublish("draining")
    wait_until(lambda: all(router.chat(model="retired-model").status_code == 503 for _ in range(4)), timeout=10,
               what="503 for a model without workers")
    assert_openai_error(router.chat(model="retired-model"), 503, "no_routable_worker")

    # an upstream 4xx passes through as is, is not retried and does not count against the worker
    too_long = router.chat(max_tokens=10_000)
    assert too_long.status_code == 400, too_long.text
    assert "error" in too_long.json()
    m = router.metrics()
    assert metric_sum(m, "gpufleet_router_upstream_attempts_total", outcome="client_error") == 1
    assert metric_sum(m, "gpufleet_router_retries_total") == 0
    assert metric_sum(m, "gpufleet_router_breaker_state", worker="w1") == 0
    assert router.chat().status_code == 200

    # unknown paths and methods answer in the same error shape
    assert_openai_error(requests.get(router.url + "/v1/nothing", timeout=10), 404)
    assert_openai_error(requests.get(url, timeout=10), 405)


def test_requests_per_minute_limit_gives_429_shared_by_the_processes(fleet):
    fleet.sim("w1")
    router = fleet.router(processes=2)
    limited = fleet.api_key()
    fleet.publisher.publish_api_key(sha256_hex(limited), "limited-key", "limited", (), rpm=5)
    if time.time() % 60 > 50:  # keep the test inside one fixed one-minute window
        time.sleep(61 - time.time() % 60)
    assert [router.chat(key=limited, max_tokens=1).status_code for _ in range(5)] == [200] * 5
    refused = router.chat(key=limited, max_tokens=1)
    err = assert_openai_error(refused, 429, "rate_limit_exceeded")
    assert err["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # keys without a limit are not affected
    assert all(router.chat(max_tokens=1).status_code == 200 for _ in range(8))


def test_upstream_failures_become_502_and_504_after_retries(fleet):
    a, b = fleet.sim("w1"), fleet.sim("w2")
    router = fleet.router(processes=1, GPUFLEET_ROUTER_FIRST_BYTE_TIMEOUT_S=1, GPUFLEET_ROUTER_RETRIES=1,
                          GPUFLEET_ROUTER_BREAKER_FAILURES=100)
    a.faults("error")
    b.faults("error")
    err = assert_openai_error(router.chat(), 502, "upstream_error")
    assert "2 attempt" in err["message"]
    m = router.metrics()
    assert metric_sum(m, "gpufleet_router_upstream_attempts_total", outcome="server_error") == 2
    assert metric_sum(m, "gpufleet_router_retries_total", reason="server_error") == 1
    assert metric_sum(m, "gpufleet_router_requests_total", status="502") == 1

    a.faults("hang")
    b.faults("hang")
    err = assert_openai_error(router.chat(timeout=30), 504, "upstream_timeout")
    assert metric_sum(router.metrics(), "gpufleet_router_upstream_attempts_total", outcome="timeout") == 2
    # a stream that cannot start gets a plain error response, not a hang
    resp = router.chat(stream=True, timeout=30)
    assert resp.status_code == 504


def test_health_ready_and_config_errors(fleet, daemons):
    router = fleet.router(processes=1, wait_workers=0)
    assert requests.get(router.url + "/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(router.url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "ok" and ready.json()["redis"] is True

    script = daemons.script("gpufleet-router")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    missing = subprocess.run([script], env=env, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "GPUFLEET_REDIS_URL is not set" in missing.stderr
    bad = subprocess.run([script], env={**env, "GPUFLEET_REDIS_URL": fleet.redis_url,
                                        "GPUFLEET_ROUTER_FIRST_BYTE_TIMEOUT_S": "soon"},
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "GPUFLEET_ROUTER_FIRST_BYTE_TIMEOUT_S" in bad.stderr


def test_vllm_surfaces_request_ids_and_bad_input(fleet):
    """What clients of vLLM use besides completions: /health (guidellm probes it first),
    models.retrieve, X-Request-Id on every answer; and bad input answered, not crashed on."""
    sim = fleet.sim("w1")
    router = fleet.router(processes=1, GPUFLEET_ROUTER_MAX_BODY_BYTES=4096)
    client = openai.OpenAI(base_url=router.url + "/v1", api_key=fleet.key, max_retries=0, timeout=30)

    assert requests.get(router.url + "/health", timeout=5).status_code == 200
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")

    # the client's id is kept, sent to the worker (the simulator names its completion after it) and returned
    resp = requests.post(
        router.url + "/v1/chat/completions", headers={**router.headers(), "X-Request-Id": "req-abc.123"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=30)
    assert resp.status_code == 200 and resp.headers["X-Request-Id"] == "req-abc.123"
    assert resp.json()["id"].endswith("req-abc.123")
    # an id that is not a sane token is replaced by a new one; every answer has one, errors too
    odd = requests.post(router.url + "/v1/chat/completions", headers={**router.headers(), "X-Request-Id": "a b"},
                        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                        timeout=30)
    assert odd.status_code == 200 and len(odd.headers["X-Request-Id"]) == 32
    for answer in (requests.get(router.url + "/v1/models", timeout=5),
                   requests.get(router.url + "/nowhere", timeout=5),
                   requests.get(router.url + "/v1/completions", timeout=5),
                   requests.get(router.url + "/metrics", timeout=5),
                   router.chat(model="no-such-model")):
        assert answer.headers.get("X-Request-Id"), (answer.status_code, answer.headers)

    headers = {**router.headers(), "Content-Type": "application/json"}
    url = router.url + "/v1/chat/completions"
    deep = b'{"model": "' + MODEL.encode() + b'", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    roomy = fleet.router(processes=1, name="router-big", GPUFLEET_ROUTER_MAX_BODY_BYTES=1 << 20)
    assert_openai_error(requests.post(roomy.url + "/v1/chat/completions", data=deep, headers=headers,
                                      timeout=30), 400, "invalid_json")
    # a large body sent whole, without Expect: the client still reads the 413 (the body is drained)
    huge = b"x" * (64 << 20)
    assert_openai_error(requests.post(url, data=huge, headers=headers, timeout=60), 413, "request_too_large")

    # 503s say when to come back
    sim.unpublish("draining")
    wait_until(lambda: router.chat().status_code == 503, timeout=10, what="503 without workers")
    resp = router.chat()
    assert_openai_error(resp, 503, "no_routable_worker")
    assert resp.headers["Retry-After"].isdigit()
    assert metric_sum(router.metrics(), "gpufleet_router_inflight_requests") == 0


def test_metrics_readable_only_from_the_allow_list(fleet):
    """The router listens where clients are; GPUFLEET_METRICS_ALLOW_FROM keeps /metrics to the
    scrapers' addresses while every other path stays open."""
    outsider = fleet.router(processes=1, wait_workers=0, name="router-closed",
                            GPUFLEET_METRICS_ALLOW_FROM="10.9.9.9/32")
    denied = requests.get(outsider.url + "/metrics", timeout=5)
    assert denied.status_code == 403 and "GPUFLEET_METRICS_ALLOW_FROM" in denied.json()["error"]["message"]
    assert "gpufleet_router" not in denied.text
    assert requests.get(outsider.url + "/healthz", timeout=5).status_code == 200
    assert requests.get(outsider.url + "/health", timeout=5).status_code == 200

    scraper = fleet.router(processes=1, wait_workers=0, name="router-open",
                           GPUFLEET_METRICS_ALLOW_FROM="127.0.0.1, 10.9.9.9")
    allowed = requests.get(scraper.url + "/metrics", timeout=5)
    assert allowed.status_code == 200 and "gpufleet_router_redis_up" in allowed.text


def test_metrics_allow_list_is_validated_at_start(fleet, daemons):
    script = daemons.script("gpufleet-router")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    bad = subprocess.run([script], env={**env, "GPUFLEET_REDIS_URL": fleet.redis_url,
                                        "GPUFLEET_METRICS_ALLOW_FROM": "prometheus.local"},
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "GPUFLEET_METRICS_ALLOW_FROM" in bad.stderr
