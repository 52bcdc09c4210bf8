#!/usr/bin/env python3
"""What does gpufleet-router cost on the request path, against nginx measured in the same run?

Starts, as real processes on loopback:
  - a backend that answers instantly: nginx ``return 200`` with a chat-completion JSON body;
  - nginx ``proxy_pass`` to that backend (keep-alive upstream): the near-zero-overhead reference;
  - Redis, and one gpufleet-router (gunicorn + gevent) per policy of ``--policies`` (default:
    least_outstanding and cache_aware, side by side), with ``--workers`` workers (all on that
    backend) published through the control plane's Publisher and an API key, exactly as
    production writes them.

The requests are chats of ``--tenants`` tenants (picked at random), each a tenant's system
prompt of ``--prompt-chars`` characters and a short question (about workload (a) of
bench/routing.py: 2,000-token system prompts): what the cache-aware policy reads, hashes and
records per request. ``--prompt-chars 0`` sends the old tiny chat ("Say hi").

Then measures each path (direct, nginx, router) with the same tools:
  - saturation: wrk with a Lua POST script (``-t2 -c64``), requests/s;
  - latency at a fixed moderate rate: an open-loop generator (below) sending at 200 req/s over
    keep-alive connections and timing each request from its *scheduled* send time (so a stall
    is not hidden by coordinated omission); p50/p99, and what each path adds to direct.

With ``--baseline DIR`` (a checkout of other code, e.g. ``git worktree add /tmp/base main``;
repeatable), another router runs that checkout's ``daemons/src`` beside this one, measured
the same way in the same run: the table gains a ``router (DIR's name)`` row and the ratios
of this router to it.
``--rounds N`` alternates the saturation runs N times and reports medians (less noise on a
shared machine).

Usage: bench/router_overhead.py [--duration 8] [--rate 200] [--processes N] [--connections 64]
                                [--baseline DIR] [--rounds N] [--policies least_outstanding,cache_aware]
                                [--workers 8] [--tenants 64] [--prompt-chars 8000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from gpufleet.common.ids import sha256_hex
from gpufleet.common.rediskeys import RedisKeys
from gpufleet.controlplane.publisher import Publisher

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from benchprocs import Procs, cpu_seconds_by_group  # noqa: E402

from support.procs import free_port  # noqa: E402

BIN = Path(sys.executable).parent
MODEL = "bench-model"
ERRORS: dict[str, int] = {}  # url → non-2xx answers seen by wrk (reported, with the router's log)
API_KEY = "gfk_bench_" + "x" * 32
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8})
BODIES = [BODY]  # what the requests send, at random (set in main)


def chat_bodies(tenants: int, prompt_chars: int) -> list[str]:
    """One chat per tenant: its own system prompt of ``prompt_chars`` characters, a question."""
    if prompt_chars <= 0:
        return [BODY]
    out = []
    for t in range(tenants):
        words = f"Tenant {t} policy: answer in short sentences, cite the handbook section, stay polite. "
        system = (words * (prompt_chars // len(words) + 1))[:prompt_chars]
        out.append(json.dumps({"model": MODEL, "max_tokens": 8, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": f"Question {t}: what is the limit?"}]}))
    return out
ANSWER = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": MODEL,
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def nginx_conf(tmp: Path, backend_port: int, proxy_port: int) -> Path:
    answer = ANSWER.replace("'", "\\'")
    conf = f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{backend_port};
        location / {{ default_type application/json; return 200 '{answer}'; }}
    }}
    server {{
        listen 127.0.0.1:{proxy_port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""
    path = tmp / "nginx.conf"
    path.write_text(conf)
    return path


def group_cpu_seconds(leader_pid: int) -> float:
    """CPU time (user + system) of every process in ``leader_pid``'s process group."""
    return cpu_seconds_by_group().get(leader_pid, 0.0)


def wrk(url: str, duration: int, connections: int, tmp: Path, cpu_of: int | None = None) -> tuple[float, float]:
    """(requests/s, CPU µs per request of the process group ``cpu_of``)."""
    script = tmp / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {API_KEY}"\n'
        "local bodies = {" + ",".join(json.dumps(b) for b in BODIES) + "}\n"
        "request = function() return wrk.format(nil, nil, nil, bodies[math.random(#bodies)]) end\n")
    cpu_before = group_cpu_seconds(cpu_of) if cpu_of else 0.0
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    cpu = group_cpu_seconds(cpu_of) - cpu_before if cpu_of else 0.0
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if not match or not total:
        raise RuntimeError(f"wrk against {url} failed:\n{out}")
    if non2xx:
        ERRORS[url] = ERRORS.get(url, 0) + int(non2xx.group(1))
    return float(match.group(1)), cpu / int(total.group(1)) * 1e6


class OpenLoop:
    """Requests sent on a fixed schedule (``rate`` per second) from a few threads, each on
    its own keep-alive connection; a request's latency runs from its scheduled time."""

    def __init__(self, port: int, path: str, rate: float, duration: float, threads: int = 16):
        self.port, self.rate, self.duration, self.threads = port, rate, duration, threads
        self.requests = [(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                          f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body.encode())}\r\n\r\n").encode()
                         + body.encode() for body in BODIES]
        self.total = int(rate * duration)
        self._next = 0
        self._lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors = 0

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= self.total:
                return None
            self._next += 1
            return self._next - 1

    def _worker(self, start: float) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        while (i := self._take()) is not None:
            scheduled = start + i / self.rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sock.sendall(self.requests[(i * 7919) % len(self.requests)])  # a fixed, scattered order
            status = reader.readline()
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            done = time.perf_counter()
            if b" 200 " not in status:
                self.errors += 1
            self.latencies.append(done - scheduled)
        sock.close()

    def run(self) -> tuple[float, float]:
        start = time.perf_counter() + 0.2
        workers = [threading.Thread(target=self._worker, args=(start,)) for _ in range(self.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if self.errors:
            raise RuntimeError(f"{self.errors} requests failed on port {self.port}")
        q = statistics.quantiles(self.latencies, n=100)
        return q[49] * 1000, q[98] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per saturation run")
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s of the latency runs")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="router processes")
    parser.add_argument("--baseline", type=Path, action="append", default=[],
                        help="a checkout whose router is measured beside this one (repeatable)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating saturation runs; medians reported")
    parser.add_argument("--policies", default="least_outstanding,cache_aware",
                        help="comma-separated GPUFLEET_ROUTER_POLICY values: one router each, the first is the "
                        "reference of the ratios")
    parser.add_argument("--workers", type=int, default=8, help="workers published (all on the one backend)")
    parser.add_argument("--tenants", type=int, default=64, help="distinct system prompts")
    parser.add_argument("--prompt-chars", type=int, default=8000, help="characters of each system prompt")
    args = parser.parse_args()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    BODIES[:] = chat_bodies(args.tenants, args.prompt_chars)
    for tool in ("nginx", "wrk", "redis-server"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is missing: run `make deps` (GPUFLEET_WITH_BENCH=1)", file=sys.stderr)
            return 2

    tmp = Path(tempfile.mkdtemp(prefix="gpufleet-bench-router-"))
    procs = Procs(tmp)
    try:
        backend, proxy, redis_port, router = free_port(), free_port(), free_port(), free_port()
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        nginx_proc = procs.start("nginx", [nginx, "-c", str(nginx_conf(tmp, backend, proxy)), "-p", str(tmp)])
        redis_proc = procs.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                           "--save", "", "--appendonly", "no", "--dir", str(tmp)])
        wait_port(backend), wait_port(proxy), wait_port(redis_port)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        client = redis.Redis.from_url(redis_url)
        publisher = Publisher(client, RedisKeys(), heartbeat_interval_s=3600)
        for w in range(args.workers):
            publisher.publish_worker(f"bench-w{w + 1}", MODEL, f"http://127.0.0.1:{backend}")
        publisher.publish_api_key(sha256_hex(API_KEY), "bench", "bench")
        router_env = {"GPUFLEET_REDIS_URL": redis_url, "GPUFLEET_ROUTER_PROCESSES": str(args.processes),
                      "GPUFLEET_LOG_LEVEL": "WARNING"}
        cpu_of = {"direct": nginx_proc.pid, "nginx": nginx_proc.pid}
        paths = [("direct", backend), ("nginx", proxy)]
        for i, policy in enumerate(policies):
            name, port = router_name(policy), (router if i == 0 else free_port())
            proc = procs.start(f"router-{policy}", [sys.executable, "-m", "gpufleet.router"], {
                **router_env, "GPUFLEET_BIND": f"127.0.0.1:{port}", "GPUFLEET_ROUTER_POLICY": policy,
                "GPUFLEET_ROUTER_ID": f"bench-{policy}"})
            cpu_of[name] = proc.pid
            paths.append((name, port))
        baselines = []
        for i, checkout in enumerate(args.baseline):
            name, port = f"router ({checkout.resolve().name})", free_port()
            proc = procs.start(f"router-baseline{i}", [sys.executable, "-m", "gpufleet.router"], {
                **router_env, "GPUFLEET_BIND": f"127.0.0.1:{port}", "GPUFLEET_ROUTER_ID": f"baseline{i}",
                "PYTHONPATH": str(checkout.resolve() / "daemons" / "src")})
            cpu_of[name] = proc.pid
            paths.insert(2 + len(policies) + i, (name, port))
            baselines.append(name)
        for _, port in paths:
            wait_port(port)
        time.sleep(1.0)

        # warm-up (connection pools, the router's key cache and lease script)
        for _, port in paths:
            wrk(f"http://127.0.0.1:{port}/v1/chat/completions", 2, 16, tmp)
        # CPU per request: nginx's one process serves both the backend and the proxy; for the
        # router, its own processes only (the backend's share is what "direct" costs)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in paths}
        redis_us: dict[str, list[float]] = {name: [] for name, _ in paths}  # Redis's CPU per request
        for _ in range(args.rounds):
            for name, port in paths:
                before = group_cpu_seconds(redis_proc.pid)
                runs[name].append(wrk(f"http://127.0.0.1:{port}/v1/chat/completions", args.duration,
                                      args.connections, tmp, cpu_of[name]))
                busy = group_cpu_seconds(redis_proc.pid) - before
                redis_us[name].append(busy * 1e6 / max(1.0, runs[name][-1][0] * args.duration))
        rps = {name: statistics.median(r for r, _ in got) for name, got in runs.items()}
        rus = {name: statistics.median(got) for name, got in redis_us.items()}
        cpu = {name: statistics.median(c for _, c in got) for name, got in runs.items()}
        lat = {name: OpenLoop(port, "/v1/chat/completions", args.rate, args.latency_seconds).run()
               for name, port in paths}
    finally:
        procs.stop()
        for url, count in ERRORS.items():
            print(f"{count} non-2xx answers from {url}", file=sys.stderr)
        if ERRORS:
            for log in sorted(tmp.glob("router*.log")):
                lines = [x for x in log.read_text(errors="replace").splitlines() if " WARNING " in x or " ERROR " in x]
                print(f"{log.name}: {len(lines)} warnings/errors, the first:", *lines[:8], sep="\n  ", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)

    d50, d99 = lat["direct"]
    n50, n99 = lat["nginx"]
    print(f"\nrouter overhead on {os.cpu_count()} cores; router processes: {args.processes}; "
          f"wrk -t2 -c{args.connections} -d{args.duration}s; latency: open loop at {args.rate:.0f} req/s "
          f"for {args.latency_seconds:.0f} s")
    print(f"{'path':<26} {'req/s':>9} {'vs nginx':>9} {'CPU us/req':>11} {'redis us/req':>13} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} {'+p50 vs nginx':>14}")
    for name, _ in paths:
        p50, p99 = lat[name]
        added50, added99 = p50 - d50, p99 - d99
        ref = (n50 - d50) or 1e-9
        print(f"{name:<26} {rps[name]:>9.0f} {rps[name] / rps['nginx']:>8.2f}x {cpu[name]:>11.0f} {rus[name]:>13.1f} "
              f"{p50:>8.2f} {p99:>8.2f} {added50:>8.2f} {added99:>8.2f} "
              f"{(added50 / ref if name != 'direct' else 0):>13.1f}x")
    print("CPU us/req: direct and nginx = the nginx process (backend, plus proxy for 'nginx'); "
          "router rows = the router's own processes (not Redis, not the backend); redis us/req = Redis's CPU "
          "time per request (its idle ticks included: small figures are noise)")
    print(f"requests: {len(BODIES)} chats of {args.prompt_chars} + ~30 characters over {args.workers} workers")
    ref = router_name(policies[0])
    others = [router_name(p) for p in policies[1:]] + baselines
    for other in others:
        print(f"{other} vs {ref}: CPU per request {cpu[other] / cpu[ref]:.3f}x "
              f"({cpu[other] - cpu[ref]:+.0f} us), req/s {rps[other] / rps[ref]:.3f}x, p50 {lat[other][0]:.2f} vs "
              f"{lat[ref][0]:.2f} ms, p99 {lat[other][1]:.2f} vs {lat[ref][1]:.2f} ms "
              f"(medians of {args.rounds} alternating saturation run(s))")
    return 0


def router_name(policy: str) -> str:
    return f"router {policy}"


if __name__ == "__main__":
    sys.exit(main())
