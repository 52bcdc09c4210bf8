"""Speed profiles: the step engine's settings for a model on a GPU, from published vLLM
figures (sources and arithmetic in docs/simulator.md, "Speed profiles")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    summary: str
    step_ms: float                 # fixed cost of an engine step (weights read once per step)
    step_ms_per_token: float       # cost of each batched token (prefill compute, decode attention)
    max_num_batched_tokens: int
    max_num_seqs: int
    kv_cache_tokens: int
    ttft_ms: float = 0.0           # no extra per-request hold: TTFT comes from the steps alone
    slowdown_per_seq: float = 0.0  # the per-token cost already models batching


PROFILES = {p.name: p for p in (
    Profile(
        name="llama-3.1-8b-h100",
        summary="Llama-3.1-8B-Instruct, BF16, one H100 80GB SXM, vLLM V1 defaults",
        step_ms=6.0, step_ms_per_token=0.06,
        max_num_batched_tokens=8192, max_num_seqs=1024, kv_cache_tokens=400_000),
)}
