"""Enrolment on a real control plane process, PostgreSQL and Redis (issue 9): nobody joins
uninvited, every refusal looks the same and writes nothing, and a worker token cannot act
as another worker id or model."""

import requests

from gpufleet.controlplane.testing import registration

TABLES = ("instances", "instance_workers", "join_secrets", "worker_auth_tokens", "workers")


def snapshot(cp):
    """Every row the enrolment could touch, and every Redis key."""
    rows = {t: cp.query(f"SELECT * FROM {t} ORDER BY 1") for t in TABLES}
    return rows, sorted(cp.redis.keys("*"))


def test_every_refused_register_is_the_same_401_and_writes_nothing(cp):
    cp.add_instance("i1")
    cp.add_instance("i2")
    cp.add_instance("expired")
    cp.add_instance("retired")
    cp.enrol("used")
    cp.query("UPDATE join_secrets SET expires_at = now() - interval '1 second' WHERE instance_id = 'expired'")
    assert cp.admin("POST", "/v1/admin/instances/retired/retire").status_code == 200
    before = snapshot(cp)

    attempts = {
        "no credential": cp.register("i1"),
        "wrong secret": cp.register("i1", token="gfj_" + "x" * 43),
        "another instance's secret": cp.register("i1", token=cp.join_secrets["i2"]),
        "expired secret": cp.register("expired", token=cp.join_secrets["expired"]),
        "used secret": cp.register("used", token=cp.join_secrets["used"]),
        "retired instance": cp.register("retired", token=cp.join_secrets["retired"]),
        "unknown instance": cp.register("ghost"),
        "unknown instance, a secret": cp.register("ghost", token=cp.join_secrets["i1"]),
        "unknown instance, a token": cp.register("ghost", token="gfw_" + "y" * 43),
        "a malformed header": requests.post(cp.url + "/internal/worker/register", json=registration("i1"),
                                            headers={"Authorization": "Basic aTE6aTE="}, timeout=10),
    }
    answers = {name: (resp.status_code, resp.json()) for name, resp in attempts.items()}
    assert {status for status, _ in answers.values()} == {401}, answers
    assert len({repr(body) for _, body in answers.values()}) == 1, answers  # no enumeration
    assert "join secret" in answers["no credential"][1]["error"]["message"]
    assert snapshot(cp) == before
    # the refused attempts did not use up the valid secrets they presented
    assert cp.register("i1", token=cp.join_secrets["i1"]).status_code == 200
    assert cp.register("i2", token=cp.join_secrets["i2"]).status_code == 200


def test_a_new_join_secret_replaces_the_unused_one_and_expires(cp):
    cp.add_instance("i1")
    first = cp.join_secrets["i1"]
    resp = cp.admin("POST", "/v1/admin/instances/i1/join-secret")
    assert resp.status_code == 200
    second = resp.json()["join_secret"]
    assert second.startswith("gfj_") and second != first and resp.json()["expires_at"]
    assert cp.register("i1", token=first).status_code == 401
    assert cp.register("i1", token=second).status_code == 200
    assert cp.admin("POST", "/v1/admin/instances/ghost/join-secret").status_code == 404
    listed = cp.admin("GET", "/v1/admin/instances").json()["instances"]
    assert listed[0]["has_token"] is True and listed[0]["join_secret_expires_at"] is None  # used
    assert second not in repr(cp.query("SELECT * FROM join_secrets"))


def test_a_new_join_secret_re_enrols_a_worker_that_lost_its_token(cp):
    old = cp.enrol("i1")
    secret = cp.admin("POST", "/v1/admin/instances/i1/join-secret").json()["join_secret"]
    resp = cp.register("i1", token=secret)
    assert resp.status_code == 200
    new = resp.json()["bootstrap_token"]
    assert new != old
    assert cp.heartbeat("i1", old).status_code == 401
    assert cp.heartbeat("i1", new).status_code == 200


def test_a_stolen_worker_token_cannot_register_another_worker_id_or_model(cp):
    resp = cp.add_instance("a", worker_ids=["a", "a-1"])
    assert resp.json()["instance"]["worker_ids"] == ["a", "a-1"]
    token_b = cp.enrol("b")
    token_a = cp.register("a", token=cp.join_secrets["a"]).json()["bootstrap_token"]
    before = snapshot(cp)
    refused = {
        "undeclared worker id": cp.register("a", worker_id="a-2", token=token_a),
        "another instance's worker id": cp.register("a", worker_id="b", token=token_a),
        "another model": cp.register("a", token=token_a, model_id="m2"),
        "another instance": cp.register("b", token=token_a),
        "undeclared worker id, heartbeat": cp.heartbeat("a", token_a, worker_id="a-2"),
        "another instance's worker, heartbeat": cp.heartbeat("a", token_a, worker_id="b"),
    }
    assert {name: r.status_code for name, r in refused.items()} == dict.fromkeys(refused, 403), \
        {name: r.text for name, r in refused.items()}
    assert "--worker-id a-2" in refused["undeclared worker id"].json()["error"]["message"]
    assert snapshot(cp)[0] == before[0]
    # what the token may do: its own declared workers, its own model
    assert cp.register("a", worker_id="a-1", token=token_a).status_code == 200
    assert cp.heartbeat("b", token_b).status_code == 200
    # a declared worker id belongs to one instance only
    taken = cp.admin("POST", "/v1/admin/instances", json={"instance_id": "c", "model_id": "m1", "worker_ids": ["a-1"]})
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "worker_id_taken"
    assert cp.query("SELECT count(*) FROM instances WHERE instance_id = 'c'") == [(0,)]


def test_adding_an_instance_needs_a_model_and_is_idempotent(cp):
    missing = cp.admin("POST", "/v1/admin/instances", json={"instance_id": "i1"})
    assert missing.status_code == 400 and missing.json()["error"]["field"] == "model_id"
    first = cp.add_instance("i1")
    assert first.status_code == 201 and first.json()["join_secret_expires_at"]
    again = cp.admin("POST", "/v1/admin/instances", json={"instance_id": "i1", "model_id": "m1"})
    assert again.status_code == 200 and "join_secret" not in again.json() and again.json()["created"] is False
    assert cp.register("i1", token=cp.join_secrets["i1"]).status_code == 200  # still the first secret
