"""The product in front of real vLLM servers (tests/vllm): PostgreSQL, Redis, control plane,
reconciler, agents and routers as real processes; and a relay that records what vLLM sends."""

from __future__ import annotations

import contextlib
import json
import socket
import threading

import h11
import requests

from gpufleet.common.rediskeys import RedisKeys
from gpufleet.controlplane.testing import cp_env, run_cli, start_control_plane, start_reconciler

from .router import start_router
from .vllm import SERVED_NAME
from .vllm_fixtures import VLLM_KEY
from .workers import enrol_agent

MODEL = SERVED_NAME


class Fleet:
    def __init__(self, daemons, database_url, redis_url, redis_server):
        self.daemons = daemons
        env = cp_env(database_url, redis_url)
        _, self.cp_url = start_control_plane(daemons, env)
        start_reconciler(daemons, env)
        self.redis = redis_server.client()
        self.redis_url = redis_url
        self.agents: dict[str, str] = {}
        self._key: str | None = None

    def cli(self, *args: str) -> str:
        return run_cli(self.cp_url, *args)

    def worker(self, instance_id: str, vllm_url: str, advertise_url: str | None = None, **env) -> str:
        """An agent for the vLLM server at ``vllm_url``; returns the agent's URL."""
        _, agent_url = enrol_agent(self.daemons, self.cp_url, instance_id, MODEL, vllm_url,
                                   VLLM_API_KEY=VLLM_KEY, ADVERTISE_URL=advertise_url, **env)
        self.agents[instance_id] = agent_url
        return agent_url

    def ready(self) -> set[str]:
        return self.redis.smembers(RedisKeys().ready_set(MODEL))

    def router(self) -> str:
        return start_router(self.daemons, self.redis_url, VLLM_KEY, workers=len(self.ready()))

    def api_key(self) -> str:
        if self._key is None:
            self._key = json.loads(self.cli("--json", "keys", "create", "vllm-tests"))["key"]
        return self._key


def vllm_metric(url: str, name: str, **labels) -> float:
    """The sum of the samples of ``name`` on a vLLM server's /metrics matching ``labels``."""
    total = 0.0
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def _ask(conn: h11.Connection) -> None:
    """Put a request on h11's client side so that it parses the next response."""
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())


class RecordingRelay:
    """A TCP relay in front of a server that keeps every byte the server sent, so a test can
    compare what the server wrote with what reached the client through the router."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self.from_server: list[bytearray] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            record = bytearray()
            with self._lock:
                self.from_server.append(record)
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, record), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if record is not None:
                    record.extend(data)
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def responses(self) -> list[tuple[int, dict, bytes]]:
        """Every HTTP response the server sent so far, as (status, headers, body) — bodies
        with their transfer coding removed."""
        found = []
        with self._lock:
            records = [bytes(r) for r in self.from_server]
        for raw in records:
            conn = h11.Connection(h11.CLIENT)
            _ask(conn)
            conn.receive_data(raw)
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Response):
                    status, headers, body = event.status_code, {k.decode(): v.decode() for k, v in event.headers}, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    found.append((status, headers, body))
                    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                        conn.start_next_cycle()
                        _ask(conn)
                else:
                    break
        return found

    def close(self) -> None:
        self._server.close()
