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


_EMPTY, _USED, _FREED = 0, 1, 2
_NAME_BYTES = 96  # the id as shown in /metrics (the key is the digest of the full id)
_SLOT = struct.Struct(f"<16sB{_NAME_BYTES}sBIdd")  # digest, tag, name, state, failures, opened_at, probe_until
_MAX_PROBES = 32


def _digest(worker_id: str) -> bytes:
    return hashlib.blake2b(worker_id.encode(), digest_size=16).digest()


class BreakerTable:
    """Breaker records of up to ``slots`` workers in shared memory: open addressing on a
    128-bit digest of the full worker id, at most ``_MAX_PROBES`` slots looked at per
    lookup (O(1) even when the table is full), slots freed (``forget``) when a worker
    leaves."""

    def __init__(self, slots: int = 2048, shared: bool = True):
        self.slots = slots
        self._mem = mmap.mmap(-1, slots * _SLOT.size) if shared else bytearray(slots * _SLOT.size)
        # bumped by every insert and free: a worker found absent stays absent while it is unchanged
        self._version = mmap.mmap(-1, 8) if shared else bytearray(8)
        self._lock = multiprocessing.Lock() if shared else _NoLock()
        self._index: dict[str, tuple[int, bytes]] = {}  # per-process cache: id → (slot, digest)
        self._absent: dict[str, bytes] = {}  # per-process cache: id → the version it was absent at
        self._warned = False

    def _bump(self) -> None:  # under the lock
        self._version[:8] = (int.from_bytes(self._version[:8], "little") + 1).to_bytes(8, "little")

    def _holds(self, slot: int, digest: bytes) -> bool:
        off = slot * _SLOT.size
        return self._mem[off + 16] == _USED and bytes(self._mem[off:off + 16]) == digest

    def _find(self, digest: bytes) -> tuple[int | None, int | None]:
        """(the slot holding ``digest``, the first slot free for it) along its probe sequence."""
        start = int.from_bytes(digest[:4], "little") % self.slots
        free = None
        for i in range(min(_MAX_PROBES, self.slots)):
            slot = (start + i) % self.slots
            tag = self._mem[slot * _SLOT.size + 16]
            if tag == _EMPTY:
                return None, free if free is not None else slot
            if tag == _FREED:
                if free is None:
                    free = slot
            elif self._holds(slot, digest):
                return slot, None
        return None, free

    def _slot(self, worker_id: str, create: bool) -> int | None:
        cached = self._index.get(worker_id)
        if cached is not None and self._holds(*cached):
            return cached[0]
        if not create and self._absent.get(worker_id) == self._version[:8]:
            return None  # the healthy fleet's common case: no record, none made since
        version = bytes(self._version[:8])
        digest = _digest(worker_id)
        slot, free = self._find(digest)
        if slot is None and create:
            with self._lock:
                slot, free = self._find(digest)
                if slot is None and free is not None:
                    name = worker_id.encode()[:_NAME_BYTES]
                    _SLOT.pack_into(self._mem, free * _SLOT.size, digest, _USED, name, CLOSED, 0, 0.0, 0.0)
                    self._bump()
                    slot = free
            if slot is None and not self._warned:
                self._warned = True
                log.warning("breaker table full around %s (%d slots): a worker without a slot is never broken; "
                            "raise the table size", worker_id, self.slots)
        if slot is None:
            self._index.pop(worker_id, None)
            if len(self._absent) > 4 * self.slots:
                self._absent.clear()
            self._absent[worker_id] = version
            return None
        self._absent.pop(worker_id, None)
        self._index[worker_id] = (slot, digest)
        return slot

    def _read(self, slot: int) -> BreakerRecord:
        _, _, _, state, failures, opened_at, probe_until = _SLOT.unpack_from(self._mem, slot * _SLOT.size)
        return BreakerRecord(state, failures, opened_at, probe_until)

    def _write(self, slot: int, rec: BreakerRecord) -> None:
        digest, tag, name, *_ = _SLOT.unpack_from(self._mem, slot * _SLOT.size)
        _SLOT.pack_into(self._mem, slot * _SLOT.size, digest, tag, name, rec.state, min(rec.failures, 2**32 - 1),
                        rec.opened_at, rec.probe_until)

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
            if not self._holds(*self._index[worker_id]):  # freed by another process meanwhile
                result, new = fn(BreakerRecord())
                return BreakerRecord(), new, result
            old = self._read(slot)
            result, new = fn(old)
            if new != old:
                self._write(slot, new)
        return old, new, result

    def forget(self, worker_id: str) -> None:
        """Free the worker's slot (it left the fleet)."""
        digest = _digest(worker_id)
        with self._lock:
            slot, _ = self._find(digest)
            if slot is not None:
                _SLOT.pack_into(self._mem, slot * _SLOT.size, b"", _FREED, b"", CLOSED, 0, 0.0, 0.0)
                self._bump()
        self._index.pop(worker_id, None)

    def items(self):
        for slot in range(self.slots):
            if self._mem[slot * _SLOT.size + 16] == _USED:
                name = _SLOT.unpack_from(self._mem, slot * _SLOT.size)[2].rstrip(b"\0")
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

    def forget(self, worker_id: str) -> None:
        self.table.forget(worker_id)

    def snapshot(self) -> dict[str, int]:
        now = self.clock()
        return {wid: effective_state(rec, now, self.cooldown_s) for wid, rec in self.table.items()}
