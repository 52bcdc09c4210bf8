"""The second step of a proxied request: send it to workers until one answers, or give up.

:class:`Attempts` owns the loop: the candidates (breakers closed, or one probe due), the
lease on the one the policy picks, the send, the outcome, and the bookkeeping (breaker,
retry count and budget, metrics). It returns a live :class:`Answer` whose lease and
connection the :class:`~gpufleet.router.exchange.Exchange` holds, or raises the
:class:`~gpufleet.router.respond.RequestError` the client gets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .admission import Admitted
from .affinity import AffinityRouter, Profile
from .breaker import Breakers
from .leases import LeaseManager
from .metrics import RouterMetrics, usage_of
from .policies import Load, Policy
from .registry import Worker
from .respond import RequestError
from .retry import Outcome, RetryPolicy
from .upstream import Attempt, Malformed, TooLarge, UpstreamBroken, Upstreams

log = logging.getLogger(__name__)


@dataclass
class Answer:
    status: int
    headers: list
    body: bytes = b""
    first: bytes | None = None           # a stream's first chunk (already read)
    chunks: Iterator[bytes] | None = None  # the rest of a stream


class Attempts:
    def __init__(self, *, policy: Policy, leases: LeaseManager, breakers: Breakers, retry: RetryPolicy,
                 upstreams: Upstreams, metrics: RouterMetrics, max_response_bytes: int,
                 affinity: AffinityRouter | None = None):
        self.policy = policy
        self.affinity = affinity  # the cache_aware policy's acquisition (None for the others)
        self.leases = leases
        self.breakers = breakers
        self.retry = retry
        self.upstreams = upstreams
        self.metrics = metrics
        self.max_response_bytes = max_response_bytes

    def run(self, req: Admitted, exchange) -> Answer:
        self.retry.budget.deposit()
        tried: set[str] = set()
        attempts = 0
        last: Attempt | None = None
        profile = self.affinity.profile(req.payload) if self.affinity is not None else None
        while not exchange.cancelled:
            candidates = self.candidates(req.workers, tried)
            if not candidates:
                break
            if profile is not None:
                worker = self.pick_affine(candidates, profile, req.model, exchange)
            else:
                worker = self.pick(candidates, exchange)
            attempts += 1
            if attempts == 1:
                self.metrics.observe_before_upstream(req.model, time.perf_counter() - exchange.started)
            attempt, answer = self.one(worker, req, exchange)
            outcome = attempt.outcome
            self.metrics.count_attempt(worker.id, outcome.value)
            if answer is not None:
                # 2xx, or a 4xx: the request's own fault, passed through as is; the worker is fine
                self.breakers.success(worker.id)
                return answer
            exchange.end_attempt()
            if outcome is Outcome.CANCELLED:
                break
            self.breakers.failure(worker.id)
            tried.add(worker.id)
            last = attempt
            log.info("request %s: attempt %d on %s failed: %s %s", exchange.request_id, attempts, worker.id,
                     outcome.value, attempt.error)
            if not self.retry.should_retry(outcome, attempts, streamed_to_client=False):
                if outcome.retryable and attempts <= self.retry.retries:
                    self.metrics.budget_exhausted.inc()
                break
            self.metrics.retries.labels(outcome.value).inc()
        if exchange.cancelled:
            raise RequestError(499, "The client closed the request before its answer.", "client_closed_request")
        if last is None:
            raise RequestError(503, f"Every worker of '{req.model}' is failing (circuit breakers open); retry "
                               "shortly.", "no_healthy_worker")
        if last.outcome is Outcome.TIMEOUT:
            raise RequestError(504, f"The upstream worker timed out after {attempts} attempt(s).", "upstream_timeout")
        raise RequestError(502, f"The upstream worker failed after {attempts} attempt(s): {last.error}",
                           "upstream_error")

    def candidates(self, workers: tuple[Worker, ...], tried: set[str]) -> list[Worker]:
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

    def pick(self, candidates: list[Worker], exchange) -> Worker:
        loads = {w.id: Load(0, w.queue_depth) for w in candidates}
        ids = [w.id for w in candidates]

        def local_choice(counts):
            return self.policy.choose(ids, {w.id: Load(counts.get(w.id, 0), w.queue_depth) for w in candidates})

        lease = self.leases.acquire(self.policy.order(ids, loads), local_choice)
        exchange.hold(lease)
        return next(w for w in candidates if w.id == lease.worker_id)

    def pick_affine(self, candidates: list[Worker], profile: Profile, model: str, exchange) -> Worker:
        """Cache-aware: the cheapest candidate (uncached prompt tokens + load), leased and its
        index updated in one step."""
        ids = self.policy.order([w.id for w in candidates], {w.id: Load(0, w.queue_depth) for w in candidates})
        by_id = {w.id: w for w in candidates}
        reported = [self.affinity.reported(by_id[i].queue_depth, by_id[i].kv_cache_usage) for i in ids]
        lease, matched = self.affinity.acquire(ids, reported, profile)
        exchange.hold(lease)
        self.metrics.count_affinity(model, profile.prompt_tokens,
                                    min(profile.prompt_tokens, matched * self.affinity.settings.params.block_tokens))
        return by_id[lease.worker_id]

    def one(self, worker: Worker, req: Admitted, exchange) -> tuple[Attempt, Answer | None]:
        """One attempt: the outcome, and the answer when there is one to give the client."""
        attempt = self.upstreams.send(worker.url, req.path, req.body, exchange.request_id, exchange.attach)
        resp = attempt.response
        if resp is None:
            return self._cancelled_or(attempt, exchange), None
        exchange.response = resp
        if attempt.outcome is Outcome.SERVER_ERROR:
            attempt.error = f"HTTP {resp.status}"
            return attempt, None
        try:
            if self.upstreams.read_timeout_s != self.upstreams.first_byte_timeout_s:
                resp.set_timeout(self.upstreams.read_timeout_s)  # from now on: between two reads
            if req.stream and attempt.outcome is Outcome.OK:
                chunks = resp.iter_body()
                first = next(chunks, None)
                if first is None:
                    return Attempt(Outcome.RESET, None, "the stream ended before its first byte"), None
                if exchange.lease is not None and exchange.lease.tokens is not None:
                    self.leases.prefilled(exchange.lease)  # cache-aware: its prompt is done
                self.metrics.observe_ttft(req.model, time.perf_counter() - exchange.started)
                return attempt, Answer(resp.status, resp.headers, first=first, chunks=chunks)
            data = resp.read(self.max_response_bytes)
        except TimeoutError as exc:
            return self._cancelled_or(Attempt(Outcome.TIMEOUT, None, f"read timed out: {exc}"), exchange), None
        except TooLarge as exc:
            return Attempt(Outcome.TOO_LARGE, None, str(exc)), None
        except (UpstreamBroken, OSError) as exc:
            outcome = Outcome.MALFORMED if isinstance(exc, Malformed) else Outcome.RESET
            return self._cancelled_or(Attempt(outcome, None, str(exc) or type(exc).__name__), exchange), None
        if attempt.outcome is Outcome.OK:
            self.metrics.observe_ttft(req.model, time.perf_counter() - exchange.started)
            exchange.usage = usage_of(data)
        return attempt, Answer(resp.status, resp.headers, body=data)

    @staticmethod
    def _cancelled_or(attempt: Attempt, exchange) -> Attempt:
        """A broken connection after the client left is the cancel's doing, not the worker's."""
        return Attempt(Outcome.CANCELLED, None, "client gone") if exchange.cancelled else attempt
