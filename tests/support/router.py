"""``gpufleet-router`` as a real process for tests that stand up a fleet."""

from __future__ import annotations

import requests

from .procs import console_script, wait_until


def start_router(daemons, redis_url: str, vllm_key: str, *, workers: int, processes: int = 2,
                 name: str = "router", **env) -> str:
    """Start a router on a free port and wait until every process of it sees ``workers``
    ready workers; returns its URL."""
    port = daemons.port()
    daemon = daemons.start(name, [console_script("gpufleet-router")], {
        "GPUFLEET_REDIS_URL": redis_url, "GPUFLEET_BIND": f"127.0.0.1:{port}",
        "GPUFLEET_VLLM_API_KEY": vllm_key, "GPUFLEET_ROUTER_PROCESSES": str(processes),
        **{k: str(v) for k, v in env.items()}})
    url = f"http://127.0.0.1:{port}"
    daemons.wait_http(url + "/healthz", timeout=30, proc=daemon)
    wait_until(lambda: all(requests.get(url + "/readyz", timeout=5).json()["workers"] == workers
                           for _ in range(3 * processes)), timeout=20, what="the router to see the workers")
    return url
