"""The step scheduler and the KV block pool, without asyncio: admission, chunked prefill,
prefix-cache hits, LRU eviction, preemption."""

import pytest

from gpufleet.sim.kvcache import BlockPool, block_hashes
from gpufleet.sim.scheduler import RUNNING, WAITING, Sequence, StepScheduler


def toks(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def scheduler(blocks=64, seqs=8, budget=8192, caching=True) -> StepScheduler:
    return StepScheduler(BlockPool(blocks), block_size=16, max_num_seqs=seqs, max_num_batched_tokens=budget,
                         enable_prefix_caching=caching)


def step(s: StepScheduler, now: float = 0.0):
    """One step, completed at once: what the engine does at the end of a step."""
    batch = s.schedule(now)
    for seq, chunk in batch.prefills:
        seq.num_computed += chunk
        if not seq.prefilling:
            seq.generated += 1
    for seq in batch.decodes:
        seq.num_computed += 1
        seq.generated += 1
    return batch


def test_block_hashes_chain_full_blocks_and_agree_across_calls():
    a = block_hashes(toks("t", 40), 16)
    assert len(a) == 2                                     # the partial third block has no hash
    assert a == block_hashes(toks("t", 40), 16)            # same tokens, same hashes: no salt
    b = block_hashes(["x"] + toks("t", 40)[1:], 16)
    assert b[0] != a[0] and b[1] != a[1]                   # a block's hash names its whole prefix


def test_repeated_prompt_hits_all_but_the_last_token_and_skips_that_prefill():
    s = scheduler()
    first = Sequence(toks("p", 40))
    s.add(first)
    assert [c for _, c in step(s).prefills] == [40]
    s.finish(first)
    again = Sequence(toks("p", 40))
    s.add(again)
    assert [c for _, c in step(s).prefills] == [8]        # 2 blocks (32 tokens) cached
    assert (s.stats.queries, s.stats.hits) == (80, 32)
    # a prompt of exactly two blocks recomputes its last token: one block hit, 17 computed
    s.finish(again)
    exact = Sequence(toks("p", 32))
    s.add(exact)
    assert [c for _, c in step(s).prefills] == [16] and exact.cached_tokens == 16


def test_partial_hit_on_a_shared_prefix_then_divergence():
    s = scheduler()
    system = toks("sys", 48)
    a = Sequence(system + toks("a", 20))
    s.add(a)
    step(s)
    b = Sequence(system + toks("b", 20))
    s.add(b)                                               # a still running: its blocks are shared
    batch = step(s)
    assert (b, 20) in batch.prefills and b.cached_tokens == 48
    assert b.blocks[:3] == a.blocks[:3] and b.blocks[3:] != a.blocks[3:]


def test_freed_blocks_stay_cached_and_the_least_recently_freed_are_evicted_first():
    s = scheduler(blocks=8)
    old, new = Sequence(toks("old", 64)), Sequence(toks("new", 64))
    for seq in (old, new):
        s.add(seq)
        step(s)
        s.finish(seq)
    assert s.pool.num_free == 8 and s.pool.num_cached == 8 and s.pool.usage() == 0
    # a 3-block prompt evicts 3 of old's 4 blocks: its tail first (freed in reverse order)
    s.add(Sequence(toks("x", 48)))
    step(s)
    assert s.pool.lookup(block_hashes(toks("old", 64), 16), 4) != []   # old's head block survives
    assert len(s.pool.lookup(block_hashes(toks("old", 64), 16), 4)) == 1
    assert len(s.pool.lookup(block_hashes(toks("new", 64), 16), 4)) == 4


def test_chunked_prefill_decodes_first_then_prefill_chunks_in_fifo_order():
    s = scheduler(budget=100)
    short = Sequence(toks("s", 10))
    s.add(short)
    step(s)                                               # prefilled: decoding from now on
    long1, long2 = Sequence(toks("l", 150)), Sequence(toks("m", 150))
    s.add(long1)
    s.add(long2)
    batch = step(s)
    assert batch.decodes == [short] and batch.prefills == [(long1, 99)] and batch.tokens == 100
    assert long2.state == RUNNING                         # admitted (blocks reserved), no budget left
    batch = step(s)
    assert batch.decodes == [short] and batch.prefills == [(long1, 51), (long2, 48)]
    batch = step(s)
    assert batch.decodes == [short, long1] and batch.prefills == [(long2, 98)]


def test_max_num_seqs_bounds_admission_fifo():
    s = scheduler(seqs=2)
    seqs = [Sequence(toks(f"r{i}", 5)) for i in range(4)]
    for seq in seqs:
        s.add(seq)
    step(s)
    assert [q.state for q in seqs] == [RUNNING, RUNNING, WAITING, WAITING]
    s.finish(seqs[1])
    step(s)
    assert seqs[2].state == RUNNING and seqs[3].state == WAITING


def test_admission_waits_for_the_prompts_blocks_and_nobody_overtakes():
    s = scheduler(blocks=6)
    big = Sequence(toks("big", 64))                        # 4 blocks
    s.add(big)
    step(s)
    blocked, small = Sequence(toks("b", 48)), Sequence(toks("s", 5))   # 3 blocks, then 1
    s.add(blocked)
    s.add(small)
    step(s)
    assert blocked.state == WAITING and small.state == WAITING          # FIFO: small waits behind
    s.finish(big)
    step(s)
    assert blocked.state == RUNNING and small.state == RUNNING


def test_a_decode_without_a_free_block_preempts_the_latest_admitted():
    s = scheduler(blocks=4)
    a, b = Sequence(toks("a", 32)), Sequence(toks("b", 32))   # 2 full blocks each: KV is full
    s.add(a)
    s.add(b)
    step(s)
    assert s.pool.num_free == 0
    batch = step(s)                                        # a needs a 3rd block: b is preempted
    assert batch.preempted == [b] and batch.decodes == [a]
    assert b.state == WAITING and s.waiting[0] is b and b.num_computed == 0
    assert b.target == 33                                  # recompute the prompt and its first token
    assert s.stats.preemptions == 1
    s.finish(a)
    batch = step(s)
    assert b.state == RUNNING and b.cached_tokens == 0     # resumed (hits of preempted requests are not counted)
    assert s.stats.queries == 64


def test_no_prefix_caching_computes_everything():
    s = scheduler(caching=False)
    for _ in range(2):
        seq = Sequence(toks("p", 40))
        s.add(seq)
        assert [c for _, c in step(s).prefills] == [40]
        s.finish(seq)
    assert (s.stats.queries, s.stats.hits) == (0, 0)      # vLLM counts no queries when caching is off


def test_held_sequences_are_admitted_but_not_scheduled_until_ready():
    s = scheduler()
    seq = Sequence(toks("h", 10), hold=0.5)
    s.add(seq)
    batch = s.schedule(now=10.0)
    assert seq.state == RUNNING and batch.tokens == 0 and batch.next_ready == 10.5
    assert s.schedule(now=10.5).prefills == [(seq, 10)]


def test_pool_refuses_more_blocks_than_free():
    pool = BlockPool(2)
    assert pool.allocate(3) is None
    assert pool.allocate(2) is not None and pool.usage() == 1.0
    with pytest.raises(ValueError):
        BlockPool(0)
