"""Helpers of the router's integration tests (no tests here): simulator workers published
through the control plane's Publisher (exactly what production writes to Redis), API keys,
and gpufleet-router as a real gunicorn process."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.common.ids import API_KEY_PREFIX, new_secret, sha256_hex
from gpufleet.common.rediskeys import RedisKeys
from gpufleet.controlplane.publisher import Publisher
from support.procs import wait_until

VLLM_KEY = "sim-fleet-secret"
MODEL = "test-model"


def parse_metrics(text: str) -> dict[tuple, float]:
    """``{(name, frozenset(labels.items())): value}`` of a Prometheus text page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def metric_sum(metrics: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in metrics.items() if n == name and want <= lab)


class Sim:
    def __init__(self, fleet, worker_id: str, daemon, port: int, model: str):
        self.fleet, self.id, self.daemon, self.port, self.model = fleet, worker_id, daemon, port, model
        self.url = f"http://127.0.0.1:{port}"

    def metrics(self) -> dict:
        return parse_metrics(requests.get(self.url + "/metrics", timeout=5).text)

    def load(self) -> float:
        m = self.metrics()
        return metric_sum(m, "vllm:num_requests_running") + metric_sum(m, "vllm:num_requests_waiting")

    def running(self) -> float:
        return metric_sum(self.metrics(), "vllm:num_requests_running")

    def finished(self) -> float:
        m = self.metrics()
        return (metric_sum(m, "vllm:request_success_total", finished_reason="stop")
                + metric_sum(m, "vllm:request_success_total", finished_reason="length"))

    def faults(self, mode: str, rate: float = 1.0) -> None:
        resp = requests.post(self.url + "/sim/faults", json={"mode": mode, "rate": rate}, timeout=5)
        assert resp.status_code == 200, resp.text

    def publish(self) -> None:
        self.fleet.publisher.publish_worker(self.id, self.model, self.url)

    def unpublish(self, reason: str = "unready") -> None:
        self.fleet.publisher.unpublish_worker(self.id, self.model, reason)


class Router:
    def __init__(self, daemon, port: int, key: str):
        self.daemon, self.port, self.key = daemon, port, key
        self.url = f"http://127.0.0.1:{port}"

    def headers(self, key: str | None = None) -> dict:
        return {"Authorization": f"Bearer {key or self.key}"}

    def chat(self, content: str = "hello", max_tokens: int = 4, model: str = MODEL, timeout: float = 60,
             key: str | None = None, **extra) -> requests.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                **extra}
        return requests.post(self.url + "/v1/chat/completions", json=body, headers=self.headers(key),
                             timeout=timeout)

    def metrics(self) -> dict:
        return parse_metrics(requests.get(self.url + "/metrics", timeout=10).text)

    def readyz(self) -> dict:
        return requests.get(self.url + "/readyz", timeout=5).json()


class RouterFleet:
    def __init__(self, daemons, redis_url: str, model: str = MODEL):
        self.daemons = daemons
        self.redis_url = redis_url
        self.model = model
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.keys = RedisKeys()
        # a long heartbeat interval: the worker hashes outlive the test without heartbeats
        self.publisher = Publisher(self.redis, self.keys, heartbeat_interval_s=3600)
        self.sims: list[Sim] = []
        self._key: str | None = None

    def sim(self, worker_id: str, *args: str, model: str | None = None, publish: bool = True,
            port: int | None = None, wait: bool = True) -> Sim:
        model = model or self.model
        port = port or self.daemons.port()
        argv = [self.daemons.script("gpufleet-vllm-sim"), model, "--port", str(port), "--api-key", VLLM_KEY,
                "--enable-fault-api", "--seed", str(len(self.sims)), *args]
        daemon = self.daemons.start(f"sim-{worker_id}", argv)
        sim = Sim(self, worker_id, daemon, port, model)
        if wait:
            self.daemons.wait_http(sim.url + "/health", timeout=30, proc=daemon)
        if publish:
            sim.publish()
        self.sims.append(sim)
        return sim

    def restart_sim(self, sim: Sim, *args: str) -> Sim:
        argv = [self.daemons.script("gpufleet-vllm-sim"), sim.model, "--port", str(sim.port), "--api-key",
                VLLM_KEY, "--enable-fault-api", *args]
        sim.daemon = self.daemons.start(f"sim-{sim.id}-again", argv)
        self.daemons.wait_http(sim.url + "/health", timeout=30, proc=sim.daemon)
        return sim

    def api_key(self, models: tuple[str, ...] = ()) -> str:
        key = new_secret(API_KEY_PREFIX)
        self.publisher.publish_api_key(sha256_hex(key), f"k{int(time.time() * 1e6)}", "test", models)
        return key

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = self.api_key()
        return self._key

    def router(self, processes: int = 2, name: str = "router", redis_url: str | None = None,
               wait_workers: int | None = None, **env) -> Router:
        port = self.daemons.port()
        full_env = {
            "GPUFLEET_REDIS_URL": redis_url or self.redis_url,
            "GPUFLEET_BIND": f"127.0.0.1:{port}",
            "GPUFLEET_VLLM_API_KEY": VLLM_KEY,
            "GPUFLEET_ROUTER_PROCESSES": str(processes),
            "GPUFLEET_ROUTER_ID": name,
            "GPUFLEET_LOG_LEVEL": "INFO",
        }
        full_env.update({k: str(v) for k, v in env.items()})
        daemon = self.daemons.start(name, [self.daemons.script("gpufleet-router")], full_env)
        router = Router(daemon, port, self.key)
        self.daemons.wait_http(router.url + "/healthz", timeout=30, proc=daemon)
        expected = len([s for s in self.sims]) if wait_workers is None else wait_workers
        if expected:
            # every process has its first view (each answers /readyz from its own)
            wait_until(lambda: all(router.readyz()["workers"] >= expected for _ in range(processes * 3)),
                       timeout=20, what="the router to see the workers")
        return router


def run_load(fn, count: int, concurrency: int) -> list:
    """``fn(i)`` for i in range(count) on ``concurrency`` threads; results (or exceptions)."""
    def safe(i):
        try:
            return fn(i)
        except Exception as exc:  # noqa: BLE001 - the test inspects failures
            return exc
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(safe, range(count)))


class Sampler:
    """Samples ``fn()`` every ``interval`` seconds on a thread until stopped."""

    def __init__(self, fn, interval: float = 0.1):
        self.fn, self.interval = fn, interval
        self.samples: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append(self.fn())
            except Exception:  # noqa: BLE001 - a sample may fail under load; skip it
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


def sse_events(resp) -> list:
    """The ``data:`` payloads of an SSE response (``[DONE]`` kept as the string)."""
    events = []
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            payload = line[6:]
            events.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return events
