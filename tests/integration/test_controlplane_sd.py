"""``GET /v1/sd/prometheus`` on a real control plane: its own token, and workers coming and going."""

import pytest
import requests

from gpufleet.controlplane.testing import ADMIN_TOKEN, ControlPlaneClient, cp_env, start_control_plane

SD_TOKEN = "gfs_sd-token-0123456789abcdef"


@pytest.fixture
def sd_cp(daemons, database_url, redis_url, redis_server):
    env = cp_env(database_url, redis_url, GPUFLEET_SD_TOKEN=SD_TOKEN, GPUFLEET_SD_ROUTER_URLS="http://10.1.0.2:8002")
    _, url = start_control_plane(daemons, env)
    return ControlPlaneClient(url, database_url)


def sd(cp, token=SD_TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(cp.url + "/v1/sd/prometheus", headers=headers, timeout=10)


def test_needs_the_sd_token_which_opens_nothing_else(sd_cp):
    assert sd(sd_cp, None).status_code == 401
    assert sd(sd_cp, "gfs_wrong-token-0123456789").status_code == 401
    assert sd(sd_cp, ADMIN_TOKEN).status_code == 401  # the admin token is not needed and not accepted here
    resp = requests.get(sd_cp.url + "/v1/admin/workers", headers={"Authorization": f"Bearer {SD_TOKEN}"},
                        timeout=10)
    assert resp.status_code == 401
    ok = sd(sd_cp)
    assert ok.status_code == 200 and ok.headers["Content-Type"].startswith("application/json")
    assert ok.json() == [{"targets": ["10.1.0.2:8002"],
                          "labels": {"__scheme__": "http", "__metrics_path__": "/metrics", "role": "router"}}]
    metrics = requests.get(sd_cp.url + "/metrics", timeout=10).text
    assert 'gpufleet_cp_auth_failures_total{kind="sd",reason="invalid"} 2.0' in metrics


def test_workers_appear_on_register_and_leave_when_retired(sd_cp):
    token = sd_cp.enrol("gpu-1")
    resp = sd_cp.register("gpu-1", token=token, advertise_url="http://10.2.0.7:8000",
                          agent_url="http://10.2.0.7:8080")
    assert resp.status_code == 200, resp.text
    sd_cp.heartbeat("gpu-1", token, status="ready")
    workers = [g for g in sd(sd_cp).json() if g["labels"]["role"] in ("agent", "vllm")]
    assert [(g["targets"], g["labels"]["role"], g["labels"]["model"], g["labels"]["worker_id"]) for g in workers] == [
        (["10.2.0.7:8080"], "agent", "m1", "gpu-1"), (["10.2.0.7:8000"], "vllm", "m1", "gpu-1")]
    assert sd_cp.admin("POST", "/v1/admin/instances/gpu-1/retire").status_code == 200
    assert [g["labels"]["role"] for g in sd(sd_cp).json()] == ["router"]


def test_off_without_a_token(daemons, database_url, redis_url):
    _, url = start_control_plane(daemons, cp_env(database_url, redis_url), name="cp-no-sd")
    resp = requests.get(url + "/v1/sd/prometheus", headers={"Authorization": f"Bearer {SD_TOKEN}"}, timeout=10)
    assert resp.status_code == 404 and "GPUFLEET_SD_TOKEN" in resp.json()["error"]["message"]
