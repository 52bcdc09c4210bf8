"""Subprocesses of a benchmark: each in its own process group with its log in the run's temp
dir, stopped in reverse order (SIGTERM, then SIGKILL after 10 s); and the CPU time each
process group has used."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


class Procs:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps its own copy
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self, procs: list[subprocess.Popen] | None = None, sig: int = signal.SIGTERM) -> None:
        """Stop ``procs`` (default: all), newest first."""
        targets = list(reversed(procs if procs is not None else self.procs))
        for proc in targets:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        for proc in targets:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            self.procs.remove(proc)


def cpu_seconds_by_group() -> dict[int, float]:
    """CPU seconds (user + system) used so far by the live processes of each process group,
    by group id (a process started by :class:`Procs` leads its own group)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pgid = int(fields[2])  # field 5 of stat: the process group; 14, 15: utime, stime
        out[pgid] = out.get(pgid, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out
