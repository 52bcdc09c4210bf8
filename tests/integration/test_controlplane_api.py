"""The worker API of the control plane on a real process, real PostgreSQL and Redis:
per-instance tokens, registration and heartbeats, payload validation."""

import requests

from gpufleet.controlplane.testing import registration


def test_enrolment_issues_a_token_once_and_stores_only_hashes(cp):
    cp.add_instance("i1")
    secret = cp.join_secrets["i1"]
    assert secret.startswith("gfj_")
    resp = cp.register("i1", token=secret)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    token = body["bootstrap_token"]
    assert token.startswith("gfw_") and body["worker_id"] == "i1" and body["heartbeat_interval_s"] == 1.0
    # the database holds hashes and short prefixes, never the token or the join secret
    rows = cp.query("SELECT * FROM worker_auth_tokens")
    assert len(rows) == 1
    dump = "".join(repr(cp.query(f"SELECT * FROM {t}")) for t in ("worker_auth_tokens", "workers", "join_secrets"))
    for clear in (token, secret):
        assert clear not in dump and clear[4:] not in dump
    # the join secret is used up; the token itself works
    second = cp.register("i1", token=secret)
    assert second.status_code == 401 and second.json()["error"]["code"] == "invalid_credentials"
    again = cp.register("i1", token=token)
    assert again.status_code == 200 and "bootstrap_token" not in again.json()
    assert cp.query("SELECT last_used_at IS NOT NULL FROM worker_auth_tokens") == [(True,)]


def test_unknown_and_retired_instances_are_refused(cp):
    resp = cp.register("nobody")
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_credentials"
    token = cp.enrol("old")
    assert cp.admin("POST", "/v1/admin/instances/old/retire").status_code == 200
    assert cp.register("old", token=token).status_code == 401
    assert cp.heartbeat("old", token).status_code == 401
    assert cp.query("SELECT count(*) FROM workers WHERE instance_id = 'nobody'") == [(0,)]


def test_a_token_is_bound_to_its_instance(cp):
    token_a = cp.enrol("a")
    token_b = cp.enrol("b")
    # A's token cannot register or heartbeat as B, nor claim B's worker
    assert cp.register("b", token=token_a).status_code == 403
    assert cp.heartbeat("b", token_a).status_code == 403
    assert cp.register("a", worker_id="b", token=token_a).status_code == 403
    assert cp.heartbeat("a", token_a, worker_id="b").status_code == 403
    # garbage and missing tokens
    assert cp.heartbeat("a", "gfw_nonsense").status_code == 401
    assert cp.heartbeat("a", None).status_code == 401
    assert cp.register("a", token="gfw_nonsense").status_code == 401
    assert cp.heartbeat("a", token_a).status_code == 200
    assert cp.heartbeat("b", token_b).status_code == 200
    metrics = requests.get(cp.url + "/metrics", timeout=10).text
    assert 'gpufleet_cp_auth_failures_total{kind="worker",reason="token_instance_mismatch"}' in metrics


def test_rotation_invalidates_the_old_token_at_once(cp):
    old = cp.enrol("i1")
    assert cp.heartbeat("i1", old).status_code == 200
    resp = cp.admin("POST", "/v1/admin/instances/i1/rotate-token")
    assert resp.status_code == 200
    new = resp.json()["token"]
    assert new != old and new.startswith("gfw_")
    assert cp.heartbeat("i1", old).status_code == 401
    assert cp.register("i1", token=old).status_code == 401
    assert cp.heartbeat("i1", new).status_code == 200
    assert cp.register("i1", token=new).status_code == 200
    assert cp.admin("POST", "/v1/admin/instances/ghost/rotate-token").status_code == 404


BAD_REGISTRATIONS = [
    ({"instance_id": None}, "instance_id"),
    ({"model_id": None}, "model_id"),
    ({"advertise_url": "not a url"}, "advertise_url"),
    ({"agent_url": "ftp://x:1"}, "agent_url"),
    ({"tensor_parallel_size": "2"}, "tensor_parallel_size"),
    ({"tensor_parallel_size": True}, "tensor_parallel_size"),
    ({"gpu_memory_utilization": 3}, "gpu_memory_utilization"),
    ({"gpus": "all"}, "gpus"),
    ({"gpus": [{"index": "zero"}]}, "index"),
    ({"worker_id": "has space"}, "worker_id"),
]


def test_bad_registrations_name_the_field_and_change_nothing(cp):
    cp.add_instance("i1")
    for change, field in BAD_REGISTRATIONS:
        body = registration("i1")
        for key, value in change.items():
            if value is None:
                body.pop(key)
            else:
                body[key] = value
        resp = requests.post(cp.url + "/internal/worker/register", json=body, timeout=10)
        assert resp.status_code == 400, (change, resp.text)
        error = resp.json()["error"]
        assert field in error["message"] and error["code"] == "invalid_request", (change, error)
    assert cp.query("SELECT count(*) FROM worker_auth_tokens") == [(0,)]
    assert cp.query("SELECT count(*) FROM workers") == [(0,)]


def test_bad_heartbeats_huge_bodies_and_non_json(cp):
    token = cp.enrol("i1")
    headers = {"Authorization": f"Bearer {token}"}
    url = cp.url + "/internal/worker/heartbeat"
    for body, field in [({"instance_id": "i1", "worker_id": "i1", "model_id": "m1"}, "status"),
                        ({"instance_id": "i1", "worker_id": "i1", "model_id": "m1", "status": "dancing"}, "status"),
                        ({"instance_id": "i1", "worker_id": "i1", "model_id": "m1", "status": "ready",
                          "queue_depth": "many"}, "queue_depth"),
                        ({"instance_id": "i1", "worker_id": "i1", "model_id": "m1", "status": "ready",
                          "kv_cache_usage": 7}, "kv_cache_usage")]:
        resp = requests.post(url, json=body, headers=headers, timeout=10)
        assert resp.status_code == 400 and field in resp.json()["error"]["message"], resp.text
    assert cp.query("SELECT last_heartbeat_at FROM workers") == [(None,)]
    huge = registration("i1", agent_version="x" * 100_000)
    resp = requests.post(cp.url + "/internal/worker/register", json=huge, headers=headers, timeout=10)
    assert resp.status_code == 413 and "GPUFLEET_MAX_BODY_BYTES" in resp.json()["error"]["message"]
    resp = requests.post(url, data="{not json", headers=headers, timeout=10)
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]
    resp = requests.post(url, json=[1, 2], headers=headers, timeout=10)
    assert resp.status_code == 400
    assert cp.query("SELECT agent_version, last_heartbeat_at FROM workers") == [("0.2.0", None)]


def test_heartbeat_updates_the_row_and_delivers_drain_and_undrain(cp):
    token = cp.enrol("i1")
    resp = cp.heartbeat("i1", token, status="starting", queue_depth=3, gpu_util=55.5, ttft_p95_ms=120)
    assert resp.status_code == 200 and resp.json() == {}
    assert cp.query("SELECT status, queue_depth, gpu_util, ttft_p95_ms FROM workers") == [("starting", 3, 55.5, 120)]
    assert cp.admin("POST", "/v1/admin/workers/i1/drain").status_code == 200
    assert cp.heartbeat("i1", token).json() == {"desired_status": "draining"}
    assert cp.admin("POST", "/v1/admin/workers/i1/undrain").status_code == 200
    # the undrain is delivered until the worker reports ready again
    assert cp.heartbeat("i1", token, status="draining").json() == {"desired_status": "ready"}
    assert cp.heartbeat("i1", token, status="ready").json() == {}
    assert cp.admin("POST", "/v1/admin/workers/ghost/drain").status_code == 404
    assert cp.heartbeat("i1", token, worker_id="i1", model_id="other").status_code == 409


def test_deep_json_is_a_400_on_every_json_endpoint(cp):
    token = cp.enrol("i1")
    deep = "[" * 5000 + "]" * 5000
    deep_in_object = '{"instance_id": "i1", "gpus": ' + "[" * 100 + "]" * 100 + "}"
    worker = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    admin = {**cp.admin("GET", "/v1/admin/keys").request.headers, "Content-Type": "application/json"}
    calls = [("/internal/worker/register", {"Content-Type": "application/json"}),
             ("/internal/worker/heartbeat", worker),
             ("/v1/admin/instances", admin), ("/v1/admin/keys", admin)]
    for path, headers in calls:
        for body in (deep, deep_in_object):
            resp = requests.post(cp.url + path, data=body, headers=headers, timeout=10)
            assert resp.status_code == 400, (path, resp.status_code, resp.text[:200])
            assert "nests deeper" in resp.json()["error"]["message"]
    assert cp.query("SELECT count(*) FROM instances") == [(1,)]


def test_worker_urls_must_be_plain_http_without_control_characters(cp):
    token = cp.enrol("i1")
    refused = {
        "http://127.0.0.1:8000\nINFO forged log line": "control characters",
        "https://10.0.0.7:8000": "https worker URLs are not supported",
        "http://10.0.0.7": "http://host:port",
        "http://-bad-.example:8000": "not a valid host name",
        "http://a_b.example:8000": "not a valid host name",
        "http://user:pw@10.0.0.7:8000": "no credentials",
    }
    for value, needle in refused.items():
        for field in ("advertise_url", "agent_url"):
            resp = cp.register("i1", token=token, **{field: value})
            assert resp.status_code == 400 and needle in resp.json()["error"]["message"], (value, resp.text)
    forged = cp.register("i1", token=token, agent_version="0.2\nERROR forged")
    assert forged.status_code == 400 and forged.json()["error"]["field"] == "agent_version"
    ok = cp.register("i1", token=token, advertise_url="http://xn--bcher-kva.example:8000",
                     agent_url="http://gpu-1.tailnet.ts.net:8080/agent")
    assert ok.status_code == 200, ok.text
    assert cp.query("SELECT advertise_url FROM workers") == [("http://xn--bcher-kva.example:8000",)]
