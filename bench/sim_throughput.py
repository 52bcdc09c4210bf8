#!/usr/bin/env python3
"""How many non-streamed completions per second gpufleet-vllm-sim answers at saturation,
against a bare aiohttp server answering a fixed JSON body to the same POST, measured in
the same run with the same load generator.

    .venv/bin/python bench/sim_throughput.py [--duration 10] [--connections 64] [--load wrk|python]

The simulator runs as a real process with every latency at zero and jitter off, so what
is measured is its own cost per request (HTTP, JSON, scheduler, text, metrics). The load
generator is wrk with a Lua POST script when installed, else an asyncio client in another
process. With taskset and two or more cores, the server is pinned to core 0 and the load
generator to the others ("one core" for the server, as in production).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BASELINE_BODY = json.dumps({
    "id": "cmpl-0", "object": "text_completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "text": " lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod "
                 "tempor", "logprobs": None, "finish_reason": "length", "stop_reason": None}],
    "usage": {"prompt_tokens": 8, "total_tokens": 24, "completion_tokens": 16}}).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_baseline_server(port: int) -> None:
    """A bare aiohttp server: read the POST body, answer a fixed JSON document."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=BASELINE_BODY, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    app.router.add_get("/health", lambda request: web.Response())
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=2048)


async def _python_load(url: str, body: bytes, connections: int, duration: float) -> dict:
    import aiohttp

    done = errors = 0
    deadline = time.monotonic() + duration
    headers = {"Content-Type": "application/json"}

    async def worker(session):
        nonlocal done, errors
        while time.monotonic() < deadline:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status == 200:
                    done += 1
                else:
                    errors += 1

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        elapsed = time.monotonic() - started
    return {"requests_per_s": done / elapsed, "errors": errors}


def run_python_load(url: str, body: str, connections: int, duration: float) -> None:
    print(json.dumps(asyncio.run(_python_load(url, body.encode(), connections, duration))))


def cpu_split() -> tuple[list[str], list[str]]:
    """taskset prefixes: the server on core 0, the load generator on the other cores."""
    cores = os.cpu_count() or 1
    if cores < 2 or not shutil.which("taskset"):
        return [], []
    return ["taskset", "-c", "0"], ["taskset", "-c", f"1-{cores - 1}"]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout}s")


def measure(url: str, body: str, args, load_prefix: list[str]) -> dict:
    if args.load == "wrk":
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                         f"wrk.body = {json.dumps(body)}\n")
        try:
            out = subprocess.run([*load_prefix, "wrk", "-t", str(args.threads), "-c", str(args.connections),
                                  "-d", f"{args.duration}s", "--latency", "-s", script.name, url],
                                 check=True, capture_output=True, text=True).stdout
        finally:
            os.unlink(script.name)
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        p50 = re.search(r"50%\s+([\d.]+\w+)", out)
        return {"requests_per_s": rate, "errors": int(errors.group(1)) if errors else 0,
                "p50": p50.group(1) if p50 else None}
    out = subprocess.run([*load_prefix, sys.executable, __file__, "--python-load", url, "--body", body,
                          "--connections", str(args.connections), "--duration", str(args.duration)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per server")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--load", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    parser.add_argument("--python-load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        return run_baseline_server(args.baseline_server)
    if args.python_load:
        return run_python_load(args.python_load, args.body, args.connections, args.duration)
    if args.load == "auto":
        args.load = "wrk" if shutil.which("wrk") else "python"

    server_prefix, load_prefix = cpu_split()
    body = json.dumps({"model": "bench", "prompt": "The quick brown fox jumps over the lazy dog",
                       "max_tokens": args.max_tokens, "ignore_eos": True})
    sim_bin = Path(sys.executable).parent / "gpufleet-vllm-sim"
    results = {}
    for name in ("baseline", "simulator"):
        port = free_port()
        if name == "simulator":
            argv = [str(sim_bin), "bench", "--port", str(port), "--ttft-ms", "0", "--itl-ms", "0",
                    "--prefill-ms-per-token", "0", "--jitter", "0", "--max-num-seqs", "1024",
                    "--log-level", "WARNING"]
        else:
            argv = [sys.executable, __file__, "--baseline-server", str(port)]
        proc = start([*server_prefix, *argv])
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base + "/health", proc)
            check = urllib.request.Request(base + "/v1/completions", data=body.encode(),
                                           headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(check, timeout=10) as resp:
                answer = json.loads(resp.read())
            assert answer["object"] == "text_completion", answer
            if name == "simulator":
                assert answer["usage"]["completion_tokens"] == args.max_tokens, answer
            results[name] = measure(base + "/v1/completions", body, args, load_prefix)
        finally:
            stop(proc)

    ratio = results["simulator"]["requests_per_s"] / results["baseline"]["requests_per_s"]
    summary = {"load": args.load, "connections": args.connections, "duration_s": args.duration,
               "pinned": bool(server_prefix), "max_tokens": args.max_tokens, **{
                   f"{name}_{key}": value for name, r in results.items() for key, value in r.items()},
               "ratio": round(ratio, 3)}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"load generator: {args.load}, {args.connections} connections, {args.duration:g} s each, "
          f"server pinned to one core: {'yes' if server_prefix else 'no'}")
    for name in ("baseline", "simulator"):
        r = results[name]
        extra = f"  p50 {r['p50']}" if r.get("p50") else ""
        print(f"  {name:<10} {r['requests_per_s']:>9.0f} req/s  errors {r['errors']}{extra}")
    print(f"  simulator / bare aiohttp = {ratio:.2f}")


if __name__ == "__main__":
    main()
