"""GPUFLEET_METRICS_ALLOW_FROM: /metrics only for the scrapers, the rest untouched."""

import pytest
from flask import Flask

from gpufleet.common.config import ConfigError
from gpufleet.common.metrics_access import allowed, guard_metrics, parse_allow_from


def test_parse_and_match_addresses_and_networks():
    nets = parse_allow_from("127.0.0.1, 10.1.0.0/24,fd7a:115c::/48")
    assert allowed("127.0.0.1", nets) and allowed("10.1.0.9", nets) and allowed("fd7a:115c::5", nets)
    assert allowed("::ffff:10.1.0.3", nets)  # IPv4-mapped
    assert not allowed("10.1.1.9", nets) and not allowed("192.168.0.1", nets) and not allowed(None, nets)
    assert parse_allow_from("") == () and allowed("203.0.113.9", ())
    with pytest.raises(ConfigError, match="GPUFLEET_METRICS_ALLOW_FROM"):
        parse_allow_from("prometheus.example")


def test_guard_answers_403_to_metrics_only():
    app = Flask("t")
    app.add_url_rule("/metrics", "metrics", lambda: "m 1\n")
    app.add_url_rule("/healthz", "healthz", lambda: "ok")
    guard_metrics(app, parse_allow_from("10.0.0.5"))
    client = app.test_client()
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "10.0.0.5"}).status_code == 200
    denied = client.get("/metrics", environ_base={"REMOTE_ADDR": "10.0.0.6"})
    assert denied.status_code == 403 and "GPUFLEET_METRICS_ALLOW_FROM" in denied.json["error"]["message"]
    assert client.get("/healthz", environ_base={"REMOTE_ADDR": "10.0.0.6"}).status_code == 200
