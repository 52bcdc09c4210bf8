"""A stand-in fleet for the monitoring role's scenario: GET /v1/sd/prometheus answers like
the control plane (bearer token required) and lists targets that this same server serves
metrics for: two workers (agent + vLLM each)."""

import http.server
import json
import sys

TOKEN = open(sys.argv[1]).read().strip()
PORT = int(sys.argv[2])
ME = f"127.0.0.1:{PORT}"


def worker(worker_id, role):
    return {"targets": [ME], "labels": {"__metrics_path__": f"/{role}/{worker_id}/metrics", "role": role,
                                        "worker_id": worker_id, "instance_id": worker_id, "model": "stub-model"}}


GROUPS = [worker(w, r) for w in ("gpu-1", "gpu-2") for r in ("agent", "vllm")]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/v1/sd/prometheus":
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self.answer(401, "application/json", b'{"error": {"message": "bad token"}}')
            return self.answer(200, "application/json", json.dumps(GROUPS).encode())
        if self.path.endswith("/metrics"):
            body = ("gpufleet_agent_ready 1\n" if "/agent/" in self.path
                    else 'vllm:num_requests_waiting{model_name="stub-model",engine="0"} 0\n')
            return self.answer(200, "text/plain; version=0.0.4", body.encode())
        return self.answer(404, "text/plain", b"not found\n")

    def answer(self, status, ctype, body):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
