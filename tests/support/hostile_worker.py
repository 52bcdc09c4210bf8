#!/usr/bin/env python3
"""A hostile (or, on request, perfectly healthy) vLLM worker for the router's tests.

A real separate process speaking raw HTTP/1.1 over sockets, so it can answer what no
well-behaved server library would let it: malformed heads and framing, trickled bytes,
resets mid-body, huge bodies, silence. It stands where a worker's vLLM stands: the router
is pointed at it by publishing its URL as a worker (see ``HostileWorker.publish``).

What it does with a request is its *mode*:

- per request: a ``hostile:<mode>`` token anywhere in the request body (e.g. in the prompt,
  which the router forwards untouched) wins;
- otherwise the server's default mode, set with ``--mode`` or ``POST /hostile/mode``.

Per connection, like uvicorn (vLLM's server), it closes a kept-alive connection that has
been idle for ``--idle-close-ms`` (default 5000, uvicorn's default).

It records every inference request it received (``GET /hostile/requests``): its path,
headers (e.g. ``x-request-id``), mode, whether the answer was completed, and when the
client closed the connection before the answer ended (``client_closed_after_s``, measured
from the arrival of the request), so tests can assert that the router cancelled it.

Run: ``python tests/support/hostile_worker.py --port 9000 [--mode ok] [--idle-close-ms 5000]``.
"""

from __future__ import annotations

import argparse
import json
import re
import select
import socket
import socketserver
import struct
import threading
import time

MODES = (
    "ok",                    # a correct OpenAI answer (streamed when the request asks for it)
    "bad_content_length",    # Content-Length: ² (a Unicode digit that int() accepts)
    "control_char_header",   # a header value holding a control character
    "two_digit_status",      # HTTP/1.1 20 OK
    "many_headers",          # 250 header lines, then a correct answer
    "duplicate_content_length",  # two differing Content-Length headers
    "chunk_negative",        # chunked, a chunk size of -1
    "chunk_underscore",      # chunked, a chunk size of 1_0 (int(..., 16) accepts it)
    "connection_listed",     # a correct answer whose Connection header names X-Hop-Secret
    "trickle",               # a correct answer sent a few bytes at a time over about a second
    "drip",                  # a correct answer one byte every DRIP_S: each read is quick, the whole takes minutes
    "reset_mid_body",        # half the announced body, then a TCP reset
    "huge",                  # a 300 MiB non-streamed answer, generated as it is sent
    "hang",                  # read the request, never answer (until the client goes away)
    "close",                 # read the request, close the connection without an answer
    "error_400",             # vLLM's 400 with an OpenAI error body (the request's fault)
    "error_500",             # a 500 with an OpenAI error body
)
HUGE_BYTES = 300 * 1024 * 1024
DRIP_S = 0.5
_MODE_IN_BODY = re.compile(rb"hostile:([a-z0-9_]+)")
_MAX_HEAD = 65536


class State:
    def __init__(self, mode: str, idle_close_ms: int, delay_ms: int, model: str):
        self.lock = threading.Lock()
        self.mode = mode
        self.idle_close_ms = idle_close_ms
        self.delay_ms = delay_ms
        self.model = model
        self.records: list[dict] = []
        self.connections = 0

    def record(self, **fields) -> dict:
        with self.lock:
            rec = {"seq": len(self.records), **fields}
            self.records.append(rec)
            return rec


# -- answers ---------------------------------------------------------------------------------

def _completion(path: str, model: str, n: int) -> dict:
    now = int(time.time())
    text = " ".join(f"word{i}" for i in range(n))
    usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
    if path.endswith("/chat/completions"):
        return {"id": f"chatcmpl-hostile{now}", "object": "chat.completion", "created": now, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "length"}], "usage": usage}
    return {"id": f"cmpl-hostile{now}", "object": "text_completion", "created": now, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}], "usage": usage}


def _sse_events(path: str, model: str, n: int, usage: bool) -> list[bytes]:
    now = int(time.time())
    chat = path.endswith("/chat/completions")
    obj = "chat.completion.chunk" if chat else "text_completion"
    cid = f"{'chatcmpl' if chat else 'cmpl'}-hostile{now}"

    def event(choice: dict | None, extra: dict | None = None) -> bytes:
        payload = {"id": cid, "object": obj, "created": now, "model": model,
                   "choices": [choice] if choice else [], **(extra or {})}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    events = []
    if chat:
        events.append(event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}))
    for i in range(n):
        last = i == n - 1
        piece = f"word{i} "
        choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": "length" if last else None}
                  if chat else {"index": 0, "text": piece, "finish_reason": "length" if last else None})
        events.append(event(choice))
    if usage:
        events.append(event(None, {"usage": {"prompt_tokens": 5, "completion_tokens": n,
                                             "total_tokens": 5 + n}}))
    events.append(b"data: [DONE]\n\n")
    return events


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _head(status: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status}".encode()]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _json_answer(status: str, payload: dict, extra: list[tuple[str, str]] = ()) -> bytes:
    body = json.dumps(payload).encode()
    return _head(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                          *extra]) + body


def _error(status: int, message: str) -> bytes:
    phrase = {400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}[status]
    body = {"error": {"message": message, "type": "BadRequestError" if status == 400 else "InternalServerError",
                      "param": None, "code": status}}
    return _json_answer(f"{status} {phrase}", body)


class ClientGone(Exception):
    pass


# -- the connection handler ------------------------------------------------------------------

class Handler(socketserver.BaseRequestHandler):
    state: State  # set on the class by main()

    def setup(self):
        self.sock: socket.socket = self.request
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        with self.state.lock:
            self.state.connections += 1
            self.conn_id = self.state.connections

    # reading -----------------------------------------------------------------------------
    def _fill(self, timeout: float | None) -> bool:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise
        except OSError:
            return False
        if not data:
            return False
        self.buf += data
        return True

    def _read_request(self, idle_timeout: float | None):
        """(method, path, headers, body), or None when the connection ended or idled out."""
        first = True
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > _MAX_HEAD:
                return None
            try:
                if not self._fill(idle_timeout if first and not self.buf else 30):
                    return None
            except TimeoutError:
                return None  # idle: close it, as uvicorn does
            first = False
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        while len(self.buf) < length:
            if not self._fill(30):
                return None
        body, self.buf = self.buf[:length], self.buf[length:]
        return method, path, headers, body

    def _client_closed(self, wait: float) -> bool:
        """Whether the client closed (or reset) the connection within ``wait`` seconds."""
        readable, _, _ = select.select([self.sock], [], [], wait)
        if not readable:
            return False
        try:
            data = self.sock.recv(65536, socket.MSG_PEEK)
        except OSError:
            return True
        if not data:
            return True
        time.sleep(min(wait, 0.05))  # pipelined bytes: not a close
        return False

    # writing -----------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ClientGone(str(exc)) from None

    def _reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    # the loop ----------------------------------------------------------------------------
    def handle(self):
        idle = None  # the first request of a connection may take its time
        while True:
            req = self._read_request(idle)
            if req is None:
                return
            method, path, headers, body = req
            if path.startswith("/hostile/"):
                self._send(self._control(method, path, body))
                return
            if method == "GET" and path == "/info":
                try:
                    self._agent_info()
                except ClientGone:
                    return
            elif method == "GET":
                self._send(self._get(path))
            else:
                keep = self._inference(path, headers, body)
                if not keep:
                    return
            if headers.get("connection", "").lower() == "close":
                return
            idle = self.state.idle_close_ms / 1000.0

    def _get(self, path: str) -> bytes:
        if path in ("/health", "/readyz"):  # vLLM's health, and an agent's readiness (as its agent_url)
            return _head("200 OK", [("Content-Length", "0")])
        if path == "/v1/models":
            return _json_answer("200 OK", {"object": "list", "data": [
                {"id": self.state.model, "object": "model", "created": 0, "owned_by": "hostile"}]})
        return _error(404, f"no route {path}")

    def _agent_info(self) -> None:
        """``GET /info`` as an agent that has drained (nothing in flight), in the default
        mode: ``drip`` and ``hang`` as for inference, at once otherwise."""
        answer = _json_answer("200 OK", {"draining": True, "inflight": 0})
        if self.state.mode == "drip":
            self._drip(answer)
        elif self.state.mode == "hang":
            while not self._client_closed(1.0):
                pass
        else:
            self._send(answer)

    def _drip(self, data: bytes) -> None:
        for i in range(len(data)):
            self._send(data[i:i + 1])
            time.sleep(DRIP_S)

    def _control(self, method: str, path: str, body: bytes) -> bytes:
        st = self.state
        close = [("Connection", "close")]
        if path == "/hostile/requests":
            with st.lock:
                return _json_answer("200 OK", {"requests": list(st.records), "connections": st.connections},
                                    close)
        if path == "/hostile/reset" and method == "POST":
            with st.lock:
                st.records.clear()
            return _json_answer("200 OK", {"ok": True}, close)
        if path == "/hostile/mode" and method == "POST":
            payload = json.loads(body or b"{}")
            mode = payload.get("mode", st.mode)
            if mode not in MODES:
                return _json_answer("400 Bad Request", {"error": f"unknown mode {mode!r}; one of {MODES}"}, close)
            with st.lock:
                st.mode = mode
                st.idle_close_ms = int(payload.get("idle_close_ms", st.idle_close_ms))
                st.delay_ms = int(payload.get("delay_ms", st.delay_ms))
            return _json_answer("200 OK", {"mode": st.mode, "idle_close_ms": st.idle_close_ms,
                                           "delay_ms": st.delay_ms}, close)
        return _json_answer("404 Not Found", {"error": f"no control route {path}"}, close)

    def _inference(self, path: str, headers: dict, body: bytes) -> bool:
        """Answer one request in its mode; False when the connection must not be reused."""
        st = self.state
        found = _MODE_IN_BODY.search(body)
        mode = found.group(1).decode() if found else st.mode
        try:
            payload = json.loads(body)
        except ValueError:
            payload = {}
        stream = bool(payload.get("stream"))
        usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        n = max(1, min(int(payload.get("max_tokens") or 8), 64))
        started = time.monotonic()
        rec = st.record(path=path, headers=headers, mode=mode, stream=stream, connection=self.conn_id,
                        completed=False, client_closed_after_s=None)
        try:
            keep = self._answer(mode, path, stream, usage, n)
            rec["completed"] = True
            return keep
        except ClientGone:
            rec["client_closed_after_s"] = round(time.monotonic() - started, 3)
            return False

    def _answer(self, mode: str, path: str, stream: bool, usage: bool, n: int) -> bool:
        model = self.state.model
        delayed = self.state.delay_ms and mode in ("ok", "trickle", "connection_listed")
        if delayed and self._client_closed(self.state.delay_ms / 1000.0):
            raise ClientGone("client closed while the answer was being prepared")
        if mode == "ok":
            self._send(self._ok(path, model, stream, usage, n))
            return True
        if mode == "connection_listed":
            self._send(self._ok(path, model, stream, usage, n,
                                extra=[("Connection", "keep-alive, X-Hop-Secret"), ("X-Hop-Secret", "s3cret")]))
            return True
        if mode == "trickle":
            data = self._ok(path, model, stream, usage, n)
            step = max(1, len(data) // 40)
            for i in range(0, len(data), step):
                self._send(data[i:i + step])
                time.sleep(0.025)
            return True
        if mode == "drip":
            self._drip(self._ok(path, model, stream, usage, n))
            return True
        if mode == "many_headers":
            filler = [(f"X-Filler-{i}", "x") for i in range(250)]
            self._send(self._ok(path, model, False, False, n, extra=filler))
            return True
        body = json.dumps(_completion(path, model, n)).encode()
        if mode == "bad_content_length":
            self._send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: \xb2\r\n\r\n" + body)
            return self._linger()
        if mode == "control_char_header":
            self._send(_head("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                        ("X-Debug", "a\x01b")]) + body)
            return True
        if mode == "two_digit_status":
            self._send(_head("20 OK", [("Content-Type", "application/json"),
                                       ("Content-Length", str(len(body)))]) + body)
            return self._linger()
        if mode == "duplicate_content_length":
            # as long as the second one says: a client where the last wins passes on junk, one
            # where the first wins reads the junk as the start of the next answer
            self._send(_head("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                        ("Content-Length", str(len(body) + 7))]) + body + b"garbage")
            return self._linger()
        if mode in ("chunk_negative", "chunk_underscore"):
            size = b"-1" if mode == "chunk_negative" else b"1_0"
            piece = body[:16]
            framed = size + b"\r\n" + piece + b"\r\n" + _chunk(body[16:]) + b"0\r\n\r\n"
            self._send(_head("200 OK", [("Content-Type", "application/json"),
                                        ("Transfer-Encoding", "chunked")]) + framed)
            return self._linger()
        if mode == "reset_mid_body":
            self._send(_head("200 OK", [("Content-Type", "application/json"),
                                        ("Content-Length", str(len(body)))]) + body[:len(body) // 2])
            time.sleep(0.05)
            self._reset()
            return False
        if mode == "huge":
            self._send_huge(path, model)
            return True
        if mode == "hang":
            while not self._client_closed(1.0):
                pass
            raise ClientGone("client closed a request that was never answered")
        if mode == "close":
            return False
        if mode == "error_400":
            self._send(_error(400, "This model's maximum context length is 512 tokens (hostile 400)."))
            return True
        if mode == "error_500":
            self._send(_error(500, "hostile 500"))
            return True
        self._send(_error(400, f"hostile worker: unknown mode {mode!r}; one of {', '.join(MODES)}"))
        return True

    def _ok(self, path, model, stream, usage, n, extra=()) -> bytes:
        if stream:
            data = b"".join(_chunk(e) for e in _sse_events(path, model, n, usage)) + b"0\r\n\r\n"
            return _head("200 OK", [("Content-Type", "text/event-stream; charset=utf-8"),
                                    ("Transfer-Encoding", "chunked"), *extra]) + data
        return _json_answer("200 OK", _completion(path, model, n), list(extra))

    def _linger(self) -> bool:
        """After a malformed answer: keep the connection open until the client closes it
        (a lenient client would wait for the rest of the body), at most a minute."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self._client_closed(0.5):
            pass
        return False

    def _send_huge(self, path: str, model: str) -> None:
        head = json.dumps(_completion(path, model, 1)).encode()
        prefix, suffix = head[:-1] + b', "padding": "', b'"}'
        filler = b"x" * (1024 * 1024)
        pad = HUGE_BYTES - len(prefix) - len(suffix)
        self._send(_head("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(HUGE_BYTES))])
                   + prefix)
        while pad > 0:
            piece = filler if pad >= len(filler) else filler[:pad]
            self._send(piece)
            pad -= len(piece)
        self._send(suffix)


# -- the tests' side -------------------------------------------------------------------------

class HostileWorker:
    """Start one as a daemon of a test (``daemons`` is the tests' process starter) and
    drive it: ``mode()``, ``requests()``, ``reset()``; publish ``url`` as a worker's."""

    def __init__(self, daemons, worker_id: str, *args: str, model: str = "test-model"):
        import sys

        from .procs import wait_http
        self.id = worker_id
        self.port = daemons.port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.daemon = daemons.start(f"hostile-{worker_id}", [sys.executable, __file__, "--port", str(self.port),
                                                             "--model", model, *args])
        wait_http(self.url + "/health", timeout=20, proc=self.daemon)

    def _post(self, path: str, payload: dict) -> dict:
        import requests
        resp = requests.post(self.url + path, json=payload, timeout=10)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def mode(self, mode: str | None = None, **settings) -> dict:
        """Set the default mode and/or ``idle_close_ms``, ``delay_ms``."""
        return self._post("/hostile/mode", {**({"mode": mode} if mode else {}), **settings})

    def reset(self) -> None:
        self._post("/hostile/reset", {})

    def requests(self) -> list[dict]:
        import requests
        return requests.get(self.url + "/hostile/requests", timeout=10).json()["requests"]

    def connections(self) -> int:
        import requests
        return requests.get(self.url + "/hostile/requests", timeout=10).json()["connections"]


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", default="ok", choices=MODES)
    parser.add_argument("--idle-close-ms", type=int, default=5000,
                        help="close a kept-alive connection idle this long (uvicorn's default: 5000)")
    parser.add_argument("--delay-ms", type=int, default=0, help="wait this long before a correct answer")
    parser.add_argument("--model", default="test-model")
    args = parser.parse_args(argv)
    Handler.state = State(args.mode, args.idle_close_ms, args.delay_ms, args.model)
    with Server((args.host, args.port), Handler) as server:
        print(f"hostile worker on {args.host}:{args.port}, mode {args.mode}", flush=True)
        server.serve_forever(poll_interval=0.5)


if __name__ == "__main__":
    main()
