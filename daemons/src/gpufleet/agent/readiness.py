"""The readiness verdict of DESIGN.md, as a pure function of what the agent knows."""

from __future__ import annotations

from dataclasses import dataclass

STARTING, READY, DRAINING = "starting", "ready", "draining"
STATUSES = (STARTING, READY, DRAINING)


@dataclass(frozen=True)
class Inputs:
    vllm_healthy: bool
    vllm_detail: str
    poll_stale: bool
    model_listed: bool
    model_detail: str
    warmed: bool
    warmup_detail: str
    token_held: bool
    registration_accepted: bool
    registration_detail: str
    draining: bool
    drain_detail: str = ""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def checks(i: Inputs) -> list[Check]:
    """Every condition, in the order a worker comes up; all must hold to be ready."""
    health_ok = i.vllm_healthy and not i.poll_stale
    health_detail = "vLLM not polled recently (poller stuck or not started)" if i.poll_stale else i.vllm_detail
    return [
        Check("vllm_health", health_ok, "ok" if health_ok else health_detail),
        Check("model_listed", health_ok and i.model_listed, i.model_detail if health_ok else "vLLM not healthy"),
        Check("warmup", health_ok and i.warmed, i.warmup_detail),
        Check("token", i.token_held, "ok" if i.token_held else "no worker token held yet"),
        Check("registration", i.registration_accepted,
              "ok" if i.registration_accepted else i.registration_detail),
        Check("not_draining", not i.draining, "ok" if not i.draining else (i.drain_detail or "draining")),
    ]


def local_status(i: Inputs) -> str:
    """The status reported in heartbeats: what the worker itself can vouch for."""
    if i.draining:
        return DRAINING
    if i.vllm_healthy and not i.poll_stale and i.model_listed and i.warmed:
        return READY
    return STARTING


def verdict(i: Inputs) -> tuple[bool, list[Check]]:
    all_checks = checks(i)
    return all(c.ok for c in all_checks), all_checks
