"""The simulated engine: schedules a sequence (FIFO, bounded by ``max_num_seqs``), sleeps
its prefill and each decode step per the latency model, produces its tokens and records
vLLM's metrics. One asyncio task per sequence; a cancelled task (client gone) frees its
slot or leaves the queue and is counted as ``abort``."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import textgen
from .latency import LatencyModel
from .metrics import SimMetrics
from .protocol import GenRequest
from .scheduler import FifoScheduler

# Non-streamed sequences sleep in chunks of about this long rather than once per token:
# nobody sees their tokens one by one, and it spares the event loop thousands of timers.
NON_STREAM_SLEEP_S = 0.02

# emit(text, finish_reason, stop_reason): called once per token of a stream.
Emit = Callable[[str, "str | None", "str | None"], Awaitable[None]]


@dataclass
class Outcome:
    text: str = ""
    finish_reason: str = "abort"
    stop_reason: str | None = None
    completion_tokens: int = 0


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class Engine:
    def __init__(self, *, latency: LatencyModel, max_num_seqs: int, kv_capacity_tokens: int,
                 seed: int, natural_range: tuple[int, int], metrics_factory: Callable[..., SimMetrics]):
        self.latency = latency
        self.scheduler = FifoScheduler(max_num_seqs)
        self.kv_capacity_tokens = kv_capacity_tokens
        self.kv_tokens = 0
        self.seed = seed
        self.natural_range = natural_range
        self._rng = random.Random(seed)
        self.metrics = metrics_factory(running=lambda: self.scheduler.running,
                                       waiting=lambda: self.scheduler.waiting,
                                       kv_usage=self.kv_usage)

    def kv_usage(self) -> float:
        return min(self.kv_tokens / self.kv_capacity_tokens, 1.0)

    def _token_stream(self, req: GenRequest) -> textgen.TokenStream:
        seed = req.seed if req.seed is not None else self.seed
        return textgen.TokenStream(textgen.seed_for(req.prompt_key, seed), self.natural_range)

    async def run(self, req: GenRequest, emit: Emit | None = None, *, slow: bool = False,
                  arrival: float | None = None) -> Outcome:
        """Generate ``req``'s completion; with ``emit``, hand each token over as it is made."""
        arrival = time.monotonic() if arrival is None else arrival
        scheduler, metrics, latency, rng = self.scheduler, self.metrics, self.latency, self._rng
        outcome = Outcome()
        try:
            await scheduler.acquire()
        except asyncio.CancelledError:
            now = time.monotonic()
            metrics.observe_finished(reason="abort", prompt_tokens=req.prompt_tokens, generated=0,
                                     max_tokens=req.max_tokens, arrival=arrival, scheduled=now,
                                     first_token=None, finished=now)
            raise
        scheduled = time.monotonic()
        first_token = None
        kv_held = req.prompt_tokens
        self.kv_tokens += kv_held
        try:
            # Token times follow a timeline (due += step) rather than back-to-back sleeps,
            # so the event loop's timer overshoot (~1 ms per sleep) does not accumulate.
            due = scheduled + latency.ttft(req.prompt_tokens, scheduler.running, rng, slow)
            await _sleep_until(due)
            metrics.prompt_tokens.inc(req.prompt_tokens)
            stream = self._token_stream(req)
            next_token = stream.next_token
            eos_at = -1 if req.ignore_eos else max(stream.natural_length, req.min_tokens)
            stops = textgen.StopChecker(req.stops) if req.stops else None
            pieces: list[str] = []
            itl_zero = latency.itl_s == 0 and not slow
            max_tokens = req.max_tokens
            generated = 0
            step = 0.0
            last_token_at = 0.0
            while True:
                if generated > 0 and not itl_zero:
                    step = latency.itl(scheduler.running, rng, slow)
                    due += step
                    if emit is not None or due - time.monotonic() >= NON_STREAM_SLEEP_S:
                        await _sleep_until(due)
                if generated == eos_at:
                    piece, finish = "", "stop"
                else:
                    piece, finish = next_token(), None
                stop_reason = None
                generated += 1
                self.kv_tokens += 1
                kv_held += 1
                now = time.monotonic()
                if first_token is None:
                    first_token = now
                    metrics.ttft.observe(now - arrival)
                elif emit is not None:
                    metrics.itl.observe(now - last_token_at)
                elif not itl_zero:
                    metrics.itl.observe(step)
                last_token_at = now
                if stops is None:
                    text = piece
                    pieces.append(piece)
                    if finish is None and generated >= max_tokens:
                        finish = "length"
                else:
                    text, hit = stops.feed(piece)
                    if hit is not None:
                        finish, stop_reason = "stop", hit
                    elif finish is None and generated >= max_tokens:
                        finish = "length"
                    if finish is not None:
                        text += stops.flush()
                if emit is not None and (text or finish is not None or generated == 1):
                    await emit(text, finish, stop_reason)
                if finish is not None:
                    break
            if emit is None:
                await _sleep_until(due)
            if itl_zero and emit is None and generated > 1:
                metrics.itl.observe(0.0, generated - 1)  # one update for the whole answer
            metrics.generation_tokens.inc(generated)
            outcome = Outcome(stops.text if stops is not None else "".join(pieces), finish, stop_reason, generated)
            return outcome
        except BaseException:
            outcome.completion_tokens = kv_held - req.prompt_tokens
            metrics.generation_tokens.inc(outcome.completion_tokens)
            raise
        finally:
            scheduler.release()
            self.kv_tokens -= kv_held
            metrics.observe_finished(reason=outcome.finish_reason, prompt_tokens=req.prompt_tokens,
                                     generated=outcome.completion_tokens, max_tokens=req.max_tokens,
                                     arrival=arrival, scheduled=scheduled, first_token=first_token,
                                     finished=time.monotonic())
