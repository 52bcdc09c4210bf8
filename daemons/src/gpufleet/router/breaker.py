"""Circuit breaker per worker: consecutive failures open it; after a cool-down one probe
request is let through; its success closes the breaker, its failure re-opens it.

The transitions are pure functions of a :class:`BreakerRecord` and the time. The records
live in a :class:`BreakerTable`, a small table in an anonymous shared memory mapping made
by the router's main process before gunicorn forks, so every process of one router host
sees (and updates) the same breakers without a network round-trip. A closed breaker with
no failure counted is read without taking the lock: the hot path of a healthy fleet only
reads a few bytes.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import multiprocessing
import struct
import time
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}


@dataclass(frozen=True)
class BreakerRecord:
    state: int = CLOSED
    failures: int = 0        # consecutive failures
    opened_at: float = 0.0   # when it last opened (monotonic clock of the host)
    probe_until: float = 0.0  # while half-open: the probe's deadline (another may go after it)


def effective_state(rec: BreakerRecord, now: float, cooldown_s: float) -> int:
    """What a caller sees: an open breaker past its cool-down is half-open (probe allowed)."""
    if rec.state == OPEN and now >= rec.opened_at + cooldown_s:
        return HALF_OPEN
    return rec.state


def try_claim_probe(rec: BreakerRecord, now: float, cooldown_s: float, probe_timeout_s: float
                    ) -> tuple[bool, BreakerRecord]:
    """For an open or half-open breaker: may this caller send the single probe?"""
    if effective_state(rec, now, cooldown_s) != HALF_OPEN:
        return False, rec
    if rec.state == HALF_OPEN and now < rec.probe_until:
        return False, rec  # a probe is under way
    return True, replace(rec, state=HALF_OPEN, probe_until=now + probe_timeout_s)


def on_success(rec: BreakerRecord) -> BreakerRecord:
    return BreakerRecord()


def on_failure(rec: BreakerRecord, now: float, threshold: int) -> BreakerRecord:
    if rec.state == HALF_OPEN:
        return BreakerRecord(OPEN, rec.failures + 1, now, 0.0)  # the probe failed: wait again
    failures = rec.failures + 1
    if rec.state == OPEN or failures >= threshold:
        opened_at = rec.opened_at if rec.state == OPEN else now
        return BreakerRecord(OPEN, failures, opened_at, 0.0)
    return replace(rec, failures=failures)


_ID_BYTES = 96
_SLOT = struct.Struct(f"<{_ID_BYTES}sBxxxIddd")  # id, state, failures, opened_at, probe_until, spare


class BreakerTable:
    """Breaker records of up to ``slots`` workers in shared memory (open addressing)."""

    def __init__(self, slots: int = 2048, shared: bool = True):
        self.slots = slots
        self._mem = mmap.mmap(-1, slots * _SLOT.size) if shared else bytearray(slots * _SLOT.size)
        self._lock = multiprocessing.Lock() if shared else _NoLock()
        self._index: dict[str, int] = {}  # per-process cache of worker id → slot

    def _slot(self, worker_id: str, create: bool) -> int | None:
        cached = self._index.get(worker_id)
        if cached is not None:
            return cached
        raw = worker_id.encode()[:_ID_BYTES]
        start = int.from_bytes(hashlib.blake2b(raw, digest_size=4).digest(), "little") % self.slots
        for i in range(self.slots):
            slot = (start + i) % self.slots
            off = slot * _SLOT.size
            name = bytes(self._mem[off:off + _ID_BYTES]).rstrip(b"\0")
            if name == raw:
                self._index[worker_id] = slot
                return slot
            if not name:
                if not create:
                    return None
                with self._lock:
                    name = bytes(self._mem[off:off + _ID_BYTES]).rstrip(b"\0")
                    if not name:
                        self._mem[off:off + _ID_BYTES] = raw.ljust(_ID_BYTES, b"\0")
                        name = raw
                if name == raw:
                    self._index[worker_id] = slot
                    return slot
        log.warning("breaker table full (%d workers); %s is not tracked", self.slots, worker_id)
        return None

    def _read(self, slot: int) -> BreakerRecord:
        _, state, failures, opened_at, probe_until, _ = _SLOT.unpack_from(self._mem, slot * _SLOT.size)
        return BreakerRecord(state, failures, opened_at, probe_until)

    def _write(self, slot: int, worker_id: str, rec: BreakerRecord) -> None:
        _SLOT.pack_into(self._mem, slot * _SLOT.size, worker_id.encode()[:_ID_BYTES], rec.state,
                        min(rec.failures, 2**32 - 1), rec.opened_at, rec.probe_until, 0.0)

    def get(self, worker_id: str) -> BreakerRecord:
        slot = self._slot(worker_id, create=False)
        return BreakerRecord() if slot is None else self._read(slot)

    def update(self, worker_id: str, fn) -> tuple[BreakerRecord, BreakerRecord, object]:
        """Apply ``fn(record) -> (result, new_record)`` under the lock."""
        slot = self._slot(worker_id, create=True)
        if slot is None:
            result, new = fn(BreakerRecord())
            return BreakerRecord(), new, result
        with self._lock:
            old = self._read(slot)
            result, new = fn(old)
            if new != old:
                self._write(slot, worker_id, new)
        return old, new, result

    def items(self):
        for slot in range(self.slots):
            off = slot * _SLOT.size
            name = bytes(self._mem[off:off + _ID_BYTES]).rstrip(b"\0")
            if name:
                yield name.decode(errors="replace"), self._read(slot)


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Breakers:
    """The breakers of one router host: threshold and cool-down applied to a table."""

    def __init__(self, table: BreakerTable, threshold: int, cooldown_s: float, probe_timeout_s: float,
                 clock=None, on_change=None):
        self.table = table
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.probe_timeout_s = probe_timeout_s
        self.clock = clock or time.monotonic
        self.on_change = on_change  # called with (worker_id, old_state, new_state)

    def state(self, worker_id: str) -> int:
        return effective_state(self.table.get(worker_id), self.clock(), self.cooldown_s)

    def is_closed(self, worker_id: str) -> bool:
        return self.table.get(worker_id).state == CLOSED

    def claim_probe(self, worker_id: str) -> bool:
        now = self.clock()
        _, _, claimed = self.table.update(
            worker_id, lambda rec: try_claim_probe(rec, now, self.cooldown_s, self.probe_timeout_s))
        return bool(claimed)

    def success(self, worker_id: str) -> None:
        rec = self.table.get(worker_id)
        if rec.state == CLOSED and rec.failures == 0:
            return  # nothing to do: the common case takes no lock
        old, new, _ = self.table.update(worker_id, lambda r: (None, on_success(r)))
        self._changed(worker_id, old, new)

    def failure(self, worker_id: str) -> None:
        now = self.clock()
        old, new, _ = self.table.update(worker_id, lambda r: (None, on_failure(r, now, self.threshold)))
        self._changed(worker_id, old, new)

    def _changed(self, worker_id: str, old: BreakerRecord, new: BreakerRecord) -> None:
        if old.state != new.state:
            log.warning("breaker of worker %s: %s -> %s after %d consecutive failures", worker_id,
                        STATE_NAMES[old.state], STATE_NAMES[new.state], old.failures if new.state == CLOSED
                        else new.failures)
            if self.on_change:
                self.on_change(worker_id, old.state, new.state)

    def snapshot(self) -> dict[str, int]:
        now = self.clock()
        return {wid: effective_state(rec, now, self.cooldown_s) for wid, rec in self.table.items()}
