"""The third step of a proxied request: the answer the client gets. A worker's answer is
relayed as is (buffered, or SSE chunk by chunk); every error goes out in OpenAI's body
(:mod:`gpufleet.common.openai_errors`)."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from gpufleet.common.openai_errors import error_body

from .metrics import StreamNotes

log = logging.getLogger(__name__)

SSE_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
_STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}
_STATUS_LINES[499] = "499 Client Closed Request"  # nginx's name; only logs and metrics ever see it


def status_line(status: int) -> str:
    return _STATUS_LINES.get(status) or f"{status} Unknown"


class Response:
    """A WSGI answer without a framework around it: status, headers, body (bytes, or an
    iterator for a stream)."""

    __slots__ = ("status", "headers", "body", "is_streamed")

    def __init__(self, body, status: int = 200, headers: list | None = None, content_type: str | None = None):
        self.status = status
        self.headers = list(headers or ())
        self.is_streamed = not isinstance(body, bytes)
        if content_type and not any(k.lower() == "content-type" for k, _ in self.headers):
            self.headers.append(("Content-Type", content_type))
        if not self.is_streamed:
            self.headers.append(("Content-Length", str(len(body))))
        self.body = body


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: list | None = None) -> Response:
    headers = list(headers or ())
    if status == 503 and not any(k.lower() == "retry-after" for k, _ in headers):
        headers.append(("Retry-After", "1"))
    body = json.dumps(error_body(status, message, code=code, param=param)).encode()
    return Response(body, status=status, content_type="application/json", headers=headers)


class RequestError(Exception):
    """A request that ends with an error answer, raised by any step."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: list | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or ([("WWW-Authenticate", "Bearer")] if status == 401 else None)

    def response(self) -> Response:
        return error_response(self.status, self.message, self.code, self.param, self.headers)


def buffered(status: int, headers: list, data: bytes) -> Response:
    return Response(data, status=status, headers=headers)


def streamed(exchange, status: int, headers: list, first: bytes, chunks) -> Response:
    """An SSE relay: the first event (already read), then each chunk as it arrives. Once
    output has started, a broken upstream ends the stream with an SSE error event and
    ``[DONE]``, so the client never hangs. The lease and the connection are the exchange's:
    it releases them however the relay ends (:meth:`Exchange.close`)."""

    notes = StreamNotes(exchange)

    def relay():
        try:
            notes.note(first)
            yield first
            for chunk in chunks:
                notes.note(chunk)
                yield chunk
        except GeneratorExit:
            exchange.client_left()  # closing the upstream connection cancels the request there
            raise
        except Exception as exc:  # noqa: BLE001 - output has started: end the stream cleanly
            log.warning("request %s: stream from %s broke after output had started: %s", exchange.request_id,
                        exchange.worker_id, exc)
            exchange.stream_broke()
            err = error_body(502, f"The upstream worker failed mid-stream: {exc}", code="upstream_error")
            yield b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n"

    names = {k.lower() for k, _ in headers}
    headers = headers + [h for h in SSE_HEADERS if h[0].lower() not in names]
    return Response(relay(), status=status, headers=headers)
