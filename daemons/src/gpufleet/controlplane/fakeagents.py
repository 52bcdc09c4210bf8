"""Many agents' ``/readyz`` on one port, honest or hostile, for tests and the scale bench.

A real HTTP server on raw asyncio streams (so it can misbehave below HTTP): the path
picks the behaviour, ``GET /<behaviour>/<worker_id>/readyz``; the worker's ``agent_url``
is ``http://127.0.0.1:PORT/<behaviour>/<worker_id>``.

- ``ok``: 200 ``{"status": "ready"}``;
- ``trickle``: the status line one byte every ``TRICKLE_S`` seconds, never finished
  (a worker holding a probe open as long as it likes);
- ``deep``: 503 with a body of thousands of nested ``[`` (``RecursionError`` bait);
- ``garbage``: bytes that are not HTTP, then close;
- ``huge``: 200 with headers far over any parser's limit.

``python -m gpufleet.controlplane.fakeagents PORT`` serves until killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

TRICKLE_S = 1.5
BEHAVIOURS = ("ok", "trickle", "deep", "garbage", "huge")


def _response(status: str, body: bytes, extra: bytes = b"") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n").encode() + extra + b"\r\n" + body


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counts: dict) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        parts = head.split(b" ", 2)
        path = parts[1].decode("latin-1") if len(parts) > 1 else "/"
        behaviour = path.strip("/").split("/", 1)[0]
        counts[behaviour] = counts.get(behaviour, 0) + 1
        if behaviour == "trickle":
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" * 100:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(TRICKLE_S)
        elif behaviour == "deep":
            depth = 50_000
            writer.write(_response("503 Service Unavailable", b"[" * depth + b"]" * depth))
        elif behaviour == "garbage":
            writer.write(b"\x00\xffNOT-HTTP\r\n\x1b[31m\r\n\r\n" * 50)
        elif behaviour == "huge":
            writer.write(_response("200 OK", b"{}", b"X-Filler: " + b"a" * 100_000 + b"\r\n"))
        elif behaviour == "ok":
            writer.write(_response("200 OK", b'{"status":"ready"}'))
        else:
            writer.write(_response("404 Not Found", b'{"reason":"no such fake agent"}'))
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
            asyncio.CancelledError):
        pass  # a cancelled trickle (the server stopping) ends quietly
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def serve(port: int, counts: dict | None = None, host: str = "127.0.0.1") -> asyncio.AbstractServer:
    """Start serving on ``port``; ``counts`` (if given) counts requests per behaviour."""
    tally = counts if counts is not None else {}
    return await asyncio.start_server(lambda r, w: _handle(r, w, tally), host, port, backlog=4096)


def agent_url(port: int, behaviour: str, worker_id: str) -> str:
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"behaviour must be one of {BEHAVIOURS}")
    return f"http://127.0.0.1:{port}/{behaviour}/{worker_id}"


async def _main(port: int) -> None:
    server = await serve(port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1])))
