"""`make demo MONITORING=1`: the demo's Prometheus discovers the demo fleet through the
control plane and scrapes every target; Ctrl-C stops it with the rest."""

from __future__ import annotations

import os
import re
import signal

import pytest
import requests

from support.demo import start_demo
from support.procs import wait_until


@pytest.mark.timeout(300)
def test_demo_with_monitoring_prints_a_prometheus_that_scrapes_the_whole_fleet():
    proc, lines = start_demo("--workers", "2", env={**os.environ, "MONITORING": "1"})
    try:
        output = "".join(lines)
        prometheus = re.search(r"Prometheus\s+(http://127\.0\.0\.1:\d+)", output).group(1)
        assert "model:gpufleet_router_requests:rate1m" in output

        def all_up():
            targets = requests.get(prometheus + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            roles = sorted(t["labels"]["role"] for t in targets)
            return roles == ["agent", "agent", "controlplane", "router", "vllm", "vllm"] and all(
                t["health"] == "up" for t in targets)
        wait_until(all_up, timeout=30, interval=0.5, what="prometheus to scrape every demo target")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    with pytest.raises(requests.ConnectionError):
        requests.get(prometheus + "/-/ready", timeout=2)
