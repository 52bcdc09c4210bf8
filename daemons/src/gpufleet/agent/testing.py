"""Helpers for tests that run the agent and the simulator as real processes (the agent's
own integration tests and the end-to-end worker-lifecycle tests).

``daemons`` is the test harness's starter (``tests/conftest.py``): anything with
``start(name, argv, env)``, ``script(name)``, ``port()`` and ``wait_http(url, ...)``.
Also :class:`TcpRelay`, a real TCP relay a test can cut to partition a worker from the
control plane while everything else keeps running.
"""

from __future__ import annotations

import contextlib
import socket
import threading


def start_sim(daemons, model: str, *args: str, name: str = "sim", port: int | None = None,
              wait: bool = True, env: dict | None = None):
    """``gpufleet-vllm-sim MODEL --port P ARGS``; returns (daemon, base_url)."""
    port = port or daemons.port()
    daemon = daemons.start(name, [daemons.script("gpufleet-vllm-sim"), model, "--host", "127.0.0.1",
                                  "--port", str(port), *args], env or {})
    base_url = f"http://127.0.0.1:{port}"
    if wait:
        daemons.wait_http(base_url + "/health", timeout=30, proc=daemon)
    return daemon, base_url


def agent_env(*, instance_id: str, control_plane_url: str, model_id: str, vllm_base_url: str,
              port: int, **overrides) -> dict:
    env = {
        "INSTANCE_ID": instance_id,
        "CONTROL_PLANE_URL": control_plane_url,
        "MODEL_ID": model_id,
        "VLLM_BASE_URL": vllm_base_url,
        "GPUFLEET_BIND": f"127.0.0.1:{port}",
        "HEARTBEAT_INTERVAL_S": "1",
        "VLLM_POLL_INTERVAL_S": "0.25",
        "VLLM_TIMEOUT_S": "0.5",
        "CONTROL_PLANE_RETRY_MAX_S": "1",
        "METRICS_WINDOW_S": "60",
    }
    env.update({k: str(v) for k, v in overrides.items() if v is not None})
    for key in [k for k, v in overrides.items() if v is None]:
        env.pop(key, None)
    return env


def start_agent(daemons, env: dict, *, name: str = "agent", wait: bool = True):
    """``gpufleet-agent`` with ``env`` (see :func:`agent_env`); waits for /healthz and
    returns (daemon, base_url)."""
    daemon = daemons.start(name, [daemons.script("gpufleet-agent")], env)
    host, _, port = env["GPUFLEET_BIND"].rpartition(":")
    base_url = f"http://{host}:{port}"
    if wait:
        daemons.wait_http(base_url + "/healthz", timeout=30, proc=daemon)
    return daemon, base_url


class TcpRelay:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops every connection and refuses
    new ones (a network partition), ``restore()`` heals it."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        with contextlib.suppress(OSError):
            self._server.close()
