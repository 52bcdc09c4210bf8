"""The request path: authenticate, read ``model``/``stream``, pick a worker, forward, fail
over. It only wires the pieces (auth, registry, policy, leases, breaker, retry, upstream);
each decision is made by its own module."""

from __future__ import annotations

import json
import logging
import time
from http import HTTPStatus

from gpufleet.common.openai_errors import error_body

from .auth import KeyCache, KeyUnavailable
from .breaker import Breakers
from .leases import LeaseManager
from .metrics import RouterMetrics
from .policies import Load, Policy
from .ratelimit import RateLimiter
from .registry import Registry, Worker
from .retry import Outcome, RetryPolicy
from .upstream import Attempt, Upstreams, discard, pass_headers

log = logging.getLogger(__name__)

SSE_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
_STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}


class Response:
    """A WSGI answer without a framework around it: status, headers, body (bytes, or an
    iterator for a stream, whose ``close`` gunicorn calls when the client goes away)."""

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

    def __call__(self, environ, start_response):
        start_response(_STATUS_LINES.get(self.status) or f"{self.status} Unknown", self.headers)
        return [self.body] if not self.is_streamed else self.body


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: list | None = None) -> Response:
    body = json.dumps(error_body(status, message, code=code, param=param)).encode()
    return Response(body, status=status, content_type="application/json", headers=headers)


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: list | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or ([("WWW-Authenticate", "Bearer")] if status == 401 else None)

    def response(self) -> Response:
        return error_response(self.status, self.message, self.code, self.param, self.headers)


class Proxy:
    def __init__(self, *, keys: KeyCache, registry: Registry, policy: Policy, leases: LeaseManager,
                 breakers: Breakers, retry: RetryPolicy, upstreams: Upstreams, metrics: RouterMetrics,
                 max_body_bytes: int, limiter: RateLimiter | None = None):
        self.keys = keys
        self.registry = registry
        self.policy = policy
        self.leases = leases
        self.breakers = breakers
        self.retry = retry
        self.upstreams = upstreams
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.limiter = limiter

    # -- pieces of the request path --------------------------------------------------------

    def authenticate(self, environ):
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
                raise RequestError(400, "Invalid Content-Length header.") from None
            if size > self.max_body_bytes:
                raise RequestError(413, f"Request body of {size} bytes is over the limit of "
                                   f"{self.max_body_bytes} bytes.", "request_too_large")
            return stream.read(size)
        body = stream.read(self.max_body_bytes + 1)
        if len(body) > self.max_body_bytes:
            raise RequestError(413, f"Request body is over the limit of {self.max_body_bytes} bytes.",
                               "request_too_large")
        return body

    @staticmethod
    def parse(body: bytes) -> tuple[str, bool]:
        """``model`` and ``stream`` of the request; the body itself is forwarded untouched."""
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "The request body is not valid JSON.", "invalid_json") from None
        if not isinstance(payload, dict):
            raise RequestError(400, "The request body must be a JSON object.", "invalid_json")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError(400, "You must provide a model parameter.", "missing_model", "model")
        return model, bool(payload.get("stream"))

    def candidates(self, model: str, workers: tuple[Worker, ...], tried: set[str]) -> list[Worker]:
        """Workers with a closed breaker; or, when a breaker's cool-down is over, that worker
        alone, as the probe (the next request is the probe)."""
        closed, others = [], []
        for w in workers:
            if w.id in tried:
                continue
            (closed if self.breakers.is_closed(w.id) else others).append(w)
        for w in others:
            if self.breakers.claim_probe(w.id):
                return [w]
        return closed

    def pick(self, candidates: list[Worker]):
        loads = {w.id: Load(0, w.queue_depth) for w in candidates}
        ids = [w.id for w in candidates]
        ordered = self.policy.order(ids, loads)

        def local_choice(counts):
            return self.policy.choose(ids, {w.id: Load(counts.get(w.id, 0), w.queue_depth) for w in candidates})

        lease, _ = self.leases.acquire(ordered, local_choice)
        worker = next(w for w in candidates if w.id == lease.worker_id)
        return worker, lease

    # -- the request -----------------------------------------------------------------------

    def handle(self, environ, path: str) -> Response:
        started = time.perf_counter()
        model_label = ""
        self.metrics.inflight.inc()
        streaming_handed_off = False
        try:
            key = self.authenticate(environ)
            if key.rpm > 0 and self.limiter is not None:
                wait = self.limiter.check(key.key_id or key.name, key.rpm)
                if wait is not None:
                    raise RequestError(429, f"Rate limit of {key.rpm} requests per minute reached for this API "
                                       f"key; retry in {wait:.0f} s.", "rate_limit_exceeded",
                                       headers=[("Retry-After", str(int(wait + 0.999)))])
            body = self.read_body(environ)
            model, stream = self.parse(body)
            if not key.allows(model):
                raise RequestError(403, f"This API key may not use the model '{model}'.", "model_not_allowed", "model")
            workers = self.registry.workers(model)
            if not workers:
                if model in self.registry.known_models:
                    model_label = model
                    raise RequestError(503, f"No worker can serve the model '{model}' right now; retry shortly.",
                                       "no_routable_worker")
                raise RequestError(404, f"The model '{model}' does not exist.", "model_not_found", "model")
            model_label = model
            response = self.forward(environ, path, body, model, stream, workers, started)
            streaming_handed_off = stream and response.is_streamed
            return response
        except RequestError as err:
            self.metrics.count_request(model_label, err.status, "")
            return err.response()
        finally:
            if not streaming_handed_off:
                self.metrics.inflight.dec()
                if model_label:
                    self.metrics.observe_latency(model_label, time.perf_counter() - started)

    def forward(self, environ, path: str, body: bytes, model: str, stream: bool,
                workers: tuple[Worker, ...], started: float) -> Response:
        self.retry.budget.deposit()
        tried: set[str] = set()
        attempts = 0
        last: Attempt | None = None
        while True:
            candidates = self.candidates(model, workers, tried)
            if not candidates:
                break
            worker, lease = self.pick(candidates)
            attempts += 1
            attempt = self.upstreams.send(worker.url, path, body)
            resp = attempt.response
            first = None
            if attempt.outcome in (Outcome.OK, Outcome.CLIENT_ERROR):
                try:
                    if stream and attempt.outcome is Outcome.OK:
                        resp.set_timeout(self.upstreams.read_timeout_s)
                        chunks = resp.iter_chunks()
                        first = next(chunks, None)
                        if first is None:
                            attempt = Attempt(Outcome.RESET, resp, "the stream ended before its first byte")
                        else:
                            self.metrics.observe_ttft(model, time.perf_counter() - started)
                    else:
                        data = resp.read()
                        if attempt.outcome is Outcome.OK:
                            self.metrics.observe_ttft(model, time.perf_counter() - started)
                except Exception as exc:  # noqa: BLE001 - a broken upstream is an outcome, not a crash
                    timed_out = isinstance(exc, TimeoutError)
                    attempt = Attempt(Outcome.TIMEOUT if timed_out else Outcome.RESET, resp, str(exc))
            outcome = attempt.outcome
            self.metrics.count_attempt(worker.id, outcome.value)
            if outcome is Outcome.OK:
                self.breakers.success(worker.id)
                if stream:
                    return self.stream_response(resp, chunks, first, lease, worker, model, started)
                headers = pass_headers(resp)
                discard(resp, reuse=True)
                self.leases.release(lease)
                self.metrics.count_request(model, resp.status, worker.id)
                return Response(data, status=resp.status, headers=headers)
            if outcome is Outcome.CLIENT_ERROR:
                # the request's own fault: passed through as is, and the worker is fine
                self.breakers.success(worker.id)
                headers = pass_headers(resp)
                discard(resp, reuse=True)
                self.leases.release(lease)
                self.metrics.count_request(model, resp.status, worker.id)
                return Response(data, status=resp.status, headers=headers)
            # connect error, timeout, reset or 5xx: the worker's fault
            if outcome is Outcome.SERVER_ERROR:
                attempt.error = f"HTTP {resp.status}"
            discard(resp, reuse=outcome is Outcome.SERVER_ERROR)
            self.leases.release(lease)
            self.breakers.failure(worker.id)
            tried.add(worker.id)
            last = attempt
            log.debug("attempt %d on %s failed: %s %s", attempts, worker.id, outcome.value, attempt.error)
            if not self.retry.should_retry(outcome, attempts, streamed_to_client=False):
                if outcome.retryable and attempts <= self.retry.retries:
                    self.metrics.budget_exhausted.inc()
                break
            self.metrics.retries.labels(outcome.value).inc()
        if last is None:
            raise RequestError(503, f"Every worker of '{model}' is failing (circuit breakers open); retry shortly.",
                               "no_healthy_worker")
        if last.outcome is Outcome.TIMEOUT:
            raise RequestError(504, f"The upstream worker timed out after {attempts} attempt(s).", "upstream_timeout")
        raise RequestError(502, f"The upstream worker failed after {attempts} attempt(s): {last.error}",
                           "upstream_error")

    def stream_response(self, resp, chunks, first: bytes, lease, worker: Worker, model: str,
                        started: float) -> Response:
        metrics, leases, breakers = self.metrics, self.leases, self.breakers

        def relay():
            finished = False
            try:
                yield first
                yield from chunks
                finished = True
            except GeneratorExit:
                # the client went away: closing the upstream connection cancels the request there
                metrics.client_disconnects.inc()
                raise
            except Exception as exc:  # noqa: BLE001 - output has started: end the stream cleanly
                log.warning("stream from %s broke after output had started: %s", worker.id, exc)
                breakers.failure(worker.id)
                metrics.stream_errors.inc()
                err = error_body(502, f"The upstream worker failed mid-stream: {exc}", code="upstream_error")
                yield b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n"
            finally:
                discard(resp, reuse=finished)
                leases.release(lease)
                metrics.inflight.dec()
                metrics.count_request(model, resp.status, worker.id)
                metrics.observe_latency(model, time.perf_counter() - started)

        headers = pass_headers(resp)
        names = {k.lower() for k, _ in headers}
        headers += [h for h in SSE_HEADERS if h[0].lower() not in names]
        return Response(relay(), status=resp.status, headers=headers)
