"""Scaling settings (read and checked at start) and the policy: a pure function of a
model's load and history → desired replicas.

Inputs per model (from the workers' heartbeats): global queue depth, the worst p95 TTFT
(over the agents' scaling window), mean GPU utilisation and the number of routable
replicas. The policy

- scales up when the queue per replica is above target, or p95 TTFT breaks the SLO, or
  GPUs are saturated — by the largest step any of these signals asks for;
- scales down by one only when every signal is comfortably low (below a lower band:
  hysteresis) for ``scale_down_stable_s``, draining the least-loaded worker;
- respects min/max bounds, separate scale-up / scale-down cool-downs, and holds an action
  whose last actuation failed for ``failure_backoff_s``.

Nothing here touches a socket or a clock: ``now`` is passed in, so the unit tests can
walk it through time. What happens around a decision is ``scaler.py`` (docs/scaling.md).
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
from dataclasses import asdict, dataclass, field, replace

from gpufleet.common.config import ConfigError, Env, redact_url

ACTUATORS = ("log", "webhook", "command")


@dataclass(frozen=True)
class ScalingSettings:
    enabled: bool = True
    interval_s: float = 30.0
    min_replicas: int = 1
    max_replicas: int = 8
    target_queue_per_replica: float = 4.0
    ttft_slo_ms: float = 2000.0
    gpu_util_high: float = 90.0
    gpu_util_low: float = 30.0
    # scale down only below this fraction of the targets (hysteresis band)
    low_water_fraction: float = 0.3
    scale_up_cooldown_s: float = 120.0
    scale_down_cooldown_s: float = 600.0
    scale_down_stable_s: float = 300.0
    actuator: str = "log"
    webhook_url: str | None = None
    command: str | None = None
    # a scale-down waits this long for the drained worker's in-flight requests to finish
    drain_timeout_s: float = 600.0
    # the webhook call or the command is stopped (its whole process group killed) after this
    actuation_timeout_s: float = 600.0
    # after a failed actuation, the same action of that model waits this long
    failure_backoff_s: float = 300.0
    # a failed scale-down returns its drained worker to service
    undrain_on_failure: bool = True

    @property
    def advisory(self) -> bool:
        """The ``log`` actuator only reports: nothing is drained, started or stopped."""
        return self.actuator == "log"

    @property
    def command_argv(self) -> list[str]:
        return shlex.split(self.command or "")

    def as_dict(self) -> dict:
        out = asdict(self)
        if out["webhook_url"]:
            out["webhook_url"] = redact_url(out["webhook_url"])
        out["advisory"] = self.advisory
        return out

    @classmethod
    def from_env(cls, env: Env) -> ScalingSettings:
        settings = cls(
            enabled=env.bool("GPUFLEET_SCALING_ENABLED", True),
            interval_s=env.float("GPUFLEET_SCALING_INTERVAL_S", 30.0, minimum=0.1),
            min_replicas=env.int("GPUFLEET_SCALING_MIN_REPLICAS", 1, minimum=0),
            max_replicas=env.int("GPUFLEET_SCALING_MAX_REPLICAS", 8, minimum=0),
            target_queue_per_replica=env.float("GPUFLEET_SCALING_TARGET_QUEUE", 4.0, minimum=0.1),
            ttft_slo_ms=env.float("GPUFLEET_SCALING_TTFT_SLO_MS", 2000.0, minimum=1),
            gpu_util_high=env.float("GPUFLEET_SCALING_GPU_UTIL_HIGH", 90.0, minimum=1, maximum=100),
            gpu_util_low=env.float("GPUFLEET_SCALING_GPU_UTIL_LOW", 30.0, minimum=0, maximum=100),
            low_water_fraction=env.float("GPUFLEET_SCALING_LOW_WATER", 0.3, minimum=0, maximum=1),
            scale_up_cooldown_s=env.float("GPUFLEET_SCALING_UP_COOLDOWN_S", 120.0, minimum=0),
            scale_down_cooldown_s=env.float("GPUFLEET_SCALING_DOWN_COOLDOWN_S", 600.0, minimum=0),
            scale_down_stable_s=env.float("GPUFLEET_SCALING_DOWN_STABLE_S", 300.0, minimum=0),
            actuator=(env.str("GPUFLEET_SCALING_ACTUATOR", "log") or "log").lower(),
            webhook_url=env.url("GPUFLEET_SCALING_WEBHOOK_URL", example="http://ops.internal/scale"),
            command=env.str("GPUFLEET_SCALING_COMMAND"),
            drain_timeout_s=env.float("GPUFLEET_SCALING_DRAIN_TIMEOUT_S", 600.0, minimum=0, maximum=86400),
            actuation_timeout_s=env.float("GPUFLEET_SCALING_ACTUATION_TIMEOUT_S", 600.0, minimum=0.1,
                                          maximum=86400),
            failure_backoff_s=env.float("GPUFLEET_SCALING_FAILURE_BACKOFF_S", 300.0, minimum=0, maximum=86400),
            undrain_on_failure=env.bool("GPUFLEET_SCALING_UNDRAIN_ON_FAILURE", True),
        )
        if settings.actuator not in ACTUATORS:
            raise ConfigError(f"GPUFLEET_SCALING_ACTUATOR={settings.actuator!r} is unknown: "
                              f"set it to one of {', '.join(ACTUATORS)}")
        if settings.actuator == "webhook" and not settings.webhook_url:
            raise ConfigError("GPUFLEET_SCALING_ACTUATOR=webhook needs GPUFLEET_SCALING_WEBHOOK_URL, "
                              "e.g. http://ops.internal:9000/scale")
        if settings.actuator == "command":
            check_command(settings.command)
        if settings.max_replicas < settings.min_replicas:
            raise ConfigError("GPUFLEET_SCALING_MAX_REPLICAS is below GPUFLEET_SCALING_MIN_REPLICAS")
        if settings.enabled and settings.min_replicas == 0:
            raise ConfigError("GPUFLEET_SCALING_MIN_REPLICAS=0 is not supported: a model without workers "
                              "reports no load (queue, TTFT and GPU figures come from the workers), so "
                              "nothing would ever scale it back up; set it to 1 or more")
        if settings.gpu_util_low >= settings.gpu_util_high:
            raise ConfigError("GPUFLEET_SCALING_GPU_UTIL_LOW must be below GPUFLEET_SCALING_GPU_UTIL_HIGH")
        return settings


def describe(settings: ScalingSettings) -> str:
    """One line for the reconciler's start-up log."""
    if not settings.enabled:
        return "off"
    actuator = {"log": "log (advisory: nothing is drained or started)",
                "webhook": f"webhook {redact_url(settings.webhook_url or '')}",
                "command": f"command {settings.command!r}"}[settings.actuator]
    return (f"on, every {settings.interval_s:g}s, replicas {settings.min_replicas}..{settings.max_replicas}, "
            f"actuator {actuator}, target queue/replica {settings.target_queue_per_replica:g}, "
            f"TTFT SLO {settings.ttft_slo_ms:g} ms, GPU util {settings.gpu_util_low:g}..{settings.gpu_util_high:g}%, "
            f"cool-downs up {settings.scale_up_cooldown_s:g}s down {settings.scale_down_cooldown_s:g}s, "
            f"stable {settings.scale_down_stable_s:g}s, drain timeout {settings.drain_timeout_s:g}s, "
            f"actuation timeout {settings.actuation_timeout_s:g}s, failure back-off {settings.failure_backoff_s:g}s, "
            f"undrain on failure {'yes' if settings.undrain_on_failure else 'no'}")


def check_command(command: str | None) -> None:
    """The command line must split like a shell line and name an executable that exists
    now, not after the first drain."""
    name = "GPUFLEET_SCALING_COMMAND"
    if not command:
        raise ConfigError(f"GPUFLEET_SCALING_ACTUATOR=command needs {name}, e.g. "
                          "'ansible-playbook -i inventory playbooks/scale.yml'")
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(f"{name} cannot be parsed ({exc}): it is split like a shell line "
                          "(no shell runs it), so balance its quotes") from None
    if not argv:
        raise ConfigError(f"{name} is empty: set it to a command line")
    program = argv[0]
    if os.sep in program:
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise ConfigError(f"{name}: {program!r} is not an executable file: fix the path or chmod +x it")
    elif shutil.which(program) is None:
        raise ConfigError(f"{name}: {program!r} is not found on PATH: give its full path or install it")


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    queue_depth: float = 0
    running: float = 0
    gpu_util: float = 0
    ttft_p95_ms: float = 0


@dataclass(frozen=True)
class ModelLoad:
    model_id: str
    workers: tuple[WorkerLoad, ...] = ()

    @property
    def replicas(self) -> int:
        return len(self.workers)

    @property
    def queue_depth(self) -> float:
        return sum(w.queue_depth for w in self.workers)

    @property
    def ttft_p95_ms(self) -> float:
        return max((w.ttft_p95_ms for w in self.workers), default=0.0)

    @property
    def gpu_util(self) -> float:
        return sum(w.gpu_util for w in self.workers) / len(self.workers) if self.workers else 0.0


@dataclass(frozen=True)
class ScalingState:
    """What the policy remembers between cycles, per model (persisted in ``scaling_state``
    together with each decision, so a new leader continues where the last one stopped)."""

    last_scale_up_at: float | None = None
    last_scale_down_at: float | None = None
    low_since: float | None = None
    # the replicas the last scale action asked for: "desired" until it is reached or its
    # cool-down ends, so a "none" decision in between does not pretend the target is current
    target_replicas: int | None = None
    # after a failed actuation, that action waits until backoff_until
    backoff_action: str | None = None
    backoff_until: float | None = None


@dataclass(frozen=True)
class Decision:
    model_id: str
    current_replicas: int
    desired_replicas: int
    action: str  # none | scale_up | scale_down
    reason: str
    drain_worker_id: str | None = None
    inputs: dict = field(default_factory=dict)


def least_loaded(workers: tuple[WorkerLoad, ...]) -> str | None:
    """The worker a scale-down drains: the fewest running + queued requests, then the
    lowest GPU utilisation, then the id (deterministic)."""
    if not workers:
        return None
    return min(workers, key=lambda w: (w.running + w.queue_depth, w.gpu_util, w.worker_id)).worker_id


def decide(load: ModelLoad, state: ScalingState, settings: ScalingSettings,
           now: float) -> tuple[Decision, ScalingState]:
    """The policy, then the failure back-off: an action that failed lately is held."""
    decision, new_state = _decide(load, state, settings, now)
    if (decision.action != "none" and decision.action == state.backoff_action
            and state.backoff_until is not None and now < state.backoff_until):
        held = Decision(decision.model_id, decision.current_replicas, decision.current_replicas, "none",
                        f"{decision.action} held: the last one failed, backing off for "
                        f"{state.backoff_until - now:.0f}s more ({decision.reason})", None, decision.inputs)
        # the quiet streak goes on counting while a scale-down is held
        return held, replace(state, low_since=new_state.low_since if decision.action != "scale_down"
                             else (state.low_since if state.low_since is not None else now))
    return decision, new_state


def _decide(load: ModelLoad, state: ScalingState, settings: ScalingSettings,
            now: float) -> tuple[Decision, ScalingState]:
    current = load.replicas
    inputs = {"queue_depth": load.queue_depth, "ttft_p95_ms": load.ttft_p95_ms,
              "gpu_util": round(load.gpu_util, 2), "replicas": current}
    lo, hi = settings.min_replicas, settings.max_replicas

    def result(desired: int, action: str, reason: str, new_state: ScalingState, drain: str | None = None):
        if action == "none":
            desired = _pending_target(new_state, settings, current, now) or desired
        else:
            new_state = replace(new_state, target_replicas=desired)
        return Decision(load.model_id, current, desired, action, reason, drain, inputs), new_state

    # bounds first: below the minimum (e.g. a worker died) or above the maximum
    if current < lo:
        if _cooling(state.last_scale_up_at, settings.scale_up_cooldown_s, now):
            return result(current, "none", f"below min_replicas={lo}, scale-up cooling down", state)
        return result(lo, "scale_up", f"below min_replicas={lo}",
                      replace(state, last_scale_up_at=now, low_since=None))
    if current > hi:
        if _cooling(state.last_scale_down_at, settings.scale_down_cooldown_s, now):
            return result(current, "none", f"above max_replicas={hi}, scale-down cooling down", state)
        return result(current - 1, "scale_down", f"above max_replicas={hi}",
                      replace(state, last_scale_down_at=now, low_since=None), least_loaded(load.workers))

    per_replica = load.queue_depth / max(current, 1)
    pressure, steps = [], []
    # each signal asks for enough replicas to bring it back to its target (as Kubernetes'
    # HPA does: ceil(current × value / target)); the largest ask wins
    if per_replica > settings.target_queue_per_replica:
        pressure.append(f"queue/replica {per_replica:.1f} > {settings.target_queue_per_replica:g}")
        steps.append(math.ceil(load.queue_depth / settings.target_queue_per_replica) - current)
    if load.ttft_p95_ms > settings.ttft_slo_ms:
        pressure.append(f"p95 TTFT {load.ttft_p95_ms:.0f} ms > SLO {settings.ttft_slo_ms:g} ms")
        steps.append(math.ceil(current * load.ttft_p95_ms / settings.ttft_slo_ms) - current)
    if current and load.gpu_util > settings.gpu_util_high:
        pressure.append(f"GPU util {load.gpu_util:.0f}% > {settings.gpu_util_high:g}%")
        steps.append(math.ceil(current * load.gpu_util / settings.gpu_util_high) - current)

    if pressure:
        if current >= hi:
            return result(current, "none", "under pressure but at max_replicas: " + "; ".join(pressure),
                          replace(state, low_since=None))
        if _cooling(state.last_scale_up_at, settings.scale_up_cooldown_s, now):
            return result(current, "none", "scale-up cooling down: " + "; ".join(pressure),
                          replace(state, low_since=None))
        desired = min(hi, current + max(1, *steps))
        return result(desired, "scale_up", "; ".join(pressure), replace(state, last_scale_up_at=now, low_since=None))

    low = settings.low_water_fraction
    quiet = (per_replica <= settings.target_queue_per_replica * low
             and load.ttft_p95_ms <= settings.ttft_slo_ms * max(low, 0.5)
             and load.gpu_util < settings.gpu_util_low)
    if not quiet or current <= lo:
        # between the bands: hold, and forget any quiet streak (hysteresis)
        why = "at min_replicas" if quiet else "load within band"
        return result(current, "none", why, replace(state, low_since=state.low_since if quiet else None))
    low_since = state.low_since if state.low_since is not None else now
    held = replace(state, low_since=low_since)
    if now - low_since < settings.scale_down_stable_s:
        return result(current, "none", f"quiet for {now - low_since:.0f}s of {settings.scale_down_stable_s:g}s", held)
    if _cooling(state.last_scale_down_at, settings.scale_down_cooldown_s, now) or _cooling(
            state.last_scale_up_at, settings.scale_down_cooldown_s, now):
        return result(current, "none", "quiet, scale-down cooling down", held)
    return result(current - 1, "scale_down", "quiet: queue, TTFT and GPU util below the low-water marks",
                  replace(state, last_scale_down_at=now, low_since=None), least_loaded(load.workers))


def _pending_target(state: ScalingState, settings: ScalingSettings, current: int, now: float) -> int | None:
    """The target of the last scale action while it is still being reached."""
    if state.target_replicas is None or state.target_replicas == current:
        return None
    last_up, last_down = state.last_scale_up_at or 0.0, state.last_scale_down_at or 0.0
    if last_up >= last_down:
        return state.target_replicas if _cooling(state.last_scale_up_at, settings.scale_up_cooldown_s, now) else None
    return state.target_replicas if _cooling(state.last_scale_down_at, settings.scale_down_cooldown_s, now) else None


def _cooling(last: float | None, cooldown_s: float, now: float) -> bool:
    return last is not None and now - last < cooldown_s
