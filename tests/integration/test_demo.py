"""`make demo` end to end: a streamed completion is printed, a simulator killed under traffic
is restarted while the router keeps answering, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest
import requests

from support.demo import start_demo
from support.procs import wait_until


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


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def sim_pids(root: int, seed: str) -> list[int]:
    """The live gpufleet-vllm-sim processes under ``root`` started with ``--seed seed``."""
    found = []
    for pid in descendants(root):
        argv = cmdline(pid)
        if alive(pid) and any(a.endswith("gpufleet-vllm-sim") for a in argv) and "--seed" in argv \
                and argv[argv.index("--seed") + 1] == seed:
            found.append(pid)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(300)
def test_demo_streams_a_completion_survives_a_killed_worker_and_ctrl_c_stops_everything():
    proc, lines = start_demo()
    try:
        output = "".join(lines)
        assert "streamed chat completion through the router" in output
        streamed = output.split("streamed chat completion through the router:", 1)[1].split("usage:", 1)[0]
        assert len(streamed.split()) >= 5, output  # words were printed as they streamed
        assert "completion tokens" in output
        started = descendants(proc.pid)
        assert len(started) >= 9, started  # pg, redis, cp, reconciler, 3 sims, 3 agents, router…

        # keep reading what the demo prints while it serves
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        router_url = re.search(r"router\s+(http://\S+)", output).group(1)
        api_key = re.search(r"Authorization: Bearer (\S+?)'", output).group(1)

        def chat() -> int:
            body = {"model": "gpufleet/demo-llm", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
            return requests.post(f"{router_url}/v1/chat/completions", json=body, timeout=30,
                                 headers={"Authorization": f"Bearer {api_key}"}).status_code

        # a worker's simulator crashes under traffic: the router serves on, the demo restarts it
        victim, = sim_pids(proc.pid, "2")
        statuses = [chat() for _ in range(5)]
        os.kill(victim, signal.SIGKILL)
        statuses += [chat() for _ in range(20)]
        wait_until(lambda: "vllm-sim-2 restarted" in "".join(lines), timeout=30,
                   what="the demo to restart the killed simulator")
        text = "".join(lines)
        assert "vllm-sim-2 exited (killed by SIGKILL); restarting it in 1 s" in text, text[-2000:]
        again, = sim_pids(proc.pid, "2")
        assert again != victim
        argv = cmdline(again)
        sim_metrics = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}/metrics"

        def restarted_sim_served() -> bool:
            statuses.append(chat())
            text = requests.get(sim_metrics, timeout=5).text
            return any(line.startswith("vllm:request_success_total") and float(line.split()[-1]) > 0
                       for line in text.splitlines())
        wait_until(restarted_sim_served, timeout=90, interval=0.2, what="the restarted worker to serve again")
        assert statuses == [200] * len(statuses), statuses
        assert proc.poll() is None  # the rest kept running

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        proc.wait(timeout=60)
        reader.join(timeout=10)
        rest = "".join(lines)
        assert proc.returncode == 0, rest[-3000:]
        assert "every process the demo started has exited" in rest
        time.sleep(0.5)
        survivors = [pid for pid in started | {again} if alive(pid)]
        assert survivors == [], f"processes left behind: {survivors}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
