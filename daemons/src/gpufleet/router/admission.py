"""The first step of a proxied request: who asks (API key, rate limit), what (the body,
bounded; ``model`` and ``stream`` read from it), and which workers could serve it.
Every refusal is a :class:`~gpufleet.router.respond.RequestError`."""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import time
from dataclasses import dataclass

from .auth import ApiKey, KeyCache, KeyUnavailable
from .ratelimit import RateLimiter
from .registry import Registry, Worker
from .respond import RequestError

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_DRAIN_CHUNK = 65536


def request_id(environ) -> str:
    """The client's ``X-Request-Id`` when it is a sane token (it goes into logs and to the
    workers), else a new one: 32 hex digits, a random per-process prefix and a counter
    (unique without a system call per request)."""
    presented = environ.get("HTTP_X_REQUEST_ID")
    if presented and _SANE_REQUEST_ID.fullmatch(presented):
        return presented
    return _ids.next()


class _RequestIds:
    def __init__(self):
        self.reset()
        os.register_at_fork(after_in_child=self.reset)  # gunicorn's workers: a prefix each

    def reset(self) -> None:
        self._prefix = secrets.token_hex(10)
        self._count = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._count):012x}"


_ids = _RequestIds()


@dataclass(frozen=True)
class Admitted:
    path: str
    body: bytes
    model: str
    stream: bool
    workers: tuple[Worker, ...]
    payload: dict | None = None  # the parsed body (read by the cache-aware policy only)


class Admission:
    def __init__(self, keys: KeyCache, registry: Registry, max_body_bytes: int, limiter: RateLimiter | None = None,
                 drain_max_bytes: int = 128 * 1024 * 1024, drain_max_s: float = 10.0):
        self.keys = keys
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.limiter = limiter
        self.drain_max_bytes = drain_max_bytes
        self.drain_max_s = drain_max_s

    def admit(self, environ, path: str, exchange) -> Admitted:
        key = self.authenticate(environ)
        exchange.key_name = key.name
        if key.rpm > 0 and self.limiter is not None:
            wait = self.limiter.check(key.key_id or key.name, key.rpm)
            if wait is not None:
                raise RequestError(429, f"Rate limit of {key.rpm} requests per minute reached for this API "
                                   f"key; retry in {wait:.0f} s.", "rate_limit_exceeded",
                                   headers=[("Retry-After", str(int(wait + 0.999)))])
        body = self.read_body(environ)
        payload = parse(body)
        model, stream = payload["model"], bool(payload.get("stream"))
        if not key.allows(model):
            raise RequestError(403, f"This API key may not use the model '{model}'.", "model_not_allowed", "model")
        workers = self.registry.workers(model)
        if not workers:
            if model in self.registry.known_models:
                exchange.model = model
                raise RequestError(503, f"No worker can serve the model '{model}' right now; retry shortly.",
                                   "no_routable_worker")
            raise RequestError(404, f"The model '{model}' does not exist.", "model_not_found", "model")
        exchange.model = model
        return Admitted(path, body, model, stream, workers, payload)

    def authenticate(self, environ) -> ApiKey:
        header = environ.get("HTTP_AUTHORIZATION") or ""
        scheme, _, presented = header.partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise RequestError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.",
                               "missing_api_key")
        try:
            key = self.keys.check(presented)
        except KeyUnavailable:
            raise RequestError(503, "The API key cannot be verified right now; retry shortly.",
                               "key_store_unavailable") from None
        if key is None:
            raise RequestError(401, "Incorrect API key provided.", "invalid_api_key")
        return key

    def read_body(self, environ) -> bytes:
        length = environ.get("CONTENT_LENGTH")
        stream = environ["wsgi.input"]
        if length:
            try:
                size = int(length)
            except ValueError:
                raise RequestError(400, "Invalid Content-Length header.", "invalid_content_length") from None
            if size > self.max_body_bytes:
                self._refuse_large(stream, f"Request body of {size} bytes is over the limit of "
                                   f"{self.max_body_bytes} bytes.")
            return stream.read(size)
        body = stream.read(self.max_body_bytes + 1)
        if len(body) > self.max_body_bytes:
            self._refuse_large(stream, f"Request body is over the limit of {self.max_body_bytes} bytes.")
        return body

    def _refuse_large(self, stream, message: str):
        """413 — after reading the rest of the body (up to a bound of bytes and time), as
        nginx does: a client that sends its whole body before reading (no ``Expect``) would
        otherwise get a connection reset instead of the answer."""
        drained, deadline = 0, time.monotonic() + self.drain_max_s
        complete = False
        while drained < self.drain_max_bytes and time.monotonic() < deadline:
            try:
                data = stream.read(_DRAIN_CHUNK)
            except (OSError, ValueError):
                break
            if not data:
                complete = True
                break
            drained += len(data)
        headers = None if complete else [("Connection", "close")]
        raise RequestError(413, message, "request_too_large", headers=headers)


def parse(body: bytes) -> dict:
    """The request as a JSON object with a ``model``; the body itself is forwarded untouched."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "The request body is not valid JSON.", "invalid_json") from None
    except RecursionError:
        raise RequestError(400, "The request body's JSON is nested too deeply.", "invalid_json") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "The request body must be a JSON object.", "invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "You must provide a model parameter.", "missing_model", "model")
    return payload
