"""Probing workers' ``GET {agent_url}/readyz``: 200 is ready, anything else is not, with a
short reason.

Workers are untrusted, so every probe is bounded: one overall deadline covers connect,
headers and body (a worker trickling a byte a second is cut at the deadline, not kept
alive by per-read timeouts), the body read is capped, headers are bounded by aiohttp's
parser, and any exception — a malformed answer, nesting that would blow the stack, a bug
— ends as a failed probe of that one worker with its reason. ``probe_many`` runs the
probes concurrently on one asyncio loop and returns by its budget whatever the workers
do: a probe still running then is failed ("no answer within …"), one not yet started is
left out (it goes first next cycle).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp

from gpufleet.common import jsonlimits

MAX_BODY_BYTES = 4096
MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class ProbeRound:
    """The outcome of one ``probe_many``: ``{worker_id: (ok, error)}`` for the workers
    probed, the ids left out for lack of time, and how long it took."""

    results: dict[str, tuple[bool, str | None]]
    skipped: list[str]
    seconds: float


def _clean(text: str) -> str:
    """A reason safe for one log line: printable, short."""
    return "".join(c if c.isprintable() else "?" for c in text)[:MAX_REASON_CHARS].strip()


def reason_from_body(body: bytes) -> str:
    """What a non-200 ``/readyz`` body says went wrong (never raises)."""
    try:
        data = jsonlimits.loads(body)
    except ValueError:
        return _clean(body[:MAX_REASON_CHARS].decode("utf-8", "replace"))
    if isinstance(data, dict):
        for key in ("reason", "failing", "error", "message", "status"):
            if data.get(key):
                value = data[key]
                return _clean(value if isinstance(value, str) else json.dumps(value))
    return _clean(json.dumps(data))


async def probe_one(session: aiohttp.ClientSession, agent_url: str, deadline_s: float) -> tuple[bool, str | None]:
    """One probe, finished (or failed) within ``deadline_s``, never raising."""

    async def attempt():
        async with session.get(agent_url.rstrip("/") + "/readyz", allow_redirects=False) as resp:
            if resp.status == 200:
                return True, None
            body = await resp.content.read(MAX_BODY_BYTES)
            reason = reason_from_body(body)
            return False, f"HTTP {resp.status}" + (f": {reason}" if reason else "")

    try:
        return await asyncio.wait_for(attempt(), deadline_s)
    except asyncio.TimeoutError:
        return False, f"no complete answer within {deadline_s:g}s"
    except aiohttp.ClientError as exc:
        return False, _clean(f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - whatever a worker sends costs only that worker
        return False, _clean(f"probe failed: {type(exc).__name__}: {exc}")


async def _probe_all(targets: dict[str, str], deadline_s: float, concurrency: int,
                     budget_s: float) -> tuple[dict, list[str]]:
    results: dict[str, tuple[bool, str | None]] = {}
    started: set[str] = set()
    gate = asyncio.Semaphore(max(1, concurrency))
    timeout = aiohttp.ClientTimeout(total=deadline_s)
    connector = aiohttp.TCPConnector(limit=max(1, concurrency), force_close=True, ttl_dns_cache=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False,
                                     max_line_size=8190, max_field_size=8190) as session:
        async def run(worker_id: str, url: str):
            async with gate:
                started.add(worker_id)
                results[worker_id] = await probe_one(session, url, deadline_s)

        tasks = {asyncio.ensure_future(run(wid, url)): wid for wid, url in targets.items()}
        _, pending = await asyncio.wait(tasks, timeout=budget_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    skipped = []
    for worker_id in targets:
        if worker_id in results:
            continue
        if worker_id in started:
            results[worker_id] = (False, f"no complete answer within the cycle's probe budget ({budget_s:g}s)")
        else:
            skipped.append(worker_id)
    return results, skipped


def probe_many(targets: dict[str, str], deadline_s: float, concurrency: int = 256,
               budget_s: float | None = None) -> ProbeRound:
    """Probe ``{worker_id: agent_url}`` (in the given order when not all fit), each within
    ``deadline_s``, all within ``budget_s`` (default: ``deadline_s`` plus a margin)."""
    started = time.monotonic()
    if not targets:
        return ProbeRound({}, [], 0.0)
    budget = budget_s if budget_s is not None else deadline_s + 0.5
    results, skipped = asyncio.run(_probe_all(targets, min(deadline_s, budget), concurrency, budget))
    return ProbeRound(results, skipped, time.monotonic() - started)
