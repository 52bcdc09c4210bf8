"""``scripts/demo.py`` as a user runs it: its own session (so Ctrl-C reaches the whole group),
its output read until it says READY."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def start_demo(*args: str, env: dict | None = None, timeout: float = 180):
    """Start the demo; return (process, the lines it printed up to READY). A demo that does
    not get READY within ``timeout`` is killed and fails the test with what it printed."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "demo.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == "READY" or time.monotonic() > deadline:
            break
    if not any(line.strip() == "READY" for line in lines):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        raise AssertionError("".join(lines))
    return proc, lines
