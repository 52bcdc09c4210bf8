"""The ``server`` fixture: each test here runs twice, against gpufleet-vllm-sim and against
real vLLM (its CPU build, serving the tiny model of scripts/build-tiny-model.py), with the
same assertions. Both are started once per session with the same settings."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from support.procs import Daemon, console_script, free_port, wait_until
from support.vllm import MAX_MODEL_LEN, MAX_NUM_SEQS, SERVED_NAME
from support.vllm_fixtures import VLLM_KEY

SIM_STARTUP_DELAY_S = 2.0


class SimServer:
    """gpufleet-vllm-sim with the real server's settings, watched while it 'loads'."""

    api_key = VLLM_KEY
    served_name = SERVED_NAME
    max_model_len = MAX_MODEL_LEN
    max_num_seqs = MAX_NUM_SEQS

    def __init__(self):
        self.port = free_port()
        self.loading_answers: set[str] = set()
        self.daemon = Daemon("vllm-sim-conformance", [
            console_script("gpufleet-vllm-sim"), str(Path("/models/tiny")), "--port", str(self.port),
            "--served-model-name", SERVED_NAME, "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", str(MAX_NUM_SEQS), "--startup-delay", str(SIM_STARTUP_DELAY_S),
            "--ttft-ms", "20", "--itl-ms", "2"], {"VLLM_API_KEY": VLLM_KEY})
        started = time.monotonic()

        def probe():
            assert self.daemon.alive(), self.daemon.output()
            try:
                status = requests.get(self.url + "/health", timeout=2).status_code
            except requests.ConnectionError:
                self.loading_answers.add("refused")
                return False
            if status != 200:
                self.loading_answers.add(str(status))
            return status == 200
        wait_until(probe, timeout=30, interval=0.1, what="the simulator to load")
        self.startup_s = time.monotonic() - started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.daemon.output()


@pytest.fixture(scope="session")
def sim_server():
    server = SimServer()
    yield server
    server.daemon.stop()


@pytest.fixture(scope="session", params=["sim", pytest.param("vllm", marks=pytest.mark.vllm)])
def server(request):
    if request.param == "sim":
        return request.getfixturevalue("sim_server")
    return request.getfixturevalue("vllm_servers").get("a")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the tail of the server's log."""
    outcome = yield
    report = outcome.get_result()
    server = getattr(item, "funcargs", {}).get("server")
    if report.when == "call" and report.failed and server is not None:
        report.sections.append(("server log (tail)", server.output()[-4000:]))
