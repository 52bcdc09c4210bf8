"""Scaling actuators against a real HTTP server (webhook) and real processes (command)."""

import http.server
import json
import sys
import threading

import pytest

from gpufleet.controlplane.scaler import actuate
from gpufleet.controlplane.scaling import Decision, ScalingSettings

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
    assert actuate(settings, DECISION, 7) == (True, None)
    path, content_type, body = received[0]
    assert path == "/scale" and content_type == "application/json"
    assert body == {"decision_id": 7, "model_id": "m1", "current_replicas": 2, "desired_replicas": 1,
                    "action": "scale_down", "reason": "quiet", "drain_worker_id": "w2",
                    "inputs": {"queue_depth": 0}}
    answer["status"] = 500
    assert actuate(settings, DECISION, 8) == (False, "webhook answered HTTP 500")


def test_command_gets_the_decision_but_not_the_daemon_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUFLEET_DATABASE_URL", "postgresql://u:secret@db/x")
    out = tmp_path / "seen.json"
    script = tmp_path / "scale.py"
    script.write_text(
        "import json, os, sys\n"
        f"json.dump({{'stdin': json.load(sys.stdin), 'env': dict(os.environ)}}, open({str(out)!r}, 'w'))\n")
    settings = ScalingSettings(actuator="command", command=f"{sys.executable} {script}")
    assert actuate(settings, DECISION, 9) == (True, None)
    seen = json.loads(out.read_text())
    assert seen["stdin"]["drain_worker_id"] == "w2" and seen["stdin"]["decision_id"] == 9
    env = seen["env"]
    assert env["GPUFLEET_SCALE_MODEL"] == "m1" and env["GPUFLEET_SCALE_ACTION"] == "scale_down"
    assert (env["GPUFLEET_SCALE_CURRENT"], env["GPUFLEET_SCALE_DESIRED"]) == ("2", "1")
    assert env["GPUFLEET_SCALE_DRAIN_WORKER"] == "w2" and "GPUFLEET_DATABASE_URL" not in env

    failing = ScalingSettings(actuator="command",
                              command=f"{sys.executable} -c \"import sys; sys.exit('no capacity')\"")
    ok, error = actuate(failing, DECISION, 10)
    assert not ok and "exited 1" in error and "no capacity" in error
