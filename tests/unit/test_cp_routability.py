"""What "routable" means (DESIGN.md, Health checks), as a pure function."""

import pytest

from gpufleet.controlplane.routability import assess

BASE = {"status": "ready", "desired_status": None, "heartbeat_age_s": 1.0, "last_probe_ok": True,
        "retired": False, "stale_after_s": 30.0}


def verdict(**changes):
    return assess(**{**BASE, **changes})


def test_fresh_ready_probed_worker_is_routable():
    v = verdict()
    assert v.routable and v.health == "routable" and v.event == "ready"


@pytest.mark.parametrize("changes, health, event", [
    ({"retired": True}, "retired", "removed"),
    ({"desired_status": "draining"}, "draining", "draining"),
    ({"status": "draining"}, "draining", "draining"),
    ({"heartbeat_age_s": None}, "no_heartbeat", "unready"),
    ({"heartbeat_age_s": 30.01}, "stale", "unready"),
    ({"status": "starting"}, "starting", "unready"),
    ({"last_probe_ok": None}, "unprobed", "unready"),
    ({"last_probe_ok": False}, "probe_failed", "unready"),
])
def test_each_condition_alone_makes_a_worker_unroutable(changes, health, event):
    v = verdict(**changes)
    assert not v.routable and v.health == health and v.event == event


def test_staleness_boundary_is_three_intervals():
    assert verdict(heartbeat_age_s=29.99).routable
    assert not verdict(heartbeat_age_s=30.5).routable


def test_undrain_request_does_not_block_routing():
    assert verdict(desired_status="ready").routable


def test_retired_wins_over_everything():
    assert verdict(retired=True, status="draining", last_probe_ok=False).health == "retired"
