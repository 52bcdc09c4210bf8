"""Session fixtures for real vLLM servers (a pytest plugin, loaded by tests/conftest.py).

``vllm_servers.get("a")`` returns a healthy server, starting it (or restarting it, if a
test killed it) and waiting for it; ``get("a", "b")`` starts the missing ones together.
Servers are started at most once per session unless a test stops one, and all stop at the
end. ``vllm_figures`` collects the timings the tests measure; they are printed at the end
of the run.
"""

from __future__ import annotations

import pytest

from .vllm import MachineLock, VllmServer

VLLM_KEY = "sk-test-vllm-key-0123456789"
# a test that starts the servers may first wait for the machine's lock and build the venv
VLLM_TEST_TIMEOUT_S = 1200


class VllmPool:
    def __init__(self, figures: dict):
        self.lock = MachineLock()
        self.servers: dict[str, VllmServer] = {}
        self.figures = figures

    def get(self, *names: str) -> VllmServer | tuple[VllmServer, ...]:
        self.lock.acquire()
        waiting = []
        for name in names:
            server = self.servers.get(name)
            if server is None:
                server = self.servers[name] = VllmServer(name, api_key=VLLM_KEY).start()
                waiting.append(server)
            elif not server.healthy():
                server.restart()
                waiting.append(server)
        for server in waiting:
            startup = server.wait_ready()
            self.figures.setdefault("vLLM start-up (s)", []).append(round(startup, 1))
        found = tuple(self.servers[name] for name in names)
        return found[0] if len(found) == 1 else found

    def close(self) -> None:
        for server in self.servers.values():
            server.cleanup()
        self.lock.release()


@pytest.fixture(scope="session")
def vllm_figures(request):
    figures: dict[str, list] = {}
    request.config._gpufleet_vllm_figures = figures
    return figures


@pytest.fixture(scope="session")
def vllm_servers(vllm_figures):
    pool = VllmPool(vllm_figures)
    yield pool
    pool.close()


@pytest.hookimpl(trylast=True)  # after tests/conftest.py has marked tests/vllm/** with ``vllm``
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("vllm") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(VLLM_TEST_TIMEOUT_S))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    figures = getattr(config, "_gpufleet_vllm_figures", None)
    if figures:
        terminalreporter.section("real vLLM figures")
        for name, values in figures.items():
            terminalreporter.write_line(f"{name}: {values}")
