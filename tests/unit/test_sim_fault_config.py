"""Fault selection and the /sim/faults payload."""

import random

import pytest

from gpufleet.sim.faults import FaultConfig, FaultInjector, validate_update


def test_rate_is_honoured_statistically():
    injector = FaultInjector(FaultConfig("error", 0.3), random.Random(0))
    hits = sum(injector.pick(completion=True) == "error" for _ in range(4000))
    assert 0.25 < hits / 4000 < 0.35
    assert injector.injected == hits


def test_scope_completions_spares_probes_and_all_does_not():
    injector = FaultInjector(FaultConfig("hang", 1.0, "completions"), random.Random(0))
    assert injector.pick(completion=False) is None
    assert injector.pick(completion=True) == "hang"
    injector.config = FaultConfig("hang", 1.0, "all")
    assert injector.pick(completion=False) == "hang"


def test_none_or_zero_rate_never_fires():
    assert FaultInjector(FaultConfig("none", 1.0), random.Random(0)).pick(True) is None
    assert FaultInjector(FaultConfig("error", 0.0), random.Random(0)).pick(True) is None


def test_partial_updates_and_validation():
    config = validate_update(FaultConfig(), {"mode": "slow", "rate": 1})
    assert config == FaultConfig("slow", 1.0, "completions")
    assert validate_update(config, {"scope": "all"}).mode == "slow"
    for bad in ({"mode": "explode"}, {"rate": 2}, {"rate": "1"}, {"rate": True}, {"scope": "x"},
                {"other": 1}, [1]):
        with pytest.raises(ValueError):
            validate_update(config, bad)
