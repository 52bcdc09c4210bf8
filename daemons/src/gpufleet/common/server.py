"""Serving a Flask app factory under gunicorn from a console script.

The daemons are started as ``gpufleet-<name>``; this runs gunicorn in-process (no shell
wrapper) so systemd sees one main PID, signals behave, and the app is built by its
factory inside each worker after the fork (nothing is started at import time).
"""

from __future__ import annotations

from collections.abc import Callable

from gunicorn.app.base import BaseApplication


class _App(BaseApplication):
    def __init__(self, factory: Callable[[], object], options: dict):
        self._factory = factory
        self._options = options
        super().__init__()

    def load_config(self):
        for key, value in self._options.items():
            if value is not None and key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self):
        return self._factory()


def serve(factory: Callable[[], object], host: str, port: int, *, workers: int = 1,
          worker_class: str = "gevent", worker_connections: int = 1000, timeout: int = 0,
          graceful_timeout: int = 30, keepalive: int = 75, access_log: bool = False,
          extra: dict | None = None, extra_hosts: tuple = ()) -> None:
    """Run gunicorn until it exits. ``timeout=0`` disables the idle-worker killer, which
    would otherwise break long streams under gevent workers."""
    binds = [f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in (host, *extra_hosts)]
    options = {
        "bind": binds,
        "workers": workers,
        "worker_class": worker_class,
        "worker_connections": worker_connections,
        "timeout": timeout,
        "graceful_timeout": graceful_timeout,
        "keepalive": keepalive,
        "accesslog": "-" if access_log else None,
        "errorlog": "-",
        "loglevel": "info",
        # gunicorn's control socket defaults to one path per user, shared by every daemon on
        # a host, and cannot be created under the units' ProtectSystem=strict hardening.
        "control_socket_disable": True,
    }
    options.update(extra or {})
    _App(factory, options).run()
