#!/usr/bin/env python3
"""What gpufleet-vllm-sim costs in CPU, measured in one run against a bare aiohttp server
and against the simulator of an older commit (the per-sequence sleeper before the step
engine), with the same load generators.

    .venv/bin/python bench/sim_throughput.py [--duration 10] [--connections 64] [--load wrk|python]
        [--old-ref f6aef1f] [--streams 64] [--stream-tokens 200]

1. Saturation: non-streamed completions/s with every latency at zero and jitter off, so
   what is measured is the simulator's own cost per request (HTTP, JSON, scheduler, text,
   metrics), against the bare server (wrk with a Lua POST script when installed, else an
   asyncio client in another process).
2. Streaming at a modelled pace: ``--streams`` concurrent streams of ``--stream-tokens``
   tokens each, again and again for ``--duration`` seconds, at the default latency knobs
   and with ``--profile llama-3.1-8b-h100``; the CPU time of the simulator process (from
   /proc) per streamed token and per engine step (vllm:iteration_tokens_total_count),
   old against new.

The old simulator is the ``daemons/src`` tree of ``--old-ref`` (``git archive``), run with
the same Python. With taskset and two or more cores, the server is pinned to core 0 and
the load generator to the others ("one core" for the server, as in production).
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


async def _closed_loop(url: str, body: bytes, clients: int, duration: float, read) -> dict:
    """``clients`` clients, each posting ``body`` to ``url`` back to back until ``duration``
    is up; ``await read(resp, counts)`` takes each answer and adds to ``counts``."""
    import aiohttp

    counts = {"requests": 0, "errors": 0, "tokens": 0}
    deadline = time.monotonic() + duration
    headers = {"Content-Type": "application/json"}

    async def client(session):
        while time.monotonic() < deadline:
            async with session.post(url, data=body, headers=headers) as resp:
                await read(resp, counts)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        counts["elapsed_s"] = time.monotonic() - started
    return counts


async def _read_whole(resp, counts: dict) -> None:
    await resp.read()
    counts["requests" if resp.status == 200 else "errors"] += 1


async def _read_stream(resp, counts: dict) -> None:
    last = b""
    async for line in resp.content:
        if line.startswith(b"data: {"):
            last = line
    if resp.status != 200 or b'"usage"' not in last:
        counts["errors"] += 1
        return
    counts["tokens"] += json.loads(last[6:])["usage"]["completion_tokens"]
    counts["requests"] += 1


def run_python_load(url: str, body: str, connections: int, duration: float) -> None:
    counts = asyncio.run(_closed_loop(url, body.encode(), connections, duration, _read_whole))
    print(json.dumps({"requests_per_s": counts["requests"] / counts["elapsed_s"], "errors": counts["errors"]}))


def run_stream_load(url: str, body: str, streams: int, duration: float) -> None:
    """``streams`` clients, each streaming completions back to back until ``duration`` is up."""
    print(json.dumps(asyncio.run(_closed_loop(url, body.encode(), streams, duration, _read_stream))))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its reaped children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def old_simulator(ref: str, workdir: str) -> dict:
    """The environment that runs the simulator of commit ``ref`` (its daemons/src tree)."""
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(repo), "archive", ref, "daemons/src"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", workdir], input=archive, check=True)
    return {**os.environ, "PYTHONPATH": os.path.join(workdir, "daemons", "src")}


def metric_value(base: str, name: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


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


def start(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env)


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
    parser.add_argument("--old-ref", default="f6aef1f",
                        help="git commit of the simulator to compare with (default: the last before the step engine)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams in the streaming measure")
    parser.add_argument("--stream-tokens", type=int, default=200, help="tokens per streamed completion")
    parser.add_argument("--stream-load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--python-load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        return run_baseline_server(args.baseline_server)
    if args.python_load:
        return run_python_load(args.python_load, args.body, args.connections, args.duration)
    if args.stream_load:
        return run_stream_load(args.stream_load, args.body, args.connections, args.duration)
    if args.load == "auto":
        args.load = "wrk" if shutil.which("wrk") else "python"

    server_prefix, load_prefix = cpu_split()
    body = json.dumps({"model": "bench", "prompt": "The quick brown fox jumps over the lazy dog",
                       "max_tokens": args.max_tokens, "ignore_eos": True})
    stream_body = json.dumps({"model": "bench", "prompt": "The quick brown fox jumps over the lazy dog " * 20,
                              "max_tokens": args.stream_tokens, "ignore_eos": True, "stream": True,
                              "stream_options": {"include_usage": True}})
    zero = ["--ttft-ms", "0", "--itl-ms", "0", "--prefill-ms-per-token", "0", "--jitter", "0",
            "--max-num-seqs", "1024"]
    with tempfile.TemporaryDirectory() as workdir:
        envs = {"new": None, "old": old_simulator(args.old_ref, workdir)}
        results: dict = {}
        for name in ("baseline", "old", "new"):
            results[name] = saturation(name, envs.get(name), body, zero, args, server_prefix, load_prefix)
        streaming: dict = {}
        # (label, the new simulator's flags, the old one's nearest equivalent: it has no profile)
        configs = (("default knobs", [], []),
                   ("profile llama-3.1-8b-h100", ["--profile", "llama-3.1-8b-h100"],
                    ["--ttft-ms", "6", "--itl-ms", "6", "--prefill-ms-per-token", "0.06", "--slowdown-per-seq", "0",
                     "--max-num-seqs", "1024"]))
        for label, new_flags, old_flags in configs:
            for name, flags in (("old", old_flags), ("new", new_flags)):
                streaming[(label, name)] = stream_cost(envs[name], flags, stream_body, args, server_prefix,
                                                      load_prefix)
    report(results, streaming, args, bool(server_prefix))


def sim_argv(port: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "gpufleet.sim", "bench", "--port", str(port), "--log-level", "WARNING", *extra]


def saturation(name: str, env, body: str, zero: list[str], args, server_prefix, load_prefix) -> dict:
    port = free_port()
    baseline = [sys.executable, __file__, "--baseline-server", str(port)]
    argv = baseline if name == "baseline" else sim_argv(port, zero)
    proc = start([*server_prefix, *argv], env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + "/health", proc)
        check = urllib.request.Request(base + "/v1/completions", data=body.encode(),
                                       headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(check, timeout=10) as resp:
            answer = json.loads(resp.read())
        assert answer["object"] == "text_completion", answer
        if name != "baseline":
            assert answer["usage"]["completion_tokens"] == args.max_tokens, answer
        cpu_before = cpu_seconds(proc.pid)
        result = measure(base + "/v1/completions", body, args, load_prefix)
        result["cpu_s"] = cpu_seconds(proc.pid) - cpu_before
        result["cpu_us_per_request"] = result["cpu_s"] / max(result["requests_per_s"] * args.duration, 1) * 1e6
        return result
    finally:
        stop(proc)


def stream_cost(env, extra: list[str], body: str, args, server_prefix, load_prefix) -> dict:
    port = free_port()
    proc = start([*server_prefix, *sim_argv(port, extra)], env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + "/health", proc)
        steps_before, cpu_before = metric_value(base, "vllm:iteration_tokens_total_count"), cpu_seconds(proc.pid)
        out = subprocess.run([*load_prefix, sys.executable, __file__, "--stream-load", base + "/v1/completions",
                              "--body", body, "--connections", str(args.streams), "--duration", str(args.duration)],
                             check=True, capture_output=True, text=True).stdout
        cpu = cpu_seconds(proc.pid) - cpu_before
        steps = metric_value(base, "vllm:iteration_tokens_total_count") - steps_before
        result = json.loads(out.strip().splitlines()[-1])
        result.update(cpu_s=cpu, steps=steps,
                      cpu_us_per_token=cpu / max(result["tokens"], 1) * 1e6,
                      cpu_us_per_step=cpu / steps * 1e6 if steps else None,
                      cpu_share=cpu / result["elapsed_s"], tokens_per_s=result["tokens"] / result["elapsed_s"])
        return result
    finally:
        stop(proc)


def report(results: dict, streaming: dict, args, pinned: bool) -> None:
    sat_ratio = results["new"]["requests_per_s"] / results["baseline"]["requests_per_s"]
    old_ratio = results["new"]["requests_per_s"] / results["old"]["requests_per_s"]
    summary = {"load": args.load, "connections": args.connections, "duration_s": args.duration, "pinned": pinned,
               "max_tokens": args.max_tokens, "old_ref": args.old_ref,
               **{f"{name}_{key}": value for name, r in results.items() for key, value in r.items()},
               "new_over_baseline": round(sat_ratio, 3), "new_over_old": round(old_ratio, 3),
               "streaming": {f"{label}/{name}": r for (label, name), r in streaming.items()}}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"load generator: {args.load}, {args.connections} connections, {args.duration:g} s each, "
          f"server pinned to one core: {'yes' if pinned else 'no'}; old simulator: {args.old_ref}")
    print(f"saturation, non-streamed completions of {args.max_tokens} tokens, all latencies zero:")
    for name in ("baseline", "old", "new"):
        r = results[name]
        extra = f"  p50 {r['p50']}" if r.get("p50") else ""
        print(f"  {name:<10} {r['requests_per_s']:>9.0f} req/s  CPU {r['cpu_us_per_request']:6.0f} us/request  "
              f"errors {r['errors']}{extra}")
    print(f"  new / bare aiohttp = {sat_ratio:.2f}   new / old = {old_ratio:.2f}")
    print(f"streaming: {args.streams} concurrent streams of {args.stream_tokens} tokens, {args.duration:g} s:")
    for label in dict.fromkeys(label for label, _ in streaming):
        old, new = streaming[(label, "old")], streaming[(label, "new")]
        for name, r in (("old", old), ("new", new)):
            step = f"{r['cpu_us_per_step']:>7.0f} us/step over {r['steps']:.0f} steps" if r["cpu_us_per_step"] else ""
            print(f"  {label:<26} {name:<4} {r['tokens_per_s']:>8.0f} tokens/s  CPU {r['cpu_share'] * 100:5.1f} % "
                  f"of a core  {r['cpu_us_per_token']:6.1f} us/token  {step}  errors {r['errors']}")
        print(f"  {label:<26} new/old CPU per token = {new['cpu_us_per_token'] / old['cpu_us_per_token']:.2f}")


if __name__ == "__main__":
    main()
