"""The scaling loop end to end: real PostgreSQL, Redis, control plane, reconciler(s),
simulators and agents; the operator's view through the ``gpufleet`` CLI and /metrics.

Two idle workers of one model with min_replicas=1 and no stable period or cool-down:
the loop decides at once to scale down by one. What is checked is what happens around
that decision — the drain, the wait for in-flight requests, the actuation, its failure,
its timeout and a leader dying in the middle of it.
"""

import json
import os
import sys
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.agent.testing import agent_env, start_agent, start_sim
from gpufleet.common.rediskeys import RedisKeys
from gpufleet.controlplane.testing import cp_env, run_cli, start_reconciler
from support.procs import wait_until

MODEL = "tiny-llm"
WORKERS = ("gpu-a", "gpu-b")

SCALING = {
    "GPUFLEET_SCALING_ENABLED": "true", "GPUFLEET_SCALING_INTERVAL_S": "0.5",
    "GPUFLEET_SCALING_MIN_REPLICAS": "1", "GPUFLEET_SCALING_MAX_REPLICAS": "3",
    "GPUFLEET_SCALING_DOWN_STABLE_S": "0", "GPUFLEET_SCALING_DOWN_COOLDOWN_S": "0",
    "GPUFLEET_SCALING_UP_COOLDOWN_S": "0",
    # long enough that no second attempt comes within a test: a second drain would be a bug
    "GPUFLEET_SCALING_FAILURE_BACKOFF_S": "300",
    "GPUFLEET_SCALING_DRAIN_TIMEOUT_S": "60", "GPUFLEET_SCALING_ACTUATION_TIMEOUT_S": "60",
}


class Fleet:
    def __init__(self, daemons, env, cp_url, redis, cp):
        self.daemons, self.env, self.url, self.redis, self.cp = daemons, env, cp_url, redis, cp
        self.agents: dict[str, str] = {}
        self.sims: dict[str, str] = {}

    def start_workers(self, tmp_path, *sim_args: str) -> None:
        """Both workers enrolled and routable, through a reconciler without scaling that is
        stopped again, so the scaling loop under test starts on a settled fleet."""
        settler = start_reconciler(self.daemons, self.env, name="reconciler-settle")
        for worker in WORKERS:
            secret_file = tmp_path / f"{worker}.join-secret"
            run_cli(self.url, "instances", "add", worker, "--model", MODEL, "--join-secret-file", str(secret_file))
            _, self.sims[worker] = start_sim(self.daemons, MODEL, *sim_args, name=f"sim-{worker}")
            _, self.agents[worker] = start_agent(self.daemons, agent_env(
                instance_id=worker, control_plane_url=self.url, model_id=MODEL, vllm_base_url=self.sims[worker],
                port=self.daemons.port(), WORKER_JOIN_SECRET_FILE=str(secret_file)), name=f"agent-{worker}")
        wait_until(lambda: self.ready() == set(WORKERS), timeout=60, what="both workers routable")
        assert settler.stop() == 0

    def reconciler(self, name="reconciler", **overrides):
        return start_reconciler(self.daemons, {**self.env, **SCALING, **overrides}, name=name)

    def ready(self) -> set[str]:
        return self.redis.smembers(RedisKeys().ready_set(MODEL))

    def sql(self, statement, args=()):
        return self.cp.query(statement, args)

    def scale_downs(self) -> list[dict]:
        rows = self.sql("""SELECT row_to_json(d) FROM scaling_decisions d WHERE action = 'scale_down'
                           ORDER BY decision_id""")
        return [r[0] for r in rows]

    def drained(self) -> list[str]:
        return [r[0] for r in self.sql("SELECT worker_id FROM workers WHERE desired_status = 'draining'")]

    def metric(self, name: str, **labels) -> float | None:
        text = requests.get(self.url + "/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return None


@pytest.fixture
def fleet(daemons, database_url, redis_url, redis_server, cp):
    env = cp_env(database_url, redis_url)
    client = redis_server.client()
    yield Fleet(daemons, env, cp.url, client, cp)
    client.close()


def recorder(tmp_path, *, fail=False, sleep_s=0.0):
    """A command that appends one JSON line per call (start time, pid, the decision it
    got) to calls.jsonl, prints a line, sleeps, then succeeds or fails."""
    calls = tmp_path / "calls.jsonl"
    script = tmp_path / "scale.py"
    script.write_text("\n".join([
        f"#!{sys.executable}",
        "import json, os, sys, time",
        "decision = json.load(sys.stdin)",
        f"with open({str(calls)!r}, 'a') as f:",
        "    f.write(json.dumps({'started': time.time(), 'pid': os.getpid(), 'decision': decision}) + '\\n')",
        "print('scaling', decision['model_id'], 'to', decision['desired_replicas'], flush=True)",
        f"time.sleep({sleep_s})",
        "sys.exit('no capacity left in the zone')" if fail else "",
    ]) + "\n")
    script.chmod(0o755)

    def read():
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return str(script), read


def finished(fleet, decision_id):
    rows = fleet.sql("SELECT step FROM scaling_decisions WHERE decision_id = %s", (decision_id,))
    return rows and rows[0][0] in ("done", "failed")


@pytest.mark.parametrize("actuator", ["command", "webhook"])
def test_a_failed_actuation_returns_the_worker_and_drains_no_second_one(fleet, tmp_path, actuator):
    fleet.start_workers(tmp_path)
    if actuator == "command":
        command, calls = recorder(tmp_path, fail=True)
        fleet.reconciler(GPUFLEET_SCALING_ACTUATOR="command", GPUFLEET_SCALING_COMMAND=command)
        expected_error = "command exited 1: no capacity left in the zone"
    else:
        down = f"http://127.0.0.1:{fleet.daemons.port()}/scale"  # nothing listens there
        fleet.reconciler(GPUFLEET_SCALING_ACTUATOR="webhook", GPUFLEET_SCALING_WEBHOOK_URL=down)
        expected_error = "webhook: cannot connect"

    wait_until(lambda: fleet.scale_downs() and finished(fleet, fleet.scale_downs()[0]["decision_id"]),
               timeout=60, what="the scale-down to fail")
    first = fleet.scale_downs()[0]
    assert first["step"] == "failed" and first["outcome"] == "failed" and first["undrained"] is True
    assert first["actuation_error"].startswith(expected_error), first["actuation_error"]
    # the drained worker comes back: nothing is left drained, both are routable again
    wait_until(lambda: fleet.ready() == set(WORKERS) and not fleet.drained(), timeout=20,
               what="the drained worker to return to service")
    # several scaling intervals later: still that one attempt, no second worker drained
    time.sleep(3)
    assert [d["decision_id"] for d in fleet.scale_downs()] == [first["decision_id"]]
    assert fleet.ready() == set(WORKERS) and not fleet.drained()
    if actuator == "command":
        assert len(calls()) == 1 and first["actuation_stdout"].startswith(f"scaling {MODEL} to 1")

    # the operator sees it: the CLI's table and the metrics
    out = run_cli(fleet.url, "scaling", "--model", MODEL)
    line = next(row for row in out.splitlines() if f" {first['drain_worker_id']} " in row)
    assert actuator in line and "failed, undrained" in line and expected_error[:40] in line, out
    assert fleet.metric("gpufleet_scaling_actuations_total", model_id=MODEL, action="scale_down",
                        actuator=actuator, outcome="failed") == 1.0
    assert fleet.metric("gpufleet_scaling_actuation_duration_seconds_count", model_id=MODEL) == 1.0
    assert fleet.metric("gpufleet_scaling_decisions_total", model_id=MODEL, action="scale_down",
                        actuator=actuator) == 1.0
    # the latest decision (a "none", held by the back-off) shows in the replica gauges
    assert fleet.metric("gpufleet_scaling_current_replicas", model_id=MODEL) == 2.0
    latest = fleet.cp.admin("GET", "/v1/admin/scaling", params={"model_id": MODEL}).json()
    assert latest["settings"]["failure_backoff_s"] == 300 and latest["settings_source"]["reconciler"]
    assert "backing off" in latest["latest"][MODEL]["reason"]


def test_a_scale_down_waits_for_in_flight_requests_before_the_command_runs(fleet, tmp_path):
    fleet.start_workers(tmp_path, "--itl-ms", "50", "--jitter", "0")
    command, calls = recorder(tmp_path)
    streams: dict[str, dict] = {}

    def stream(worker):
        resp = requests.post(fleet.sims[worker] + "/v1/completions", stream=True, timeout=60, json={
            "model": MODEL, "prompt": "x", "max_tokens": 120, "ignore_eos": True, "stream": True})
        chunks = [line for line in resp.iter_lines() if line.startswith(b"data: {")]
        streams[worker] = {"status": resp.status_code, "chunks": len(chunks), "ended": time.time()}

    # a long stream on each worker (whichever is chosen is busy), running before the decision
    threads = [threading.Thread(target=stream, args=(w,), daemon=True) for w in WORKERS]
    for t in threads:
        t.start()
    wait_until(lambda: all(requests.get(fleet.agents[w] + "/info", timeout=5).json()["inflight"] == 1
                           for w in WORKERS), timeout=10, what="both streams in flight")
    fleet.reconciler(GPUFLEET_SCALING_ACTUATOR="command", GPUFLEET_SCALING_COMMAND=command)

    wait_until(lambda: fleet.scale_downs(), timeout=30, what="the scale-down decision")
    wait_until(lambda: calls(), timeout=60, what="the command")
    for t in threads:
        t.join(timeout=30)
    decision = fleet.scale_downs()[0]
    drained = decision["drain_worker_id"]
    decided_at = fleet.sql("SELECT extract(epoch FROM decided_at) FROM scaling_decisions WHERE decision_id = %s",
                           (decision["decision_id"],))[0][0]
    # the decision came while the stream ran; the stream completed; the command came after it
    assert float(decided_at) < streams[drained]["ended"]
    assert streams[drained]["status"] == 200 and streams[drained]["chunks"] >= 120
    [call] = calls()
    assert call["decision"]["drain_worker_id"] == drained
    assert call["started"] > streams[drained]["ended"], (call["started"], streams[drained]["ended"])
    wait_until(lambda: finished(fleet, decision["decision_id"]), timeout=20, what="the outcome")
    done = fleet.scale_downs()[0]
    assert (done["step"], done["outcome"], done["drain_inflight"]) == ("done", "ok", 0)
    assert fleet.drained() == [drained] and fleet.ready() == set(WORKERS) - {drained}


def test_a_leader_killed_mid_actuation_a_new_leader_runs_it_never_twice_and_kills_it_at_its_deadline(
        fleet, tmp_path):
    fleet.start_workers(tmp_path)
    command, calls = recorder(tmp_path, sleep_s=120)  # hangs
    overrides = {"GPUFLEET_SCALING_ACTUATOR": "command", "GPUFLEET_SCALING_COMMAND": command,
                 "GPUFLEET_SCALING_ACTUATION_TIMEOUT_S": "8"}
    first = fleet.reconciler("reconciler-1", **overrides)
    wait_until(calls, timeout=60, what="the command to start")
    first.kill9()  # its whole process group; the command runs in a session of its own and lives on
    [call] = calls()
    os.kill(call["pid"], 0)
    decision_id = call["decision"]["decision_id"]
    assert fleet.sql("SELECT step, command_pgid FROM scaling_decisions WHERE decision_id = %s",
                     (decision_id,)) == [("actuating", call["pid"])]

    fleet.reconciler("reconciler-2", **overrides)
    wait_until(lambda: finished(fleet, decision_id), timeout=60, what="the new leader to settle the decision")
    settled = fleet.scale_downs()[0]
    assert settled["outcome"] == "timed_out" and "stopped during the actuation" in settled["actuation_error"]
    assert "process group was killed" in settled["actuation_error"]
    with pytest.raises(ProcessLookupError):
        os.kill(call["pid"], 0)  # the orphaned command was killed at its deadline
    # exactly one actuation for that decision, and no other scale-down since
    time.sleep(2)
    assert [c["decision"]["decision_id"] for c in calls()] == [decision_id]
    assert [d["decision_id"] for d in fleet.scale_downs()] == [decision_id]
    wait_until(lambda: fleet.ready() == set(WORKERS) and not fleet.drained(), timeout=20,
               what="the drained worker to return to service")


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("GPUFLEET_SCALING_TARGET_QUEUE", "nan", "GPUFLEET_SCALING_TARGET_QUEUE='nan' is not a finite number"),
    ("GPUFLEET_PROBE_TIMEOUT_S", "inf", "GPUFLEET_PROBE_TIMEOUT_S='inf' is not a finite number"),
    ("GPUFLEET_SCALING_COMMAND", "ansible-playbook 'scale.yml", "GPUFLEET_SCALING_COMMAND cannot be parsed"),
    ("GPUFLEET_SCALING_COMMAND", "no-such-scaler --up", "'no-such-scaler' is not found on PATH"),
    ("GPUFLEET_SCALING_MIN_REPLICAS", "0", "MIN_REPLICAS=0 is not supported"),
])
def test_bad_scaling_settings_are_refused_at_start_with_exit_2(daemons, variable, value, message):
    env = {**cp_env("postgresql://u@127.0.0.1:1/db", "redis://127.0.0.1:1/0"), **SCALING,
           "GPUFLEET_SCALING_ACTUATOR": "command", "GPUFLEET_SCALING_COMMAND": "true", variable: value}
    for program in ("gpufleet-reconciler", "gpufleet-controlplane"):
        proc = daemons.start(program, [daemons.script(program)], env)
        assert proc.popen.wait(timeout=30) == 2
        assert message in proc.output(), proc.output()


def test_the_scaling_ttft_signal_has_its_own_shorter_window(fleet, tmp_path):
    """The agent sends the p95 TTFT twice: over its display window (60 s here) and over
    SCALING_TTFT_WINDOW_S (3 s here); the scaling loop reads the second, which forgets a
    burst once it has left that window."""
    settler = start_reconciler(fleet.daemons, fleet.env, name="reconciler-probes")
    secret_file = tmp_path / "join-secret"
    run_cli(fleet.url, "instances", "add", "gpu-a", "--model", MODEL, "--join-secret-file", str(secret_file))
    _, sim_url = start_sim(fleet.daemons, MODEL, "--ttft-ms", "300", "--itl-ms", "5", "--jitter", "0",
                           "--prefill-ms-per-token", "0")
    start_agent(fleet.daemons, agent_env(instance_id="gpu-a", control_plane_url=fleet.url, model_id=MODEL,
                                         vllm_base_url=sim_url, port=fleet.daemons.port(),
                                         WORKER_JOIN_SECRET_FILE=str(secret_file), SCALING_TTFT_WINDOW_S="3"))
    wait_until(lambda: fleet.ready() == {"gpu-a"}, timeout=60, what="the worker routable")
    for _ in range(4):
        assert requests.post(sim_url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                             timeout=30).status_code == 200

    def figures():
        return fleet.sql("SELECT ttft_p95_ms, ttft_p95_scaling_ms FROM workers WHERE worker_id = 'gpu-a'")[0]
    display, scaling = wait_until(lambda: all(figures()) and figures(), timeout=15, what="both TTFT figures")
    assert display == pytest.approx(300, rel=0.3) and scaling == pytest.approx(300, rel=0.3)
    wait_until(lambda: figures()[1] == 0, timeout=15, what="the burst to leave the scaling window")
    assert figures()[0] == pytest.approx(300, rel=0.3)  # the display window still holds it
    assert settler.alive()
