"""The agent's routes on an app built without its background loops (no sockets)."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.agent.app import create_app
from gpufleet.agent.config import load_config

ENV = {"INSTANCE_ID": "gpu-01", "CONTROL_PLANE_URL": "http://127.0.0.1:9", "MODEL_ID": "m",
       "AGENT_ADMIN_TOKEN": "s3cret-admin"}


@pytest.fixture
def app():
    app = create_app(load_config(ENV), start=False)
    yield app


def metric_values(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_healthz_and_a_fresh_agent_is_not_ready(app):
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    resp = client.get("/readyz")
    assert resp.status_code == 503
    body = resp.get_json()
    assert body["ready"] is False and body["status"] == "starting"
    assert {"vllm_health", "model_listed", "warmup", "token", "registration"} <= set(body["failing"])
    assert "not_draining" not in body["failing"]


def test_readyz_turns_200_when_every_check_holds(app):
    agent = app.extensions["gpufleet_agent"]
    snap = agent.vllm.snapshot
    snap.healthy = snap.model_listed = snap.warmed = True
    snap.polled_at = agent.vllm._clock()
    agent.tokens._token = "gfw_test"
    agent.registrar.accepted = True
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    assert client.post("/drain").status_code == 200  # the test client calls from 127.0.0.1
    resp = client.get("/readyz")
    assert resp.status_code == 503 and resp.get_json()["failing"] == ["not_draining"]
    assert agent.status() == "draining"
    assert client.post("/undrain").status_code == 200
    assert client.get("/readyz").status_code == 200
    # the control plane's drain lifts only when the control plane says so (or an operator undrains)
    agent.apply_desired_status("draining")
    assert client.get("/readyz").status_code == 503
    agent.apply_desired_status(None)
    assert client.get("/readyz").status_code == 200


def test_drain_from_a_remote_caller_needs_the_admin_token(app):
    client = app.test_client()
    remote = {"REMOTE_ADDR": "10.1.2.3"}
    assert client.post("/drain", environ_base=remote).status_code == 403
    assert client.post("/drain", environ_base=remote, headers={"Authorization": "Bearer wrong"}).status_code == 403
    resp = client.post("/drain", environ_base=remote, headers={"Authorization": "Bearer s3cret-admin"})
    assert resp.status_code == 200 and resp.get_json()["draining"] is True
    assert client.post("/undrain", environ_base=remote).status_code == 403
    assert client.post("/undrain", environ_base={"REMOTE_ADDR": "::1"}).status_code == 200


def test_metrics_and_info_without_gpus(app):
    client = app.test_client()
    values = metric_values(client.get("/metrics").get_data(as_text=True))
    assert values[("gpufleet_agent_gpus", ())] == 0
    assert values[("gpufleet_agent_status", (("status", "starting"),))] == 1
    assert values[("gpufleet_agent_ready", ())] == 0
    assert values[("gpufleet_agent_registration_state", (("state", "unregistered"),))] == 1
    info = client.get("/info").get_json()
    assert info["gpus"] == [] and info["gpu_count"] == 0
    assert info["instance_id"] == "gpu-01" and info["model_id"] == "m" and info["inflight"] == 0
    assert info["versions"]["agent"]
