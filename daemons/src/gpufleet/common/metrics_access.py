"""Who may read a daemon's ``/metrics``: ``GPUFLEET_METRICS_ALLOW_FROM``.

A comma-separated list of IP addresses and networks (``100.64.0.5, 10.1.0.0/24``). When
set, ``GET /metrics`` from any other address is answered 403 (the rest of the API is
unaffected); unset, ``/metrics`` is open to whoever reaches the bind address. The roles
set it to the Prometheus hosts' addresses (plus loopback). The same variable works for
every gpufleet daemon that installs :func:`guard_metrics`.
"""

from __future__ import annotations

import ipaddress

from flask import Flask, jsonify, request

from gpufleet.common.config import ConfigError, Env

VARIABLE = "GPUFLEET_METRICS_ALLOW_FROM"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow_from(value: str | None, name: str = VARIABLE) -> tuple[Network, ...]:
    if value is None or not value.strip():
        return ()
    networks = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {item!r} is not an IP address or network: set it to e.g. "
                              "127.0.0.1,100.64.0.5,10.1.0.0/24") from None
    return tuple(networks)


def allow_from_env(env: Env) -> tuple[Network, ...]:
    return parse_allow_from(env.str(VARIABLE), VARIABLE)


def allowed(address: str | None, networks: tuple[Network, ...]) -> bool:
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address((address or "").split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks if net.version == ip.version)


def guard_metrics(app: Flask, networks: tuple[Network, ...], path: str = "/metrics") -> None:
    """Answer 403 to ``path`` from addresses outside ``networks`` (no-op when empty)."""
    if not networks:
        return

    @app.before_request
    def _only_scrapers():
        if request.path == path and not allowed(request.remote_addr, networks):
            return jsonify({"error": {"message": f"{path} is readable only from {VARIABLE}",
                                      "code": "forbidden"}}), 403
        return None
