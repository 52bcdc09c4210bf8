"""Probing a worker agent's ``GET /readyz`` over HTTP: 200 is ready, anything else
(another status, a timeout, a refused connection) is not, with a short reason."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import urllib3


def new_http(maxsize: int = 32) -> urllib3.PoolManager:
    return urllib3.PoolManager(num_pools=256, maxsize=maxsize, retries=False)


def _reason(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:120].decode("utf-8", "replace").strip()
    if isinstance(data, dict):
        for key in ("reason", "failing", "error", "message", "status"):
            if data.get(key):
                value = data[key]
                return value if isinstance(value, str) else json.dumps(value)[:200]
    return json.dumps(data)[:200]


def probe_readyz(http: urllib3.PoolManager, agent_url: str, timeout_s: float) -> tuple[bool, str | None]:
    url = agent_url.rstrip("/") + "/readyz"
    try:
        resp = http.request("GET", url, timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
                            preload_content=False, redirect=False)
        try:
            body = resp.read(4096)
        finally:
            resp.release_conn()
    except urllib3.exceptions.HTTPError as exc:
        return False, f"{type(exc).__name__}: {str(exc)[:200]}"
    if resp.status == 200:
        return True, None
    reason = _reason(body)
    return False, f"HTTP {resp.status}" + (f": {reason}" if reason else "")


def probe_many(http: urllib3.PoolManager, targets: dict[str, str], timeout_s: float,
               concurrency: int = 32) -> dict[str, tuple[bool, str | None]]:
    """Probe ``{worker_id: agent_url}`` concurrently (bounded); returns ``{worker_id: (ok, error)}``."""
    if not targets:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(targets)))) as pool:
        futures = {wid: pool.submit(probe_readyz, http, url, timeout_s) for wid, url in targets.items()}
        return {wid: future.result() for wid, future in futures.items()}
