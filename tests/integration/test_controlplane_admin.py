"""The admin API of the control plane on a real process, real PostgreSQL and Redis."""

import hashlib

import requests

from gpufleet.controlplane.testing import ADMIN_TOKEN


def test_admin_api_requires_the_admin_token(cp):
    for method, path in [("GET", "/v1/admin/instances"), ("POST", "/v1/admin/instances"),
                         ("GET", "/v1/admin/workers"), ("GET", "/v1/admin/keys"), ("POST", "/v1/admin/keys"),
                         ("DELETE", "/v1/admin/keys/x"), ("GET", "/v1/admin/status"),
                         ("GET", "/v1/admin/scaling"), ("POST", "/v1/admin/instances/i/rotate-token"),
                         ("POST", "/v1/admin/workers/w/drain")]:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": ADMIN_TOKEN}):
            resp = requests.request(method, cp.url + path, headers=headers, json={}, timeout=10)
            assert resp.status_code == 401, (method, path, headers, resp.text)
            assert set(resp.json()["error"]) == {"message", "code"}
    assert cp.query("SELECT count(*) FROM instances") == [(0,)]


def test_instances_add_is_idempotent_and_listed(cp):
    first = cp.admin("POST", "/v1/admin/instances", json={"instance_id": "i1", "hostname": "gpu-1",
                                                           "model_id": "m1", "provider_instance_id": "ocid1"})
    assert first.status_code == 201
    again = cp.admin("POST", "/v1/admin/instances", json={"instance_id": "i1", "hostname": "changed", "model_id": "m1"})
    assert again.status_code == 200 and again.json()["instance"]["hostname"] == "gpu-1"
    bad = cp.admin("POST", "/v1/admin/instances", json={"hostname": "x"})
    assert bad.status_code == 400 and "instance_id" in bad.json()["error"]["message"]
    listed = cp.admin("GET", "/v1/admin/instances").json()["instances"]
    assert [(i["instance_id"], i["hostname"], i["has_token"]) for i in listed] == [("i1", "gpu-1", False)]


def test_keys_are_hashed_published_and_revoked(cp):
    resp = cp.admin("POST", "/v1/admin/keys", json={"name": "team-a", "models": ["m1", "m2"], "rpm": 60})
    assert resp.status_code == 201, resp.text
    key, key_id = resp.json()["key"], resp.json()["key_id"]
    assert key.startswith("gfk_")
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert cp.redis.hgetall(f"gpufleet:apikey:{digest}") == {"key_id": key_id, "name": "team-a",
                                                             "models": "m1,m2", "rpm": "60"}
    assert key not in repr(cp.query("SELECT * FROM api_keys"))
    listed = cp.admin("GET", "/v1/admin/keys").text
    assert key not in listed and digest not in listed and key_id in listed
    assert cp.admin("DELETE", f"/v1/admin/keys/{key_id}").status_code == 200
    assert not cp.redis.exists(f"gpufleet:apikey:{digest}")
    assert cp.query("SELECT revoked_at IS NOT NULL FROM api_keys") == [(True,)]
    assert cp.admin("DELETE", "/v1/admin/keys/key_unknown").status_code == 404
    assert cp.admin("POST", "/v1/admin/keys", json={"name": "x", "rpm": -1}).status_code == 400


def test_health_readiness_and_status(cp):
    assert requests.get(cp.url + "/healthz", timeout=10).status_code == 200
    assert requests.get(cp.url + "/readyz", timeout=10).json() == {"status": "ready"}
    token = cp.enrol("i1")
    cp.heartbeat("i1", token, status="starting")
    status = cp.admin("GET", "/v1/admin/status").json()
    assert status["workers"]["total"] == 1 and status["workers"]["routable"] == 0
    assert status["workers"]["by_status"] == {"starting": 1}
    assert status["instances"]["total"] == 1
    metrics = requests.get(cp.url + "/metrics", timeout=10).text
    assert 'gpufleet_workers{health="starting"} 1.0' in metrics
    assert 'gpufleet_workers_reported_status{status="starting"} 1.0' in metrics
    assert 'gpufleet_cp_registrations_total{result="enrolled"} 1.0' in metrics
    assert 'gpufleet_cp_heartbeats_total{status="starting"} 1.0' in metrics
