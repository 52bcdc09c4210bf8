"""Scaling actuators against a real HTTP server (webhook) and real processes (command)."""

import http.server
import json
import os
import sys
import threading
import time

import pytest

from gpufleet.controlplane.actuators import OUTPUT_TAIL_BYTES, actuate, group_alive
from gpufleet.controlplane.scaling import Decision, ScalingSettings
from support.procs import wait_until

DECISION = Decision("m1", 2, 1, "scale_down", "quiet", "w2", {"queue_depth": 0})


@pytest.fixture
def webhook():
    received, answer = [], {"status": 204}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], json.loads(body)))
            self.send_response(answer["status"])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/scale", received, answer
    server.shutdown()
    server.server_close()


def test_webhook_posts_the_decision_and_reports_failures(webhook):
    url, received, answer = webhook
    settings = ScalingSettings(actuator="webhook", webhook_url=url)
    assert actuate(settings, DECISION, 7).outcome == "ok"
    path, content_type, body = received[0]
    assert path == "/scale" and content_type == "application/json"
    assert body == {"decision_id": 7, "model_id": "m1", "current_replicas": 2, "desired_replicas": 1,
                    "action": "scale_down", "reason": "quiet", "drain_worker_id": "w2",
                    "inputs": {"queue_depth": 0}}
    answer["status"] = 500
    failed = actuate(settings, DECISION, 8)
    assert (failed.outcome, failed.error) == ("failed", "webhook answered HTTP 500")


def test_command_gets_the_decision_but_not_the_daemon_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUFLEET_DATABASE_URL", "postgresql://u:secret@db/x")
    out = tmp_path / "seen.json"
    script = tmp_path / "scale.py"
    script.write_text(
        "import json, os, sys\n"
        f"json.dump({{'stdin': json.load(sys.stdin), 'env': dict(os.environ)}}, open({str(out)!r}, 'w'))\n")
    settings = ScalingSettings(actuator="command", command=f"{sys.executable} {script}")
    assert actuate(settings, DECISION, 9).outcome == "ok"
    seen = json.loads(out.read_text())
    assert seen["stdin"]["drain_worker_id"] == "w2" and seen["stdin"]["decision_id"] == 9
    env = seen["env"]
    assert env["GPUFLEET_SCALE_MODEL"] == "m1" and env["GPUFLEET_SCALE_ACTION"] == "scale_down"
    assert (env["GPUFLEET_SCALE_CURRENT"], env["GPUFLEET_SCALE_DESIRED"]) == ("2", "1")
    assert env["GPUFLEET_SCALE_DRAIN_WORKER"] == "w2" and "GPUFLEET_DATABASE_URL" not in env

    failing = ScalingSettings(actuator="command",
                              command=f"{sys.executable} -c \"import sys; sys.exit('no capacity')\"")
    outcome = actuate(failing, DECISION, 10)
    assert outcome.outcome == "failed" and "exited 1" in outcome.error and "no capacity" in outcome.error
    assert "no capacity" in outcome.stderr


def test_a_hanging_command_is_killed_at_its_timeout_with_its_process_group(tmp_path):
    """The command starts a grandchild that would outlive it, then hangs: at the timeout
    both are gone, the outcome says so, and the output before the hang is kept."""
    pids = tmp_path / "pids"
    script = tmp_path / "hang.sh"
    script.write_text(f"#!/bin/sh\nsleep 300 &\necho \"$$ $!\" > {pids}\necho working\n"
                      "yes 0123456789 | head -c 100000\nwait\n")
    script.chmod(0o755)
    settings = ScalingSettings(actuator="command", command=str(script), actuation_timeout_s=1.5)
    groups = []
    started = time.monotonic()
    outcome = actuate(settings, DECISION, 11, on_start=groups.append)
    elapsed = time.monotonic() - started
    assert outcome.outcome == "timed_out" and "process group was killed" in outcome.error
    assert 1.5 <= elapsed < 15, elapsed
    shell, grandchild = (int(p) for p in pids.read_text().split())
    assert groups == [shell]
    wait_until(lambda: not group_alive(shell), timeout=5, what="the process group to be gone")
    for pid in (shell, grandchild):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # the output is kept, bounded to its tail
    assert len(outcome.stdout) == OUTPUT_TAIL_BYTES and "working" not in outcome.stdout
    assert "0123456789\n0123456789" in outcome.stdout


def test_a_down_webhook_and_a_missing_program_fail_with_a_reason():
    down = ScalingSettings(actuator="webhook", webhook_url="http://127.0.0.1:9/scale", actuation_timeout_s=2)
    outcome = actuate(down, DECISION, 12)
    assert outcome.outcome == "failed" and "webhook" in outcome.error
    gone = ScalingSettings(actuator="command", command="/nonexistent/scale-it")
    outcome = actuate(gone, DECISION, 13)
    assert outcome.outcome == "failed" and "cannot start" in outcome.error
