"""What "routable" means, as one pure function (DESIGN.md, Health checks).

A worker is routable when its instance is not retired, the operator has not asked it to
drain, its last heartbeat is fresher than 3 × the heartbeat interval and says ``ready``,
and the reconciler's last ``/readyz`` probe passed. The verdict also says which event a
worker leaving the ready set produces (``draining``, ``removed`` or ``unready``).
"""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.common.rediskeys import EVENT_DRAINING, EVENT_READY, EVENT_REMOVED, EVENT_UNREADY


@dataclass(frozen=True)
class Verdict:
    routable: bool
    health: str  # routable | retired | draining | no_heartbeat | stale | starting | unprobed | probe_failed
    event: str   # the event of a transition into this state


def assess(*, status: str | None, desired_status: str | None, heartbeat_age_s: float | None,
           last_probe_ok: bool | None, retired: bool, stale_after_s: float) -> Verdict:
    if retired:
        return Verdict(False, "retired", EVENT_REMOVED)
    if desired_status == "draining" or status == "draining":
        return Verdict(False, "draining", EVENT_DRAINING)
    if heartbeat_age_s is None:
        return Verdict(False, "no_heartbeat", EVENT_UNREADY)
    if heartbeat_age_s > stale_after_s:
        return Verdict(False, "stale", EVENT_UNREADY)
    if status != "ready":
        return Verdict(False, status or "starting", EVENT_UNREADY)
    if last_probe_ok is None:
        return Verdict(False, "unprobed", EVENT_UNREADY)
    if not last_probe_ok:
        return Verdict(False, "probe_failed", EVENT_UNREADY)
    return Verdict(True, "routable", EVENT_READY)


def assess_row(row, stale_after_s: float) -> Verdict:
    """``assess`` for a row of ``store.list_workers`` (a mapping)."""
    return assess(status=row["status"], desired_status=row["desired_status"],
                  heartbeat_age_s=row["heartbeat_age_s"], last_probe_ok=row["last_probe_ok"],
                  retired=row["retired_at"] is not None, stale_after_s=stale_after_s)
