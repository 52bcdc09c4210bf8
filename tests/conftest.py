"""Shared fixtures: real throw-away Redis and PostgreSQL servers, and daemon processes.

Tests under tests/unit get the ``unit`` marker, tests under tests/integration the
``integration`` marker (and so on for tests/conformance and tests/vllm), so
``pytest -m unit`` runs the fast suite alone. Tests that start real vLLM carry ``vllm``.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support.procs import Daemon, console_script, free_port, wait_http  # noqa: E402
from support.services import PostgresServer, RedisServer  # noqa: E402

_db_counter = itertools.count()

pytest_plugins = ["support.vllm_fixtures"]  # real vLLM servers: vllm_servers, vllm_figures


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        for marker in ("unit", "integration", "fleet", "conformance", "vllm"):
            if marker in parts:
                item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server):
    """A flushed database on the session's Redis server."""
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def database_url(postgres_server):
    """A fresh, empty database for one test."""
    return postgres_server.create_database(f"t{os.getpid()}_{next(_db_counter)}")


class DaemonStarter:
    """``start(name, argv, env)`` a daemon; ``stop_all()`` stops them, the last started first."""

    def __init__(self):
        self.started: list[Daemon] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> Daemon:
        daemon = Daemon(name, argv, env)
        self.started.append(daemon)
        return daemon

    def stop_all(self) -> None:
        for daemon in reversed(self.started):
            daemon.stop()

    script = staticmethod(console_script)
    port = staticmethod(free_port)
    wait_http = staticmethod(wait_http)


@pytest.fixture
def daemons(request):
    """Start daemons with ``daemons.start(name, argv, env)``; all are stopped after the test."""
    starter = DaemonStarter()
    request.node._gpufleet_daemons = starter.started
    yield starter
    starter.stop_all()


@pytest.fixture(scope="module")
def module_daemons():
    """Like ``daemons``, for processes that the tests of one module share (they are stopped
    after the module's last test)."""
    starter = DaemonStarter()
    yield starter
    starter.stop_all()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the logs of the daemons the test started."""
    outcome = yield
    report = outcome.get_result()
    if report.when in ("setup", "call") and report.failed:
        shared = getattr(item, "funcargs", {}).get("module_daemons")
        for daemon in getattr(item, "_gpufleet_daemons", []) + (shared.started if shared else []):
            report.sections.append((f"daemon {daemon.name} log (tail)", daemon.output()[-4000:]))
