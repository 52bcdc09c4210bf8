"""vLLM's admission rule: at most ``max_num_seqs`` sequences run, the others wait in
arrival order. A freed slot is handed straight to the oldest waiter, so a newcomer can
never overtake the queue; a waiter that is cancelled (its client went away) leaves it."""

from __future__ import annotations

import asyncio
import collections


class FifoScheduler:
    def __init__(self, max_running: int):
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        self.max_running = max_running
        self._running = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self._running < self.max_running and not self._waiters:
            self._running += 1
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # the slot was handed over just before the cancellation: give it on
                self.release()
            else:
                try:
                    self._waiters.remove(future)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)  # the slot passes on; ``running`` is unchanged
                return
        self._running -= 1
