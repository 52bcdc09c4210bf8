"""The simulated engine: one asyncio task runs engine steps, as vLLM's EngineCore does.

Each step asks the scheduler for a batch (decodes, prefill chunks, admissions), lasts what
the cost model says for that many batched tokens, and at its end hands every sequence
that produced a token its text: a stream is woken every ``stream_interval`` tokens, a
non-streamed request once, at its end. Request handlers only wait on their sequence; a
cancelled handler (client gone) takes its sequence out of the engine at once and counts
it as ``abort``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import textgen
from .kvcache import BlockPool
from .latency import StepCost
from .metrics import SimMetrics
from .protocol import GenRequest
from .scheduler import FINISHED, RUNNING, Batch, Sequence, StepScheduler

log = logging.getLogger("gpufleet.sim")

# emit(text, finish_reason, stop_reason, completion_tokens_so_far): one SSE event's worth of
# a stream (the tokens produced since the last call, merged).
Emit = Callable[[str, "str | None", "str | None", int], Awaitable[None]]

# With every cost at zero, up to this many steps run between two turns of the event loop (a
# turn costs an epoll call; steps of no duration need not give way each time, unless a
# handler was woken: a stream's tokens are written between steps, as they would be).
INSTANT_STEPS_PER_TURN = 32

# Steps run on a timeline (each starts when the previous one should have ended), so the
# event loop's timer overshoot does not accumulate; a lag beyond this is forgiven instead
# of being caught up with a burst of instant steps.
MAX_LAG_S = 0.05


@dataclass
class Outcome:
    text: str = ""
    finish_reason: str = "abort"
    stop_reason: str | None = None
    completion_tokens: int = 0


class Request(Sequence):
    """A sequence with what the engine needs to generate and deliver its answer."""

    __slots__ = ("req", "next_token", "eos_at", "stops", "pieces", "pending", "flushed", "streaming",
                 "finish", "stop_reason", "waiter", "news", "arrival", "scheduled", "first_token",
                 "last_token", "slow")

    def __init__(self, req: GenRequest, stream: textgen.TokenStream, hold: float, arrival: float,
                 streaming: bool, slow: bool):
        super().__init__(req.tokens or ["<s>"] * req.prompt_tokens, hold)
        self.req = req
        self.next_token = stream.next_token
        self.eos_at = -1 if req.ignore_eos else max(stream.natural_length, req.min_tokens)
        self.stops = textgen.StopChecker(req.stops) if req.stops else None
        self.pieces: list[str] = []
        self.pending: list[str] = []     # streamed text not yet taken by the handler
        self.flushed = 0                 # tokens handed to the handler so far
        self.streaming = streaming
        self.finish: str | None = None
        self.stop_reason: str | None = None
        self.waiter: asyncio.Future | None = None
        self.news = False
        self.arrival = arrival
        self.scheduled: float | None = None
        self.first_token: float | None = None
        self.last_token = 0.0
        self.slow = slow

    def notify(self) -> None:
        self.news = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def text(self) -> str:
        return self.stops.text if self.stops is not None else "".join(self.pieces)


class Engine:
    def __init__(self, *, cost: StepCost, max_num_seqs: int, kv_cache_tokens: int, seed: int,
                 natural_range: tuple[int, int], metrics_factory: Callable[..., SimMetrics],
                 max_num_batched_tokens: int = 8192, block_size: int = 16, enable_prefix_caching: bool = True,
                 stream_interval: int = 1):
        self.cost = cost
        self.pool = BlockPool(max(kv_cache_tokens // block_size, 1))
        self.scheduler = StepScheduler(self.pool, block_size=block_size, max_num_seqs=max_num_seqs,
                                       max_num_batched_tokens=max_num_batched_tokens,
                                       enable_prefix_caching=enable_prefix_caching)
        self.seed = seed
        self.natural_range = natural_range
        self.stream_interval = stream_interval
        self._rng = random.Random(seed)
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Future | None = None
        self._previous_step_end = -1.0
        self._woke = False           # a handler was woken by the last step
        self.metrics = metrics_factory(
            running=lambda: len(self.scheduler.running), waiting=lambda: len(self.scheduler.waiting),
            kv_usage=self.pool.usage, cache_stats=self.scheduler.stats,
            cache_info={"block_size": block_size, "num_gpu_blocks": self.pool.num_blocks,
                        "enable_prefix_caching": enable_prefix_caching})

    def kv_usage(self) -> float:
        return self.pool.usage()

    # --- the request side ------------------------------------------------------------------

    async def run(self, req: GenRequest, emit: Emit | None = None, *, slow: bool = False,
                  arrival: float | None = None) -> Outcome:
        """Generate ``req``'s completion; with ``emit``, hand its text over as the steps make it."""
        loop = asyncio.get_running_loop()
        arrival = time.monotonic() if arrival is None else arrival
        seed = req.seed if req.seed is not None else self.seed
        stream = textgen.TokenStream(textgen.seed_for(req.prompt_key, seed), self.natural_range)
        seq = Request(req, stream, self.cost.hold(self._rng, slow), arrival, emit is not None, slow)
        self.scheduler.add(seq)
        self._ensure_running(loop)
        self._kick()
        first = True
        try:
            while True:
                if not seq.news:
                    seq.waiter = loop.create_future()
                    await seq.waiter
                seq.news = False
                if emit is not None:
                    text = "".join(seq.pending)
                    seq.pending.clear()
                    seq.flushed = seq.generated
                    if text or seq.finish is not None or first:
                        first = False
                        await emit(text, seq.finish, seq.stop_reason, seq.flushed)
                if seq.finish is not None and not seq.news:
                    return Outcome(seq.text(), seq.finish, seq.stop_reason, seq.generated)
        except BaseException:
            if seq.state != FINISHED:
                self._end(seq, "abort", time.monotonic())
            raise

    # --- the engine loop ---------------------------------------------------------------------

    def _ensure_running(self, loop: asyncio.AbstractEventLoop) -> None:
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            self._task = loop.create_task(self._run_steps(), name="gpufleet-sim-engine")

    def _kick(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run_steps(self) -> None:
        loop = asyncio.get_running_loop()
        scheduler, cost, rng = self.scheduler, self.cost, self._rng
        clock: float | None = None   # when the previous step should have ended, if steps run back to back
        instant = 0                  # zero-duration steps since the event loop last had a turn
        while True:
            try:
                now = time.monotonic()
                batch = scheduler.schedule(now)
                for seq in batch.admitted:
                    if seq.scheduled is None:
                        seq.scheduled = now
                if batch.tokens == 0:
                    clock = None
                    instant = 0
                    await self._idle(loop, batch.next_ready)
                    continue
                duration = cost.step(batch.tokens, len(scheduler.running), rng)
                if duration > 0 or instant >= INSTANT_STEPS_PER_TURN or self._woke:
                    start = now if clock is None or now - clock > MAX_LAG_S else clock
                    clock = start + duration
                    instant = 0
                    self._woke = False
                    await asyncio.sleep(max(clock - now, 0.0))
                else:
                    instant += 1
                self._complete(batch, time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not leave every request hanging: log it, keep stepping
                log.exception("engine step failed")
                await asyncio.sleep(0.1)

    async def _idle(self, loop: asyncio.AbstractEventLoop, until: float | None) -> None:
        self._wake = wake = loop.create_future()
        timer = loop.call_at(until, self._kick) if until is not None else None
        try:
            await wake
        finally:
            self._wake = None
            if timer is not None:
                timer.cancel()

    def _complete(self, batch: Batch, now: float) -> None:
        """The step is over: every sequence in it that completed a prefill or decoded gets its token."""
        metrics = self.metrics
        metrics.iteration_tokens.observe(batch.tokens)
        produced = 0
        for seq, chunk in batch.prefills:
            if seq.state == RUNNING:
                seq.num_computed += chunk
                if seq.num_computed >= seq.target:
                    self._token(seq, now)
                    produced += 1
        # the sequences that also decoded in the previous step share one inter-token latency:
        # one histogram update for all of them
        previous, in_step = self._previous_step_end, 0
        for seq in batch.decodes:
            if seq.state == RUNNING:
                seq.num_computed += 1
                if seq.last_token == previous:
                    in_step += 1
                    self._token(seq, now, itl_counted=True)
                else:
                    self._token(seq, now)
                produced += 1
        if in_step:
            metrics.itl.observe(now - previous, in_step)
        self._previous_step_end = now
        metrics.generation_tokens.inc(produced)

    def _token(self, seq: Request, now: float, itl_counted: bool = False) -> None:
        metrics = self.metrics
        if seq.generated == seq.eos_at:
            piece, finish = "", "stop"   # end of sequence: a token without text
        else:
            piece, finish = seq.next_token(), None
        seq.generated += 1
        if seq.first_token is None:
            seq.first_token = now
            metrics.ttft.observe(now - seq.arrival)
            metrics.prompt_tokens.inc(seq.prompt_len)
            metrics.prompt_tokens_cached.inc(seq.cached_tokens)
        elif not itl_counted:
            metrics.itl.observe(now - seq.last_token)
        seq.last_token = now
        stop_reason = None
        if seq.stops is None:
            text = piece
            seq.pieces.append(piece)
        else:
            text, hit = seq.stops.feed(piece)
            if hit is not None:
                finish, stop_reason = "stop", hit
            if finish is not None or seq.generated >= seq.req.max_tokens:
                text += seq.stops.flush()
        if finish is None and seq.generated >= seq.req.max_tokens:
            finish = "length"
        if seq.streaming and text:
            seq.pending.append(text)
        if finish is not None:
            seq.stop_reason = stop_reason
            self._end(seq, finish, now)
        elif seq.streaming and (seq.generated == 1 or seq.generated - seq.flushed >= self.stream_interval):
            seq.notify()   # as vLLM: the first token at once, then every stream_interval tokens
            self._woke = True
        if seq.slow:
            seq.ready_at = now + self.cost.slow_gap(self._rng)

    def _end(self, seq: Request, reason: str, now: float) -> None:
        if reason != "abort":
            self.scheduler.cache_output(seq, textgen.tokenize(seq.text()))
        self.scheduler.finish(seq)
        seq.finish = reason
        scheduled = seq.scheduled if seq.scheduled is not None else now
        self.metrics.observe_finished(reason=reason, prompt_tokens=seq.prompt_len, generated=seq.generated,
                                      max_tokens=seq.req.max_tokens, arrival=seq.arrival, scheduled=scheduled,
                                      first_token=seq.first_token, finished=now)
        if reason != "abort":
            seq.notify()
            self._woke = True
