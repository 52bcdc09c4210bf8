"""vLLM V1's scheduler, one engine step at a time (no asyncio, no clock of its own).

Each step gets a budget of ``max_num_batched_tokens`` tokens: first one token for every
running sequence that is decoding (in admission order), then chunks of prefill for the
running sequences whose prompt is not yet computed, then new sequences from the FIFO
waiting queue while fewer than ``max_num_seqs`` run (chunked prefill: a prompt longer than
what is left of the budget is computed over several steps).

Admitting a sequence reserves KV blocks for its whole prompt (vLLM 0.32's
``scheduler_reserve_full_isl``), reusing the longest chain of cached blocks of its prefix
(automatic prefix caching: their prefill is skipped; at least the last prompt token is
always computed). The head of the queue waits if its blocks do not fit, and nobody
overtakes it. A decoding sequence that needs a new block when none is free preempts the
most recently admitted running sequence (recompute: its blocks are freed and it goes back
to the front of the queue, to recompute its prompt and output so far).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from .kvcache import ROOT_HASH, BlockPool, block_hashes

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class Sequence:
    """One request inside the engine. The engine fills in the generation fields."""

    __slots__ = ("tokens", "prompt_len", "generated", "num_computed", "target", "blocks", "hashes",
                 "registered", "state", "hold", "ready_at", "num_preemptions", "cached_tokens")

    def __init__(self, tokens: list[str], hold: float = 0.0):
        self.tokens = tokens
        self.prompt_len = len(tokens)
        self.generated = 0          # output tokens so far
        self.num_computed = 0       # tokens whose KV is computed (cached hits included)
        self.target = self.prompt_len  # tokens to compute before the next token can be sampled
        self.blocks: list[int] = []
        self.hashes: list[bytes] | None = None
        self.registered = 0         # full blocks already named in the prefix cache
        self.state = WAITING
        self.hold = hold            # seconds between (first) admission and the first prefill chunk
        self.ready_at = 0.0         # not scheduled before this time (the hold, the slow fault)
        self.num_preemptions = 0
        self.cached_tokens = 0      # prefill skipped thanks to the prefix cache, at first admission

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.target


@dataclass
class Batch:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)
    tokens: int = 0
    admitted: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    next_ready: float | None = None   # the earliest ready_at among the sequences skipped


@dataclass
class SchedulerStats:
    """What vLLM's metrics count from the scheduler: prefix-cache tokens queried and hit at
    admission (requests that were preempted before are left out, as vLLM 0.32 does) and
    preemptions."""
    queries: int = 0
    hits: int = 0
    preemptions: int = 0


def _blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class StepScheduler:
    def __init__(self, pool: BlockPool, *, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_prefix_caching: bool = True):
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or block_size < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and block_size must be at least 1")
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.running: list[Sequence] = []
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.stats = SchedulerStats()

    # --- membership -----------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """The sequence is done (or its client went away): leave the queue or free its blocks."""
        if seq.state == RUNNING:
            self.running.remove(seq)
            self.pool.free(seq.blocks)
            seq.blocks = []
        elif seq.state == WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.state = FINISHED

    def cache_output(self, seq: Sequence, output_tokens: list[str]) -> None:
        """Name in the prefix cache the full blocks that hold the answer's KV, as vLLM caches
        the blocks of generated tokens too: the next turn of a conversation re-sends the
        answer after this prompt (whose template ends by opening the reply), so it can hit
        them. ``output_tokens`` is the answer as the next prompt will tokenise it."""
        if not self.enable_prefix_caching or seq.state != RUNNING or seq.hashes is None:
            return
        block_size, known = self.block_size, len(seq.hashes)
        full = min(seq.num_computed, seq.prompt_len + len(output_tokens)) // block_size
        full = min(full, len(seq.blocks))
        if full <= known:
            return
        tail = (list(seq.tokens[known * block_size:]) + output_tokens)[:(full - known) * block_size]
        hashes = block_hashes(tail, block_size, seq.hashes[-1] if known else ROOT_HASH)
        for index, block_hash in enumerate(hashes, start=known):
            self.pool.cache(seq.blocks[index], block_hash)

    def _preempt(self, victim: Sequence) -> None:
        self.running.remove(victim)
        self.pool.free(victim.blocks)
        victim.blocks = []
        victim.num_computed = 0
        victim.registered = 0
        victim.target = victim.prompt_len + victim.generated   # recompute prompt and output so far
        victim.state = WAITING
        victim.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(victim)

    # --- one step -----------------------------------------------------------------------

    def schedule(self, now: float) -> Batch:
        batch = Batch()
        budget = self.max_num_batched_tokens
        block_size, pool = self.block_size, self.pool
        skipped_ready = None
        # 1. decodes, in admission order; a new block may cost the latest-admitted its place
        running = self.running
        for seq in list(running) if pool.num_free < len(running) else running:
            if seq.state != RUNNING or seq.num_computed < seq.target:
                continue
            if seq.ready_at > now:
                skipped_ready = seq.ready_at if skipped_ready is None else min(skipped_ready, seq.ready_at)
                continue
            if budget == 0:
                break
            if len(seq.blocks) * block_size < seq.num_computed + 1:
                new = pool.allocate(1)
                while new is None:
                    victim = self.running[-1]
                    self._preempt(victim)
                    batch.preempted.append(victim)
                    if victim is seq:
                        break
                    new = pool.allocate(1)
                if new is None:
                    continue
                seq.blocks += new
            batch.decodes.append(seq)
            budget -= 1
        # 2. running sequences still prefilling (their blocks are reserved), FIFO
        for seq in running:
            if budget == 0:
                break
            if seq.num_computed >= seq.target:
                continue
            if seq.ready_at > now:
                skipped_ready = seq.ready_at if skipped_ready is None else min(skipped_ready, seq.ready_at)
                continue
            budget -= self._chunk(seq, budget, batch)
        # 3. admissions from the waiting queue, FIFO, while the prompt's blocks fit
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            if seq.hold:
                seq.ready_at, seq.hold = now + seq.hold, 0.0
            self.waiting.popleft()
            self.running.append(seq)
            batch.admitted.append(seq)
            if budget and seq.ready_at <= now:
                budget -= self._chunk(seq, budget, batch)
            elif seq.ready_at > now:
                skipped_ready = seq.ready_at if skipped_ready is None else min(skipped_ready, seq.ready_at)
        batch.tokens = self.max_num_batched_tokens - budget
        batch.next_ready = skipped_ready
        return batch

    def _admit(self, seq: Sequence) -> bool:
        block_size, pool = self.block_size, self.pool
        target = seq.target
        hit: list[int] = []
        if self.enable_prefix_caching:
            if seq.hashes is None:
                seq.hashes = block_hashes(seq.tokens, block_size)
            # at least the last token is computed: it yields the logits of the next one
            hit = pool.lookup(seq.hashes, (target - 1) // block_size)
        needed = _blocks_for(target, block_size) - len(hit)
        if needed > pool.num_free - pool.num_evictable_in(hit):
            return False
        pool.take(hit)
        new = pool.allocate(needed)
        assert new is not None
        seq.blocks = hit + new
        seq.num_computed = len(hit) * block_size
        seq.registered = len(hit)
        seq.state = RUNNING
        if self.enable_prefix_caching and seq.num_preemptions == 0:
            self.stats.queries += target
            self.stats.hits += seq.num_computed
            seq.cached_tokens = seq.num_computed
        return True

    def _chunk(self, seq: Sequence, budget: int, batch: Batch) -> int:
        """Schedule the next chunk of ``seq``'s prefill; name the full blocks it completes (as
        vLLM, at scheduling time, so a request arriving next step can already hit them)."""
        chunk = min(seq.target - seq.num_computed, budget)
        batch.prefills.append((seq, chunk))
        if self.enable_prefix_caching and seq.hashes:
            full = min((seq.num_computed + chunk) // self.block_size, len(seq.hashes))
            for index in range(seq.registered, full):
                self.pool.cache(seq.blocks[index], seq.hashes[index])
            seq.registered = max(seq.registered, full)
        return chunk
