"""The reconciler as real processes against real PostgreSQL and Redis, with a real tiny
HTTP server standing in for the agent's /readyz (the full agent path is covered by the
agent's end-to-end tests): publication, removal on a failed probe or a stale heartbeat,
API key re-sync, and leader election between two reconcilers."""

import json
import os
import sys
import threading
import time

import psycopg2
import pytest
import requests

from gpufleet.controlplane.testing import ADMIN_TOKEN, cp_env, start_control_plane, start_reconciler
from support.hostile_worker import HostileWorker
from support.procs import wait_until

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Agent:
    """Plays the agent's control-plane side: registers, then heartbeats in a thread while
    ``beating`` is set. Its /readyz is a real stub process answering ``self.readyz``."""

    def __init__(self, cp_url, instance_id, agent_url, state_file, queue_depth=2):
        self.cp_url, self.instance_id, self.agent_url, self.state_file = cp_url, instance_id, agent_url, state_file
        self.status = "ready"
        self.queue_depth = queue_depth
        self.beating = threading.Event()
        self.answers = []
        self._stop = threading.Event()
        self.readyz(200)
        secret = requests.post(cp_url + "/v1/admin/instances", json={"instance_id": instance_id, "model_id": "m1"},
                               headers=ADMIN, timeout=10).json()["join_secret"]
        resp = requests.post(cp_url + "/internal/worker/register", timeout=10,
                             headers={"Authorization": f"Bearer {secret}"}, json={
            "instance_id": instance_id, "worker_id": instance_id, "model_id": "m1",
            "advertise_url": "http://127.0.0.1:8000", "agent_url": agent_url, "tensor_parallel_size": 1,
            "gpus": [], "agent_version": "test"})
        assert resp.status_code == 200, resp.text
        self.token = resp.json()["bootstrap_token"]
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def readyz(self, status: int):
        self.state_file.write_text(str(status))

    def beat(self):
        resp = requests.post(self.cp_url + "/internal/worker/heartbeat", timeout=10,
                             headers={"Authorization": f"Bearer {self.token}"},
                             json={"instance_id": self.instance_id, "worker_id": self.instance_id,
                                   "status": self.status, "model_id": "m1",
                                   "queue_depth": self.queue_depth})
        self.answers.append(resp.status_code)

    def _loop(self):
        while not self._stop.is_set():
            if self.beating.is_set():
                try:
                    self.beat()
                except requests.RequestException:
                    pass
            self._stop.wait(0.3)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def fleet(daemons, database_url, redis_url, redis_server, tmp_path):
    env = cp_env(database_url, redis_url)
    _, cp_url = start_control_plane(daemons, env)
    client = redis_server.client()
    agents = []

    class Fleet:
        url = cp_url
        redis = client

        def reconciler(self, name="reconciler", **overrides):
            return start_reconciler(daemons, {**env, **{k: str(v) for k, v in overrides.items()}}, name=name)

        def agent(self, instance_id, agent_url=None, **kw):
            """An agent whose /readyz is a stub answering ``Agent.readyz`` (or the server at
            ``agent_url``, which then answers for the agent)."""
            state = tmp_path / f"{instance_id}.readyz"
            state.write_text("200")
            if agent_url is None:
                port = daemons.port()
                stub = daemons.start(f"readyz-{instance_id}", [sys.executable, "-m", "gpufleet.controlplane.testing",
                                                               "readyz-stub", str(port), str(state)])
                daemons.wait_http(f"http://127.0.0.1:{port}/readyz", proc=stub)
                agent_url = f"http://127.0.0.1:{port}"
            agent = Agent(cp_url, instance_id, agent_url, state, **kw)
            agents.append(agent)
            return agent

        def ready(self, model="m1"):
            return client.smembers(f"gpufleet:workers:ready:{model}")

        def sql(self, statement, args=()):
            conn = psycopg2.connect(database_url)
            try:
                with conn, conn.cursor() as cur:
                    cur.execute(statement, args)
                    return cur.fetchall() if cur.description else None
            finally:
                conn.close()

    yield Fleet()
    for agent in agents:
        agent.close()
    client.close()


def test_publishes_a_ready_worker_and_removes_it_when_readyz_fails(fleet):
    fleet.reconciler()
    events = fleet.redis.pubsub(ignore_subscribe_messages=True)
    events.subscribe("gpufleet:events")
    agent = fleet.agent("w1")
    agent.beating.set()
    wait_until(lambda: fleet.ready() == {"w1"}, timeout=20, what="w1 in the ready set")
    worker = fleet.redis.hgetall("gpufleet:worker:w1")
    assert worker["url"] == "http://127.0.0.1:8000" and worker["status"] == "ready"
    assert worker["queue_depth"] == "2"
    assert 0 < fleet.redis.pttl("gpufleet:worker:w1") <= 3000
    assert fleet.redis.smembers("gpufleet:models") == {"m1"}
    # with the heartbeats paused, only the reconciler can restore what Redis lost
    agent.beating.clear()
    time.sleep(0.4)
    fleet.redis.delete("gpufleet:workers:ready:m1", "gpufleet:models", "gpufleet:worker:w1")
    wait_until(lambda: fleet.ready() == {"w1"} and fleet.redis.exists("gpufleet:worker:w1"), timeout=2.5,
               interval=0.05, what="the reconciler republishes w1")
    agent.beating.set()

    agent.readyz(503)
    started = time.monotonic()
    wait_until(lambda: fleet.ready() == set(), timeout=20, what="w1 out of the ready set")
    # heartbeats keep coming, so only the failed probe can have removed it: one 0.5 s
    # cycle, with slack for a loaded machine
    assert time.monotonic() - started < 5.0
    assert fleet.redis.smembers("gpufleet:models") == set()
    error = fleet.sql("SELECT last_probe_ok, consecutive_probe_failures > 0, last_probe_error FROM workers")[0]
    assert error[0] is False and error[1] is True and "503" in error[2]
    seen = []
    wait_until(lambda: seen.extend(m for m in iter(lambda: events.get_message(timeout=0.1), None)) or
               {"ready", "unready"} <= {json.loads(m["data"])["type"] for m in seen}, timeout=10, what="events")
    events.close()

    agent.readyz(200)
    wait_until(lambda: fleet.ready() == {"w1"}, timeout=20, what="w1 back after readyz recovers")


def test_removes_a_worker_whose_heartbeat_goes_stale(fleet):
    fleet.reconciler()
    agent = fleet.agent("w1")
    agent.beating.set()
    wait_until(lambda: fleet.ready() == {"w1"}, timeout=20, what="w1 ready")
    agent.beating.clear()
    stopped = time.monotonic()
    wait_until(lambda: fleet.ready() == set(), timeout=20, what="w1 removed when stale")
    # stale after 3 × 1 s of silence, then within about one 0.5 s cycle
    elapsed = time.monotonic() - stopped
    assert 2.0 < elapsed < 8.0, elapsed
    health = requests.get(fleet.url + "/v1/admin/workers", headers=ADMIN, timeout=10).json()["workers"][0]
    assert health["health"] == "stale" and health["routable"] is False


def test_drained_and_deleted_workers_leave_at_once_and_stay_out(fleet):
    fleet.reconciler()
    a, b = fleet.agent("w1"), fleet.agent("w2")
    a.beating.set()
    b.beating.set()
    wait_until(lambda: fleet.ready() == {"w1", "w2"}, timeout=20, what="both ready")
    resp = requests.post(fleet.url + "/v1/admin/workers/w1/drain", headers=ADMIN, timeout=10)
    assert resp.status_code == 200
    assert fleet.ready() == {"w2"}  # removed by the API call itself, not a later cycle
    time.sleep(1.5)  # several reconcile cycles and heartbeats later it is still out
    assert fleet.ready() == {"w2"}
    assert fleet.redis.hget("gpufleet:worker:w1", "status") in ("draining", None)
    requests.post(fleet.url + "/v1/admin/workers/w1/undrain", headers=ADMIN, timeout=10)
    wait_until(lambda: fleet.ready() == {"w1", "w2"}, timeout=20, what="w1 back after undrain")
    # a worker the database forgets is removed from Redis by the next cycle
    b.beating.clear()
    fleet.sql("DELETE FROM workers WHERE worker_id = 'w2'")
    wait_until(lambda: fleet.ready() == {"w1"}, timeout=20, what="deleted w2 gone")
    wait_until(lambda: not fleet.redis.exists("gpufleet:worker:w2"), timeout=20, what="w2 hash gone")


def test_api_keys_are_resynced_each_cycle(fleet):
    resp = requests.post(fleet.url + "/v1/admin/keys", json={"name": "a"}, headers=ADMIN, timeout=10)
    key_id = resp.json()["key_id"]
    digest = fleet.sql("SELECT key_hash FROM api_keys")[0][0]
    fleet.redis.delete(f"gpufleet:apikey:{digest}")  # lost (e.g. Redis restarted empty)
    fleet.redis.hset("gpufleet:apikey:" + "0" * 64, mapping={"key_id": "intruder", "name": "x"})
    fleet.reconciler()
    wait_until(lambda: fleet.redis.hget(f"gpufleet:apikey:{digest}", "key_id") == key_id, timeout=20,
               what="key restored")
    wait_until(lambda: not fleet.redis.exists("gpufleet:apikey:" + "0" * 64), timeout=20, what="unknown key deleted")
    fleet.sql("UPDATE api_keys SET revoked_at = now()")  # revoked behind the API's back
    wait_until(lambda: not fleet.redis.exists(f"gpufleet:apikey:{digest}"), timeout=20, what="revoked key gone")


def _leader(fleet):
    rows = fleet.sql("""SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                        WHERE l.locktype = 'advisory' AND l.granted AND l.objid = %s""", (0x67660002,))
    return rows


def test_two_reconcilers_one_leads_and_the_other_takes_over(fleet):
    first = fleet.reconciler("reconciler-1")
    wait_until(lambda: "now leads" in first.output(), timeout=20, what="first reconciler leads")
    second = fleet.reconciler("reconciler-2")
    wait_until(lambda: "waits to take over" in second.output(), timeout=20, what="second follows")
    agent = fleet.agent("w1")
    agent.beating.set()
    wait_until(lambda: fleet.ready() == {"w1"}, timeout=20, what="w1 ready")
    assert len(_leader(fleet)) == 1
    assert "now leads" not in second.output()
    state = fleet.sql("SELECT leader FROM reconciler_state")[0][0]
    assert state.endswith(f":{first.pid}")

    first.kill9()
    wait_until(lambda: "now leads" in second.output(), timeout=20, what="second takes over")
    wait_until(lambda: fleet.sql("SELECT leader FROM reconciler_state")[0][0].endswith(f":{second.pid}"),
               timeout=20, what="second records its cycles")
    # the new leader does the work: a failing probe takes w1 out
    agent.readyz(503)
    wait_until(lambda: fleet.ready() == set(), timeout=20, what="w1 removed by the new leader")
    assert len(_leader(fleet)) == 1


def test_scaling_loop_decides_stores_actuates_and_drains_the_least_loaded(fleet, tmp_path):
    calls = tmp_path / "calls.jsonl"
    script = _shell_script(tmp_path / "actuate.sh", f"{{ cat; echo; }} >> {calls}")
    busy, idle = fleet.agent("w1", queue_depth=1), fleet.agent("w2", queue_depth=0)
    busy.beating.set()
    idle.beating.set()
    # a plain reconciler probes them into the ready set (the API never probes a worker)
    plain = fleet.reconciler("reconciler-probe-only")
    wait_until(lambda: fleet.ready() == {"w1", "w2"}, timeout=20, what="both ready")
    plain.stop()
    fleet.reconciler(GPUFLEET_SCALING_ENABLED="true", GPUFLEET_SCALING_INTERVAL_S="0.5",
                     GPUFLEET_SCALING_ACTUATOR="command", GPUFLEET_SCALING_COMMAND=str(script),
                     GPUFLEET_SCALING_MIN_REPLICAS="1", GPUFLEET_SCALING_MAX_REPLICAS="3",
                     GPUFLEET_SCALING_DOWN_STABLE_S="0", GPUFLEET_SCALING_DOWN_COOLDOWN_S="0",
                     GPUFLEET_SCALING_UP_COOLDOWN_S="0", GPUFLEET_SCALING_DRAIN_TIMEOUT_S="1")
    # quiet: the least-loaded worker (w2) is drained and the command is told
    wait_until(lambda: calls.exists() and calls.read_text().strip(), timeout=20, what="the actuation command")
    decision = json.loads(calls.read_text().splitlines()[0])
    assert decision["action"] == "scale_down" and decision["drain_worker_id"] == "w2"
    assert (decision["current_replicas"], decision["desired_replicas"]) == (2, 1)
    wait_until(lambda: fleet.ready() == {"w1"}, timeout=20, what="w2 drained")
    assert fleet.sql("SELECT desired_status FROM workers WHERE worker_id = 'w2'") == [("draining",)]

    # pressure: a deep queue on w1 asks for more replicas
    busy.queue_depth = 10
    wait_until(lambda: fleet.sql("SELECT count(*) FROM scaling_decisions WHERE action = 'scale_up'")[0][0] > 0,
               timeout=20, what="a scale-up decision")
    scaling = requests.get(fleet.url + "/v1/admin/scaling", headers=ADMIN, timeout=10).json()
    latest = scaling["latest"]["m1"]
    assert latest["action"] == "scale_up" and latest["desired_replicas"] == 3 and "queue" in latest["reason"]
    wait_until(lambda: fleet.sql("SELECT bool_and(actuation_ok) FROM scaling_decisions WHERE action <> 'none'")
               == [(True,)], timeout=20, what="actuations recorded")
    metrics = requests.get(fleet.url + "/metrics", timeout=10).text
    assert 'gpufleet_scaling_desired_replicas{model_id="m1"} 3.0' in metrics


SCALE_DOWN_AT_ONCE = dict(GPUFLEET_SCALING_ENABLED="true", GPUFLEET_SCALING_INTERVAL_S="0.5",
                          GPUFLEET_SCALING_MIN_REPLICAS="1", GPUFLEET_SCALING_MAX_REPLICAS="3",
                          GPUFLEET_SCALING_DOWN_STABLE_S="0", GPUFLEET_SCALING_DOWN_COOLDOWN_S="0",
                          GPUFLEET_SCALING_FAILURE_BACKOFF_S="300")


def _shell_script(path, body: str):
    """An executable ``#!/bin/sh`` script at ``path`` (an actuation command)."""
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def _scale_down_by_command(script, drain_timeout_s: int) -> dict:
    """SCALE_DOWN_AT_ONCE, actuated by running ``script``."""
    return dict(**SCALE_DOWN_AT_ONCE, GPUFLEET_SCALING_ACTUATOR="command", GPUFLEET_SCALING_COMMAND=str(script),
                GPUFLEET_SCALING_DRAIN_TIMEOUT_S=str(drain_timeout_s))


def _two_quiet_workers(fleet, w1_agent_url=None):
    fleet.agent("w1", agent_url=w1_agent_url, queue_depth=0).beating.set()
    fleet.agent("w2", queue_depth=0).beating.set()
    settler = fleet.reconciler("reconciler-settle")  # makes them routable, then leaves
    wait_until(lambda: fleet.ready() == {"w1", "w2"}, timeout=20, what="both ready")
    assert settler.stop() == 0


def _decision(fleet):
    rows = fleet.sql("""SELECT decision_id, step, outcome, actuation_error, owner, drain_worker_id
                        FROM scaling_decisions WHERE action = 'scale_down' ORDER BY decision_id""")
    return rows


def test_the_log_actuator_is_advisory_everywhere(fleet):
    for worker in ("w1", "w2"):
        fleet.agent(worker, queue_depth=0).beating.set()
    fleet.reconciler(**SCALE_DOWN_AT_ONCE)
    wait_until(lambda: _decision(fleet), timeout=20, what="a scale-down decision")
    [(_, step, outcome, _, _, drain)] = _decision(fleet)[:1]
    assert (step, outcome, drain) == ("advisory", "advisory", "w1")
    time.sleep(1.5)
    assert fleet.sql("SELECT count(*) FROM workers WHERE desired_status IS NOT NULL") == [(0,)]
    assert fleet.ready() == {"w1", "w2"}
    scaling = requests.get(fleet.url + "/v1/admin/scaling", headers=ADMIN, timeout=10).json()
    assert scaling["advisory"] is True and scaling["latest"]["m1"]["action"] in ("scale_down", "none")
    assert all(d["advisory"] for d in scaling["decisions"] if d["action"] != "none")
    metrics = requests.get(fleet.url + "/metrics", timeout=10).text
    assert 'outcome="advisory"' in metrics and 'outcome="failed"' not in metrics


def test_a_reconciler_stopped_mid_actuation_kills_its_command_and_records_why(fleet, tmp_path):
    pid_file = tmp_path / "pid"
    script = _shell_script(tmp_path / "hang.sh", f"echo $$ > {pid_file}\nexec sleep 300")
    _two_quiet_workers(fleet)
    reconciler = fleet.reconciler(**_scale_down_by_command(script, drain_timeout_s=0))
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=30, what="the command")
    pid = int(pid_file.read_text())
    assert reconciler.stop() == 0  # SIGTERM
    [(_, step, outcome, error, _, drain)] = _decision(fleet)
    assert (step, outcome) == ("failed", "failed") and "reconciler stopped" in error
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # undrained (a "ready" the next heartbeat of a ready worker clears)
    assert fleet.sql("SELECT desired_status FROM workers WHERE worker_id = %s", (drain,))[0][0] in ("ready", None)
    assert fleet.sql("SELECT undrained FROM scaling_decisions WHERE action = 'scale_down'") == [(True,)]


def test_a_new_leader_resumes_a_drain_wait_and_actuates_it_once(fleet, tmp_path):
    calls = tmp_path / "calls"
    script = _shell_script(tmp_path / "scale.sh", f'echo "$GPUFLEET_SCALE_DECISION_ID" >> {calls}')
    _two_quiet_workers(fleet)
    # the stub agents have no /info, so the wait lasts until the drain deadline
    settings = _scale_down_by_command(script, drain_timeout_s=6)
    first = fleet.reconciler("reconciler-1", **settings)
    wait_until(lambda: _decision(fleet), timeout=20, what="the scale-down")
    first.kill9()
    [(decision_id, step, _, _, owner, drain)] = _decision(fleet)
    assert step == "draining" and owner.endswith(f":{first.pid}") and not calls.exists()
    second = fleet.reconciler("reconciler-2", **settings)
    wait_until(lambda: _decision(fleet)[0][1] == "done", timeout=30, what="the resumed scale-down")
    [(_, _, outcome, _, owner, _)] = _decision(fleet)
    assert outcome == "ok" and owner.endswith(f":{second.pid}")
    assert calls.read_text().split() == [str(decision_id)]
    assert fleet.sql("SELECT desired_status FROM workers WHERE worker_id = %s", (drain,)) == [("draining",)]


def test_a_drained_agent_dripping_its_info_cannot_hold_the_scale_down_past_its_deadline(fleet, daemons, tmp_path):
    # w1's agent answers /readyz at once but /info a byte every 0.5 s (a minute for the whole
    # answer), each byte well within the per-read timeout: only an overall deadline per call,
    # bounded by the drain's own deadline, keeps the wait to drain_timeout_s
    dripping = HostileWorker(daemons, "w1-agent", "--mode", "drip")
    calls = tmp_path / "calls"
    script = _shell_script(tmp_path / "scale.sh", f"date +%s.%N >> {calls}")
    _two_quiet_workers(fleet, w1_agent_url=dripping.url)
    drain_s, probe_s = 2, 1
    fleet.reconciler(**_scale_down_by_command(script, drain_timeout_s=drain_s), GPUFLEET_PROBE_TIMEOUT_S=probe_s)
    wait_until(lambda: _decision(fleet), timeout=20, what="the scale-down")
    [(decision_id, _, _, _, _, drain)] = _decision(fleet)
    assert drain == "w1"
    wait_until(lambda: calls.exists() and calls.read_text().strip(), timeout=drain_s + probe_s + 15,
               what="the actuation after the drain deadline")
    [(decided_at,)] = fleet.sql("SELECT extract(epoch FROM decided_at)::float8 FROM scaling_decisions "
                                "WHERE decision_id = %s", (decision_id,))
    late_s = float(calls.read_text().split()[0]) - decided_at
    # the drain deadline, at most one /info call's share past it, and a loaded machine's slack
    assert drain_s <= late_s < drain_s + probe_s + 3, late_s
    wait_until(lambda: _decision(fleet)[0][1] == "done", timeout=10, what="the scale-down recorded")
    assert _decision(fleet)[0][2] == "ok"
