"""One simulator process for a test, and one read of its /metrics."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families

from support.procs import wait_http


def start_sim(daemons, *args: str) -> str:
    """Start gpufleet-vllm-sim (model ``org/tiny-model``) with ``args``; return its base URL once /health answers."""
    port = daemons.port()
    proc = daemons.start("vllm-sim", [daemons.script("gpufleet-vllm-sim"), "org/tiny-model", "--port", str(port),
                                      *args])
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", proc=proc, timeout=30)
    return base


def metric(base: str, name: str, **labels) -> float:
    """The value of the first sample ``name`` with ``labels`` in the simulator's /metrics."""
    text = requests.get(base + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)
