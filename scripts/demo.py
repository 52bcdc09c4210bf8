#!/usr/bin/env python3
"""`make demo`: a local gpufleet — PostgreSQL, Redis, the control plane and reconciler,
three workers (gpufleet-vllm-sim + gpufleet-agent) and a router — answering an OpenAI
request, then serving until Ctrl-C, when it stops everything it started.

The daemons are the same console scripts the Ansible roles run under systemd; only vLLM
is replaced by the simulator, since there is no GPU here. While it serves, the demo does
what systemd does with the roles' units: a process that exits is reported and started
again after a back-off (the simulators as ``vllm.service``'s ``Restart=on-failure``, the
gpufleet daemons as their units' ``Restart=always``), and the rest keep running, so
failover can be tried: ``kill -9`` a simulator under traffic and watch ``gpufleet workers``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.procs import Daemon, console_script, free_port, wait_http, wait_until  # noqa: E402
from support.prometheus import PrometheusServer  # noqa: E402
from support.services import PostgresServer, RedisServer  # noqa: E402

MODEL = "gpufleet/demo-llm"
# signals after which systemd's Restart=on-failure sees a clean exit (SuccessExitStatus)
CLEAN_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)
FIRST_BACKOFF_S, MAX_BACKOFF_S, STABLE_AFTER_S = 1.0, 30.0, 30.0


@dataclass
class Service:
    """One supervised process: how to start it again, and its restart state."""

    name: str
    argv: list[str]
    env: dict
    restart: str  # "always" or "on-failure", as in the roles' systemd units
    daemon: Daemon | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = FIRST_BACKOFF_S
    restart_at: float | None = None  # while waiting out the back-off


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def clean_exit(code: int) -> bool:
    return code == 0 or -code in CLEAN_SIGNALS


def port_or_free(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


class Fleet:
    def __init__(self, workers: int, run_dir: Path, monitoring: bool = False):
        self.workers = workers
        self.monitoring = monitoring  # a Prometheus discovering the fleet through the control plane's SD
        self.prometheus: PrometheusServer | None = None
        self.sd_token = "gfs_demo_" + os.urandom(12).hex()
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.services: list[Service] = []
        self.redis: RedisServer | None = None
        self.postgres: PostgresServer | None = None
        self.admin_token = "gfa_demo_" + os.urandom(12).hex()
        self.vllm_key = "demo-vllm-" + os.urandom(8).hex()

    def start(self, name: str, argv: list[str], env: dict, restart: str = "always") -> Daemon:
        service = Service(name, argv, env, restart)
        self.services.append(service)
        return self._spawn(service)

    def _spawn(self, service: Service) -> Daemon:
        # each run logs to its own file, so the log of the run that died is kept
        log_name = service.name if not service.restarts else f"{service.name}.restart{service.restarts}"
        service.daemon = Daemon(log_name, service.argv, service.env, log_dir=str(self.logs))
        service.started_at = time.monotonic()
        service.restart_at = None
        return service.daemon

    def supervise(self, now: float | None = None) -> None:
        """Report exits and restart like systemd: after a back-off that doubles from 1 s up
        to 30 s and starts again from 1 s once a process has stayed up 30 s."""
        now = time.monotonic() if now is None else now
        for svc in self.services:
            if svc.daemon is None:
                if svc.restart_at is not None and now >= svc.restart_at:
                    svc.restarts += 1
                    daemon = self._spawn(svc)
                    step(f"{svc.name} restarted (pid {daemon.pid}, restart {svc.restarts}); "
                         f"log {daemon.log_path}")
                continue
            code = svc.daemon.popen.poll()
            if code is None:
                if now - svc.started_at >= STABLE_AFTER_S:
                    svc.backoff_s = FIRST_BACKOFF_S
                continue
            svc.daemon.stop()  # reaps it, and kills what is left of its process group
            svc.daemon = None
            how = describe_exit(code)
            if svc.restart == "on-failure" and clean_exit(code):
                step(f"{svc.name} exited ({how}); not restarted (Restart=on-failure, a clean exit)")
                continue
            svc.restart_at = now + svc.backoff_s
            step(f"{svc.name} exited ({how}); restarting it in {svc.backoff_s:.0f} s (Restart={svc.restart})")
            svc.backoff_s = min(svc.backoff_s * 2, MAX_BACKOFF_S)

    def cli(self, *args: str) -> str:
        env = dict(os.environ, GPUFLEET_CONTROL_PLANE_URL=self.cp_url, GPUFLEET_ADMIN_TOKEN=self.admin_token,
                   GPUFLEET_DATABASE_URL=self.database_url)
        done = subprocess.run([console_script("gpufleet"), *args], env=env, capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"gpufleet {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def up(self) -> None:
        step("PostgreSQL and Redis (throw-away, in a temp dir)")
        self.postgres = PostgresServer().start()
        self.database_url = self.postgres.create_database("gpufleet")
        self.redis = RedisServer().start()
        common = {"GPUFLEET_DATABASE_URL": self.database_url, "GPUFLEET_REDIS_URL": self.redis.url,
                  "GPUFLEET_ADMIN_TOKEN": self.admin_token, "GPUFLEET_HEARTBEAT_INTERVAL_S": "2",
                  "GPUFLEET_RECONCILE_INTERVAL_S": "1"}

        step("control plane and reconciler")
        self.cp_port = port_or_free(8003)
        self.cp_url = f"http://127.0.0.1:{self.cp_port}"
        self.router_port = port_or_free(8002)
        self.router_url = f"http://127.0.0.1:{self.router_port}"
        sd = {"GPUFLEET_SD_TOKEN": self.sd_token, "GPUFLEET_SD_ROUTER_URLS": self.router_url,
              "GPUFLEET_SD_CONTROLPLANE_URLS": self.cp_url} if self.monitoring else {}
        self.cli("db", "migrate")
        cp = self.start("controlplane", [console_script("gpufleet-controlplane")],
                        {**common, **sd, "GPUFLEET_BIND": f"127.0.0.1:{self.cp_port}"})
        self.start("reconciler", [console_script("gpufleet-reconciler")], common)
        wait_http(f"{self.cp_url}/readyz", timeout=60, proc=cp)

        step(f"{self.workers} workers: gpufleet-vllm-sim + gpufleet-agent")
        self.worker_urls = []
        for index in range(1, self.workers + 1):
            instance = f"demo-worker-{index}"
            join_secret_file = self.run_dir / f"{instance}.join-secret"
            self.cli("instances", "add", instance, "--model", MODEL, "--hostname", "localhost",
                     "--join-secret-file", str(join_secret_file))
            vllm_port, agent_port = free_port(), free_port()
            self.start(f"vllm-sim-{index}", [
                console_script("gpufleet-vllm-sim"), MODEL, "--host", "127.0.0.1", "--port", str(vllm_port),
                "--max-num-seqs", "8", "--startup-delay", "1", "--seed", str(index)],
                {"VLLM_API_KEY": self.vllm_key}, restart="on-failure")
            self.start(f"agent-{index}", [console_script("gpufleet-agent")], {
                "INSTANCE_ID": instance, "CONTROL_PLANE_URL": self.cp_url, "MODEL_ID": MODEL,
                "VLLM_BASE_URL": f"http://127.0.0.1:{vllm_port}", "VLLM_API_KEY": self.vllm_key,
                "AGENT_PORT": str(agent_port), "GPUFLEET_BIND": f"127.0.0.1:{agent_port}",
                "ADVERTISE_URL": f"http://127.0.0.1:{vllm_port}",
                "AGENT_URL": f"http://127.0.0.1:{agent_port}",
                "WORKER_AUTH_TOKEN_FILE": str(self.run_dir / f"{instance}.token"),
                "WORKER_JOIN_SECRET_FILE": str(join_secret_file),
                "HEARTBEAT_INTERVAL_S": "2"})
            self.worker_urls.append((instance, f"http://127.0.0.1:{vllm_port}", f"http://127.0.0.1:{agent_port}"))

        step("router")
        router = self.start("router", [console_script("gpufleet-router")], {
            "GPUFLEET_REDIS_URL": self.redis.url, "GPUFLEET_VLLM_API_KEY": self.vllm_key,
            "GPUFLEET_BIND": f"127.0.0.1:{self.router_port}", "GPUFLEET_ROUTER_PROCESSES": "2"})
        wait_http(f"{self.router_url}/healthz", timeout=60, proc=router)

        step("waiting for the workers to be ready (model loaded, warm-up done, registered, health-checked)")
        client = self.redis.client()
        ready_key = f"gpufleet:workers:ready:{MODEL}"
        wait_until(lambda: self._check_alive() and client.scard(ready_key) == self.workers, timeout=120,
                   interval=0.25, what=f"{self.workers} workers in {ready_key}")

        step("an API key")
        self.api_key = json.loads(self.cli("keys", "create", "demo", "--json"))["key"]
        if self.monitoring:
            step("Prometheus (Debian's package), discovering the fleet at the control plane's /v1/sd/prometheus")
            self.prometheus = PrometheusServer(f"{self.cp_url}/v1/sd/prometheus", self.sd_token, interval_s=2,
                                               port=port_or_free(9090)).start()

    def _check_alive(self) -> bool:
        """While starting up, any exit is fatal: the fleet is not usable yet."""
        for svc in self.services:
            if svc.daemon and not svc.daemon.alive():
                raise RuntimeError(f"{svc.name} exited; its log:\n{svc.daemon.output()[-3000:]}")
        return True

    def down(self) -> None:
        for svc in reversed(self.services):
            if svc.daemon:
                svc.daemon.stop(timeout=10)
                svc.daemon = None
        self.services.clear()
        if self.prometheus:
            self.prometheus.cleanup()
        if self.redis:
            self.redis.cleanup()
        if self.postgres:
            self.postgres.cleanup()


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def ask(fleet: Fleet) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{fleet.router_url}/v1", api_key=fleet.api_key)
    models = [m.id for m in client.models.list().data]
    print(f"\nmodels: {models}")
    print("\nstreamed chat completion through the router:\n")
    stream = client.chat.completions.create(
        model=MODEL, stream=True, max_tokens=40,
        messages=[{"role": "user", "content": "Say hello from gpufleet."}],
        stream_options={"include_usage": True})
    print("  ", end="")
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            usage = chunk.usage
    print()
    if usage:
        print(f"\n   usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens")


def show(fleet: Fleet) -> None:
    sim_pids = ", ".join(f"{svc.name} pid {svc.daemon.pid}" for svc in fleet.services
                         if svc.name.startswith("vllm-sim") and svc.daemon)
    print(f"""
gpufleet is running (logs in {fleet.logs}):
  router          {fleet.router_url}   (/v1/chat/completions, /v1/completions, /v1/models, /readyz, /metrics)
  control plane   {fleet.cp_url}   (admin token: {fleet.admin_token})""")
    for instance, vllm, agent in fleet.worker_urls:
        print(f"  {instance:14}  vLLM (simulated) {vllm}   agent {agent}  (/readyz /metrics /info)")
    print(f"""
Try it:
  curl -s {fleet.router_url}/v1/chat/completions -H 'Authorization: Bearer {fleet.api_key}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}]}}'

  python3 - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{fleet.router_url}/v1", api_key="{fleet.api_key}")
reply = client.chat.completions.create(model="{MODEL}", messages=[{{"role": "user", "content": "hi"}}])
print(reply.choices[0].message.content)
PY

  GPUFLEET_CONTROL_PLANE_URL={fleet.cp_url} GPUFLEET_ADMIN_TOKEN={fleet.admin_token} .venv/bin/gpufleet workers

Failover: kill -9 a simulator ({sim_pids}) while requests run; the router retries them on
the others, the worker leaves the ready set, and the demo restarts the process after a back-off.

Press Ctrl-C to stop everything.""", flush=True)
    if fleet.prometheus:
        print(f"""
Prometheus       {fleet.prometheus.url}   (targets: {fleet.prometheus.url}/targets, alerts: /alerts)
  query to try:  model:gpufleet_router_requests:rate1m   (requests/s per model, from monitoring/rules)
  dashboard:     import monitoring/grafana/gpufleet.json in Grafana, data source {fleet.prometheus.url}""",
              flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--once", action="store_true", help="answer one request, then stop everything")
    parser.add_argument("--monitoring", action="store_true",
                        default=os.environ.get("MONITORING", "").lower() in ("1", "true", "yes"),
                        help="also run a Prometheus scraping the fleet (make demo MONITORING=1)")
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="gpufleet-demo-"))
    fleet = Fleet(args.workers, run_dir, monitoring=args.monitoring)

    def on_signal(signum, frame):
        # a second Ctrl-C (or a SIGTERM on top) must not interrupt the clean-up
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    status = 0
    try:
        fleet.up()
        ask(fleet)
        show(fleet)
        print("READY", flush=True)
        while not args.once:  # serve until Ctrl-C
            fleet.supervise()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
    except Exception as exc:  # noqa: BLE001 - print what failed, then clean up
        print(f"\ndemo failed: {exc}", file=sys.stderr, flush=True)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fleet.down()
        if status == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"logs kept in {fleet.logs}", file=sys.stderr)
        print("stopped: every process the demo started has exited.", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
