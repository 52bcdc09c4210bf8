"""Real daemon subprocesses on free ports, with readiness waits and clean teardown."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; return it or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - polled predicates may fail until ready
            last_exc = exc
        time.sleep(interval)
    detail = f" (last error: {last_exc})" if last_exc else ""
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")


def wait_http(url: str, timeout: float = 20.0, status: int | None = 200, proc: Daemon | None = None,
              headers: dict | None = None, verify: bool | str = True) -> requests.Response:
    def probe():
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.output()}")
        resp = requests.get(url, timeout=1, headers=headers, verify=verify)
        return resp if status is None or resp.status_code == status else None
    return wait_until(probe, timeout=timeout, what=f"{url} to answer {status}")


class Daemon:
    """A subprocess in its own process group; output goes to a log file for diagnosis."""

    def __init__(self, name: str, argv: list[str], env: dict | None = None, cwd: str | None = None,
                 log_dir: str | None = None):
        self.name = name
        self.argv = argv
        if log_dir:
            self.log_path = Path(log_dir) / f"{name}.log"
        else:
            self.log_path = Path(tempfile.mkstemp(prefix=f"gpufleet-{name}-", suffix=".log")[1])
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update({k: str(v) for k, v in (env or {}).items()})
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, env=full_env, cwd=cwd, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(timeout=10)
        else:
            # the leader is gone; make sure no child of its group survives
            self.signal(signal.SIGKILL)
        self._log.close()
        return self.popen.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def console_script(name: str) -> str:
    """Path of one of our console scripts in the test interpreter's venv."""
    path = VENV_BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make venv` (pip install -e daemons)")
    return str(path)
