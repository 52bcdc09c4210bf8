"""The proxied request as a WSGI application: admission → attempts → respond, each in its
own module, around one :class:`~gpufleet.router.exchange.Exchange` that is closed exactly
once on every path (see there)."""

from __future__ import annotations

import logging

from .admission import Admission, request_id
from .attempts import Attempts
from .exchange import Exchange, Ledger
from .respond import RequestError, Response, buffered, error_response, status_line, streamed

log = logging.getLogger(__name__)


class _Body:
    """The answer's body for gunicorn, whose ``close`` (called however the write ends)
    closes the relay, then the exchange."""

    __slots__ = ("_parts", "_exchange")

    def __init__(self, parts, exchange: Exchange):
        self._parts, self._exchange = parts, exchange

    def __iter__(self):
        return iter(self._parts)

    def close(self):
        try:
            close = getattr(self._parts, "close", None)
            if close is not None:
                close()
        finally:
            self._exchange.close()


class Proxy:
    def __init__(self, admission: Admission, attempts: Attempts, ledger: Ledger):
        self.admission = admission
        self.attempts = attempts
        self.ledger = ledger

    def __call__(self, environ, start_response):
        exchange = Exchange(self.ledger, request_id(environ))
        try:
            response = self.answer(environ, exchange)
            exchange.status = response.status
            response.headers.append(("X-Request-Id", exchange.request_id))
            start_response(status_line(response.status), response.headers)
            if not response.is_streamed:
                exchange.close()  # the worker is done: free its lease before the client has read
            return _Body(response.body if response.is_streamed else (response.body,), exchange)
        except BaseException:
            exchange.close()
            raise

    def answer(self, environ, exchange: Exchange) -> Response:
        try:
            exchange.watch_client(environ)
            req = self.admission.admit(environ, environ.get("PATH_INFO") or "", exchange)
            answer = self.attempts.run(req, exchange)
            exchange.unwatch_client()
            if answer.chunks is not None:
                return streamed(exchange, answer.status, answer.headers, answer.first, answer.chunks)
            return buffered(answer.status, answer.headers, answer.body)
        except RequestError as err:
            exchange.worker_id = ""
            if err.status >= 500:
                log.warning("request %s: %d %s", exchange.request_id, err.status, err.message)
            return err.response()
        except Exception:  # a bug must still answer, in OpenAI's shape, and release everything
            log.exception("request %s failed", exchange.request_id)
            exchange.worker_id = ""
            return error_response(500, "The router failed to handle this request.", "internal_error")
