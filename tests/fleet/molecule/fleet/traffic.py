#!/usr/bin/env python3
"""Steady client traffic through the router while the fleet scenario rolls the workers.

A bounded loop: CONCURRENCY threads send small chat completions at about RATE requests
per second in all, until STOP_FILE appears or MAX_SECONDS pass, then write the figures
(sent, ok, failed, failures by reason, latency percentiles, duration) as JSON to OUT.
Standard library only, so it runs with any Python 3 on the controller.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True, help="router base URL, e.g. http://10.88.0.5:8002")
    p.add_argument("--key", required=True, help="API key (read from the file when it starts with @)")
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rate", type=float, default=25.0, help="requests per second, all threads together")
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    key = a.key
    if key.startswith("@"):
        with open(key[1:], encoding="utf-8") as handle:
            key = handle.read().strip()

    lock = threading.Lock()
    stats = {"sent": 0, "ok": 0, "failed": 0, "failures": {}, "streamed": 0}
    latencies: list[float] = []
    start = time.monotonic()
    deadline = start + a.max_seconds
    interval = a.concurrency / a.rate if a.rate > 0 else 0.0

    def stopped() -> bool:
        return time.monotonic() >= deadline or os.path.exists(a.stop_file)

    def one(n: int) -> None:
        stream = n % 5 == 0  # every fifth request streams (SSE)
        body = json.dumps({"model": a.model, "max_tokens": 8, "stream": stream,
                           "messages": [{"role": "user", "content": f"request {n}: say hello"}]}).encode()
        req = urllib.request.Request(f"{a.url}/v1/chat/completions", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/json"})
        t0 = time.monotonic()
        reason = None
        try:
            with urllib.request.urlopen(req, timeout=a.timeout) as resp:
                data = resp.read()
                if stream:
                    if b"data: [DONE]" not in data:
                        reason = "stream without [DONE]"
                else:
                    answer = json.loads(data)
                    if not answer.get("choices"):
                        reason = "answer without choices"
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
        except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, reset, timeout, cut short, bad JSON
            reason = type(exc).__name__
        elapsed = time.monotonic() - t0
        with lock:
            stats["sent"] += 1
            if reason is None:
                stats["ok"] += 1
                stats["streamed"] += stream
                latencies.append(elapsed)
            else:
                stats["failed"] += 1
                stats["failures"][reason] = stats["failures"].get(reason, 0) + 1

    counter = iter(range(10**9))

    def worker() -> None:
        while not stopped():
            t0 = time.monotonic()
            with lock:
                n = next(counter)
            one(n)
            pause = interval - (time.monotonic() - t0)
            if pause > 0:
                time.sleep(pause)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(a.max_seconds + a.timeout + 5)
    duration = time.monotonic() - start
    latencies.sort()

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1) if latencies else 0.0

    stats.update({"duration_s": round(duration, 1), "req_per_s": round(stats["sent"] / duration, 1),
                  "p50_ms": pct(0.50), "p95_ms": pct(0.95), "max_ms": pct(1.0)})
    with open(a.out, "w") as handle:
        json.dump(stats, handle)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
