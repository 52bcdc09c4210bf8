"""`make demo` end to end: a streamed completion is printed, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(240)
def test_demo_streams_a_completion_and_ctrl_c_stops_everything():
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "demo.py")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + 180
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "READY" or time.monotonic() > deadline:
                break
        output = "".join(lines)
        assert "READY" in output, output
        assert "streamed chat completion through the router" in output
        streamed = output.split("streamed chat completion through the router:", 1)[1].split("usage:", 1)[0]
        assert len(streamed.split()) >= 5, output  # words were printed as they streamed
        assert "completion tokens" in output
        started = descendants(proc.pid)
        assert len(started) >= 9, started  # pg, redis, cp, reconciler, 3 sims, 3 agents, router…
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        assert "every process the demo started has exited" in rest
        time.sleep(0.5)
        survivors = [pid for pid in started if alive(pid)]
        assert survivors == [], f"processes left behind: {survivors}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
