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


def test_table_is_shared_with_a_forked_process():
    table = BreakerTable(slots=64, shared=True)
    b = Breakers(table, threshold=1, cooldown_s=60, probe_timeout_s=10)
    pid = os.fork()
    if pid == 0:  # the child opens the breaker, as another gunicorn process would
        b.failure("worker-x")
        os._exit(0)
    os.waitpid(pid, 0)
    assert b.state("worker-x") == OPEN


def test_many_workers_fit_and_stay_apart():
    table = BreakerTable(slots=64, shared=False)
    b = Breakers(table, threshold=1, cooldown_s=60, probe_timeout_s=10)
    ids = [f"w{i}" for i in range(50)]
    for wid in ids[::2]:
        b.failure(wid)
    assert {w for w, s in b.snapshot().items() if s == OPEN} == set(ids[::2])
