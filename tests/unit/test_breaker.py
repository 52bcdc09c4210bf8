"""Circuit breaker: pure transitions, and the table shared by a host's processes."""

import os

from gpufleet.router.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerRecord,
    Breakers,
    BreakerTable,
    effective_state,
    on_failure,
    on_success,
    try_claim_probe,
)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_consecutive_failures_open_the_breaker():
    rec = BreakerRecord()
    rec = on_failure(rec, 1.0, threshold=3)
    rec = on_failure(rec, 2.0, threshold=3)
    assert rec.state == CLOSED and rec.failures == 2
    rec = on_failure(rec, 3.0, threshold=3)
    assert rec.state == OPEN and rec.opened_at == 3.0


def test_a_success_resets_the_count():
    rec = on_failure(on_failure(BreakerRecord(), 1.0, 3), 2.0, 3)
    rec = on_success(rec)
    rec = on_failure(rec, 3.0, 3)
    assert rec.state == CLOSED and rec.failures == 1


def test_cooldown_then_a_single_probe():
    rec = BreakerRecord(OPEN, 3, opened_at=10.0)
    assert effective_state(rec, 14.0, cooldown_s=5.0) == OPEN
    assert try_claim_probe(rec, 14.0, 5.0, 30.0)[0] is False
    claimed, rec = try_claim_probe(rec, 15.0, 5.0, 30.0)
    assert claimed and rec.state == HALF_OPEN
    # a second caller does not get a probe while the first is under way
    assert try_claim_probe(rec, 16.0, 5.0, 30.0)[0] is False
    # ...unless the probe's deadline passed (its caller died)
    assert try_claim_probe(rec, 46.0, 5.0, 30.0)[0] is True


def test_failed_probe_reopens_and_restarts_the_cooldown():
    rec = BreakerRecord(HALF_OPEN, 3, opened_at=10.0, probe_until=50.0)
    rec = on_failure(rec, 20.0, 3)
    assert rec.state == OPEN and rec.opened_at == 20.0
    assert effective_state(rec, 24.0, 5.0) == OPEN


def test_successful_probe_closes():
    assert on_success(BreakerRecord(HALF_OPEN, 5, 1.0, 2.0)) == BreakerRecord()


def test_breakers_over_a_table_report_changes():
    clock, changes = Clock(), []
    b = Breakers(BreakerTable(slots=16, shared=False), threshold=2, cooldown_s=5, probe_timeout_s=10,
                 clock=clock, on_change=lambda *c: changes.append(c))
    b.failure("w1")
    assert b.is_closed("w1")
    b.failure("w1")
    assert not b.is_closed("w1") and b.state("w1") == OPEN
    assert changes == [("w1", CLOSED, OPEN)]
    assert not b.claim_probe("w1")
    clock.now += 5
    assert b.state("w1") == HALF_OPEN
    assert b.claim_probe("w1") and not b.claim_probe("w1")
    b.success("w1")
    assert b.is_closed("w1") and changes[-1] == ("w1", HALF_OPEN, CLOSED)
    assert b.snapshot() == {"w1": CLOSED}


def in_a_forked_process(fn) -> None:
    """``fn()`` in a child process, as another gunicorn process would run it."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def test_table_is_shared_with_a_forked_process():
    b = Breakers(BreakerTable(slots=64, shared=True), threshold=1, cooldown_s=60, probe_timeout_s=10)
    in_a_forked_process(lambda: b.failure("worker-x"))
    assert b.state("worker-x") == OPEN


def test_many_workers_fit_and_stay_apart():
    table = BreakerTable(slots=64, shared=False)
    b = Breakers(table, threshold=1, cooldown_s=60, probe_timeout_s=10)
    ids = [f"w{i}" for i in range(50)]
    for wid in ids[::2]:
        b.failure(wid)
    assert {w for w, s in b.snapshot().items() if s == OPEN} == set(ids[::2])


def test_ids_sharing_a_long_prefix_have_their_own_breakers():
    b = Breakers(BreakerTable(slots=64, shared=False), threshold=1, cooldown_s=60, probe_timeout_s=10)
    prefix = "worker-" + "x" * 120
    b.failure(prefix + "-a")
    assert b.state(prefix + "-a") == OPEN
    assert b.state(prefix + "-b") == CLOSED and b.is_closed(prefix + "-b")


def test_a_worker_that_leaves_frees_its_slot_for_another():
    table = BreakerTable(slots=8, shared=False)
    b = Breakers(table, threshold=1, cooldown_s=60, probe_timeout_s=10)
    for i in range(8):
        b.failure(f"w{i}")
    assert all(b.state(f"w{i}") == OPEN for i in range(8))
    b.failure("newcomer")  # the table is full: untracked (never broken), and that is said once
    assert b.state("newcomer") == CLOSED
    b.forget("w3")
    assert b.state("w3") == CLOSED
    b.failure("newcomer")
    assert b.state("newcomer") == OPEN
    assert all(b.state(f"w{i}") == OPEN for i in range(8) if i != 3)  # the others kept their records


def test_forget_in_one_process_is_seen_by_another():
    b = Breakers(BreakerTable(slots=64, shared=True), threshold=1, cooldown_s=60, probe_timeout_s=10)
    b.failure("leaving")
    assert b.state("leaving") == OPEN  # cached slot in this process
    in_a_forked_process(lambda: b.forget("leaving"))
    assert b.state("leaving") == CLOSED


def test_a_lookup_in_a_full_table_looks_at_a_bounded_number_of_slots():
    table = BreakerTable(slots=2048, shared=False)
    b = Breakers(table, threshold=1, cooldown_s=60, probe_timeout_s=10)
    for i in range(2048):
        b.failure(f"w{i}")
    looked = []
    holds = table._holds
    table._holds = lambda slot, digest: looked.append(slot) or holds(slot, digest)
    assert b.state("absent") == CLOSED
    assert 0 < len(looked) <= 32  # the old table scanned all 2048 slots (~1 ms per lookup)
