"""The scaling policy: bounds, cool-downs, hysteresis, least-loaded drain choice, steps, back-off."""

import pytest

from gpufleet.common.config import ConfigError, Env
from gpufleet.controlplane.scaling import (
    ModelLoad,
    ScalingSettings,
    ScalingState,
    WorkerLoad,
    decide,
    least_loaded,
)

S = ScalingSettings(min_replicas=1, max_replicas=4, target_queue_per_replica=4, ttft_slo_ms=1000,
                    gpu_util_high=90, gpu_util_low=30, low_water_fraction=0.3, scale_up_cooldown_s=60,
                    scale_down_cooldown_s=300, scale_down_stable_s=120)


def load(*workers):
    return ModelLoad("m", tuple(WorkerLoad(f"w{i}", *w) for i, w in enumerate(workers)))


def test_queue_pressure_scales_up_enough_for_the_queue_within_max():
    d, state = decide(load((10, 4, 50, 200), (10, 4, 50, 200)), ScalingState(), S, now=1000)
    assert d.action == "scale_up" and d.current_replicas == 2 and d.desired_replicas == 4  # 20 queued / 4 = 5 > max
    assert state.last_scale_up_at == 1000 and "queue/replica" in d.reason


def test_ttft_slo_and_gpu_saturation_each_scale_up_by_one():
    d, _ = decide(load((0, 1, 50, 1500)), ScalingState(), S, now=0)
    assert (d.action, d.desired_replicas) == ("scale_up", 2) and "TTFT" in d.reason
    d, _ = decide(load((0, 1, 95, 100)), ScalingState(), S, now=0)
    assert (d.action, d.desired_replicas) == ("scale_up", 2) and "GPU util" in d.reason


def test_scale_up_cooldown_and_max_bound():
    pressed = load((0, 1, 50, 1500))
    d, state = decide(pressed, ScalingState(last_scale_up_at=990), S, now=1000)
    assert d.action == "none" and "cooling down" in d.reason
    d, _ = decide(pressed, state, S, now=1051)
    assert d.action == "scale_up"
    full = load(*[(0, 1, 95, 5000)] * 4)
    d, _ = decide(full, ScalingState(), S, now=0)
    assert d.action == "none" and "max_replicas" in d.reason


def test_below_min_scales_up_to_min_even_when_idle():
    d, _ = decide(ModelLoad("m", ()), ScalingState(), S, now=0)
    assert (d.action, d.current_replicas, d.desired_replicas) == ("scale_up", 0, 1)


def test_scale_down_needs_a_stable_quiet_period_and_drains_the_least_loaded():
    quiet = load((0, 3, 10, 100), (0, 0, 5, 50), (1, 0, 10, 80))
    state = ScalingState()
    d, state = decide(quiet, state, S, now=0)
    assert d.action == "none" and state.low_since == 0
    d, state = decide(quiet, state, S, now=100)
    assert d.action == "none" and "quiet for 100s" in d.reason
    d, state = decide(quiet, state, S, now=121)
    assert (d.action, d.desired_replicas, d.drain_worker_id) == ("scale_down", 2, "w1")
    assert state.last_scale_down_at == 121 and state.low_since is None


def test_hysteresis_a_load_between_the_bands_resets_the_quiet_streak_and_holds():
    quiet = load((0, 0, 5, 50), (0, 0, 5, 50))
    middling = load((3, 2, 60, 400), (3, 2, 60, 400))  # below the scale-up targets, above the low-water marks
    _, state = decide(quiet, ScalingState(), S, now=0)
    d, state = decide(middling, state, S, now=60)
    assert d.action == "none" and state.low_since is None
    _, state = decide(quiet, state, S, now=100)
    d, _ = decide(quiet, state, S, now=200)  # only 100 s quiet since the reset
    assert d.action == "none"


def test_scale_down_cooldown_after_a_scale_up():
    quiet = load((0, 0, 5, 50), (0, 0, 5, 50))
    d, _ = decide(quiet, ScalingState(last_scale_up_at=0, low_since=0), S, now=200)
    assert d.action == "none" and "cooling down" in d.reason
    d, _ = decide(quiet, ScalingState(last_scale_up_at=0, low_since=0), S, now=301)
    assert d.action == "scale_down"


def test_never_below_min():
    d, _ = decide(load((0, 0, 0, 0)), ScalingState(low_since=0), S, now=10_000)
    assert d.action == "none" and "min_replicas" in d.reason


def test_least_loaded_is_deterministic():
    workers = (WorkerLoad("b", 0, 1, 10), WorkerLoad("a", 0, 1, 10), WorkerLoad("c", 0, 0, 90))
    assert least_loaded(workers) == "c"
    assert least_loaded(workers[:2]) == "a"
    assert least_loaded(()) is None


def test_settings_validation():
    assert ScalingSettings.from_env(Env({})).actuator == "log"
    for env, message in [({"GPUFLEET_SCALING_ACTUATOR": "magic"}, "one of log, webhook, command"),
                         ({"GPUFLEET_SCALING_ACTUATOR": "webhook"}, "GPUFLEET_SCALING_WEBHOOK_URL"),
                         ({"GPUFLEET_SCALING_ACTUATOR": "command"}, "GPUFLEET_SCALING_COMMAND"),
                         ({"GPUFLEET_SCALING_MIN_REPLICAS": "5", "GPUFLEET_SCALING_MAX_REPLICAS": "2"}, "below")]:
        try:
            ScalingSettings.from_env(Env(env))
        except ConfigError as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"{env} was accepted")


def test_the_largest_step_any_signal_asks_for_wins():
    # 5 replicas, TTFT at 1.8 × SLO asks for ceil(5 × 1.8) = 9; the queue (24 / 4) asks for 6
    wide = ScalingSettings(**{**S.__dict__, "max_replicas": 20})
    workers = [(24 / 5, 1, 50, 1800)] * 5
    d, _ = decide(load(*workers), ScalingState(), wide, now=0)
    assert (d.action, d.desired_replicas) == ("scale_up", 9)
    # the same TTFT with a deep queue: the queue's ask (80 / 4 = 20) wins
    d, _ = decide(load(*[(16, 1, 50, 1800)] * 5), ScalingState(), wide, now=0)
    assert d.desired_replicas == 20


def test_a_failed_action_is_held_for_the_backoff_and_the_other_direction_is_not():
    quiet = load((0, 0, 5, 50), (0, 0, 5, 50))
    backing = ScalingState(low_since=0, backoff_action="scale_down", backoff_until=500)
    d, state = decide(quiet, backing, S, now=400)
    assert d.action == "none" and "backing off" in d.reason and d.drain_worker_id is None
    assert state.low_since == 0  # the quiet streak keeps counting
    d, _ = decide(quiet, state, S, now=501)
    assert d.action == "scale_down"
    d, _ = decide(load((0, 1, 50, 1500)), backing, S, now=400)
    assert d.action == "scale_up"


def test_desired_replicas_stays_the_last_actions_target_while_it_is_reached():
    d, state = decide(load((10, 4, 50, 200), (10, 4, 50, 200)), ScalingState(), S, now=1000)
    assert d.desired_replicas == 4 and state.target_replicas == 4
    d, state = decide(load((1, 1, 50, 200), (1, 1, 50, 200), (1, 1, 50, 200)), state, S, now=1010)
    assert d.action == "none" and (d.current_replicas, d.desired_replicas) == (3, 4)
    d, _ = decide(load((1, 1, 50, 200), (1, 1, 50, 200), (1, 1, 50, 200)), state, S, now=1061)  # cool-down over
    assert d.desired_replicas == 3


@pytest.mark.parametrize(("env", "message"), [
    ({"GPUFLEET_SCALING_TARGET_QUEUE": "nan"}, "not a finite number"),
    ({"GPUFLEET_SCALING_TTFT_SLO_MS": "inf"}, "not a finite number"),
    ({"GPUFLEET_SCALING_ACTUATOR": "command", "GPUFLEET_SCALING_COMMAND": "ansible-playbook 'scale.yml"},
     "cannot be parsed"),
    ({"GPUFLEET_SCALING_ACTUATOR": "command", "GPUFLEET_SCALING_COMMAND": "no-such-scaler-program --up"},
     "not found on PATH"),
    ({"GPUFLEET_SCALING_ACTUATOR": "command", "GPUFLEET_SCALING_COMMAND": "/nonexistent/scale.sh"},
     "not an executable file"),
    ({"GPUFLEET_SCALING_MIN_REPLICAS": "0"}, "MIN_REPLICAS=0 is not supported"),
])
def test_bad_settings_are_refused_at_start(env, message):
    with pytest.raises(ConfigError, match=message):
        ScalingSettings.from_env(Env(env))


def test_a_command_is_parsed_and_resolved_at_start():
    settings = ScalingSettings.from_env(Env({"GPUFLEET_SCALING_ACTUATOR": "command",
                                             "GPUFLEET_SCALING_COMMAND": "sh -c 'echo \"scale it\"'"}))
    assert settings.command_argv == ["sh", "-c", 'echo "scale it"']
    assert ScalingSettings.from_env(Env({"GPUFLEET_SCALING_MIN_REPLICAS": "0",
                                         "GPUFLEET_SCALING_ENABLED": "false"})).min_replicas == 0
