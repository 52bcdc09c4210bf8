"""The simulator's FIFO scheduler, without sockets."""

import asyncio

import pytest

from gpufleet.sim.scheduler import FifoScheduler


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_bounded_running_and_fifo_handoff():
    async def scenario():
        sched = FifoScheduler(2)
        order = []
        release = {i: asyncio.Event() for i in range(5)}

        async def seq(i):
            await sched.acquire()
            order.append(i)
            await release[i].wait()
            sched.release()

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(seq(i)))
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        assert (sched.running, sched.waiting) == (2, 3)
        assert order == [0, 1]
        release[1].set()
        await asyncio.sleep(0.01)
        assert order == [0, 1, 2] and (sched.running, sched.waiting) == (2, 2)
        for i in (0, 2, 3, 4):
            release[i].set()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4]
        assert (sched.running, sched.waiting) == (0, 0)

    run(scenario())


def test_newcomer_cannot_overtake_the_queue():
    async def scenario():
        sched = FifoScheduler(1)
        await sched.acquire()
        waiter = asyncio.create_task(sched.acquire())
        await asyncio.sleep(0)
        sched.release()            # handed to the waiter, not freed
        assert sched.running == 1
        late = asyncio.create_task(sched.acquire())
        await asyncio.sleep(0.01)
        assert waiter.done() and not late.done()
        sched.release()
        await late
        sched.release()
        assert sched.running == 0

    run(scenario())


def test_cancelled_waiter_leaves_the_queue():
    async def scenario():
        sched = FifoScheduler(1)
        await sched.acquire()
        waiter = asyncio.create_task(sched.acquire())
        await asyncio.sleep(0)
        assert sched.waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert sched.waiting == 0
        sched.release()
        assert sched.running == 0

    run(scenario())


def test_cancel_after_handoff_passes_the_slot_on():
    async def scenario():
        sched = FifoScheduler(1)
        await sched.acquire()
        first = asyncio.create_task(sched.acquire())
        second = asyncio.create_task(sched.acquire())
        await asyncio.sleep(0)
        sched.release()   # slot handed to ``first`` ...
        first.cancel()    # ... which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, 1)
        assert (sched.running, sched.waiting) == (1, 0)
        sched.release()
        assert sched.running == 0

    run(scenario())


def test_max_running_must_be_positive():
    with pytest.raises(ValueError):
        FifoScheduler(0)
