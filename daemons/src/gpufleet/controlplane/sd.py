"""Prometheus HTTP service discovery: what to scrape, built from the fleet the control plane knows.

A pure function of the worker rows and the settings, so it is testable without a socket;
``api_sd.py`` serves it. Each group is one target in Prometheus's HTTP SD format
(``[{"targets": ["host:port"], "labels": {...}}]``) with the labels the rules and the
dashboard use: ``role`` (``agent``, ``vllm``, ``router``, ``controlplane``), and for a
worker's two endpoints ``worker_id``, ``instance_id`` and ``model``.

Workers come and go: a retired instance's workers leave at once; a worker that stopped
sending heartbeats stays listed for ``GPUFLEET_SD_FORGET_AFTER_S`` (default 10 minutes),
long enough for its ``up == 0`` to fire an alert, then leaves (a deleted VM is not
scraped forever).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse

from gpufleet.common.config import Env, check_url, secret_hash


def _urls(env: Env, name: str) -> tuple[str, ...]:
    raw = env.str(name, "") or ""
    urls = tuple(u.strip().rstrip("/") for u in raw.split(",") if u.strip())
    for url in urls:
        check_url(name, url, example="http://10.0.0.2:8002,http://10.0.0.3:8002")
    return urls


@dataclass(frozen=True)
class SdSettings:
    token_hash: str = field(default="", repr=False)  # empty: discovery is off
    router_urls: tuple[str, ...] = ()
    controlplane_urls: tuple[str, ...] = ()
    forget_after_s: float = 600.0

    @classmethod
    def from_env(cls, env: Env) -> SdSettings:
        token = env.str("GPUFLEET_SD_TOKEN")
        return cls(token_hash=secret_hash("GPUFLEET_SD_TOKEN", token) if token else "",
                   router_urls=_urls(env, "GPUFLEET_SD_ROUTER_URLS"),
                   controlplane_urls=_urls(env, "GPUFLEET_SD_CONTROLPLANE_URLS"),
                   forget_after_s=env.float("GPUFLEET_SD_FORGET_AFTER_S", 600.0, minimum=1, maximum=7 * 86400))


def target(url: str, labels: Mapping[str, str]) -> dict:
    """One SD group for the ``/metrics`` under ``url`` (``http://host:port[/prefix]``)."""
    parsed = urlparse(url)
    group_labels = {"__scheme__": parsed.scheme or "http",
                    "__metrics_path__": parsed.path.rstrip("/") + "/metrics"}
    group_labels.update(labels)
    return {"targets": [parsed.netloc], "labels": group_labels}


def discover(rows: Iterable[Mapping], settings: SdSettings) -> list[dict]:
    """The SD groups: every listed control plane and router, and for each live worker its
    agent and its vLLM, sorted so that the answer is stable between calls."""
    groups = [target(url, {"role": "controlplane"}) for url in settings.controlplane_urls]
    groups += [target(url, {"role": "router"}) for url in settings.router_urls]
    for row in sorted(rows, key=lambda r: r["worker_id"]):
        age = row["heartbeat_age_s"]
        if row["retired_at"] is not None or age is None or age > settings.forget_after_s:
            continue
        labels = {"worker_id": row["worker_id"], "instance_id": row["instance_id"], "model": row["model_id"]}
        groups.append(target(row["agent_url"], {"role": "agent", **labels}))
        groups.append(target(row["advertise_url"], {"role": "vllm", **labels}))
    return groups
