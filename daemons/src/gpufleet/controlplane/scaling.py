"""The scaling policy: a pure function of a model's load and history → desired replicas.

Inputs per model (from the workers' heartbeats): global queue depth, the worst p95 TTFT,
mean GPU utilisation and the number of routable replicas. The policy

- scales up by one (or more, when the queue is far above target) when the queue per
  replica is above target, or p95 TTFT breaks the SLO, or GPUs are saturated;
- scales down by one only when every signal is comfortably low (below a lower band:
  hysteresis) for ``scale_down_stable_s``, draining the least-loaded worker;
- respects min/max bounds and separate scale-up / scale-down cool-downs.

Nothing here touches a socket or a clock: ``now`` is passed in, so the unit tests can
walk it through time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from gpufleet.common.config import ConfigError, Env

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

    def as_dict(self) -> dict:
        return asdict(self)

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
        )
        if settings.actuator not in ACTUATORS:
            raise ConfigError(f"GPUFLEET_SCALING_ACTUATOR={settings.actuator!r} is unknown: "
                              f"set it to one of {', '.join(ACTUATORS)}")
        if settings.actuator == "webhook" and not settings.webhook_url:
            raise ConfigError("GPUFLEET_SCALING_ACTUATOR=webhook needs GPUFLEET_SCALING_WEBHOOK_URL, "
                              "e.g. http://ops.internal:9000/scale")
        if settings.actuator == "command" and not settings.command:
            raise ConfigError("GPUFLEET_SCALING_ACTUATOR=command needs GPUFLEET_SCALING_COMMAND, e.g. "
                              "'ansible-playbook -i inventory playbooks/scale.yml'")
        if settings.max_replicas < settings.min_replicas:
            raise ConfigError("GPUFLEET_SCALING_MAX_REPLICAS is below GPUFLEET_SCALING_MIN_REPLICAS")
        if settings.gpu_util_low >= settings.gpu_util_high:
            raise ConfigError("GPUFLEET_SCALING_GPU_UTIL_LOW must be below GPUFLEET_SCALING_GPU_UTIL_HIGH")
        return settings


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
    """What the policy remembers between cycles, per model."""

    last_scale_up_at: float | None = None
    last_scale_down_at: float | None = None
    low_since: float | None = None


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
    current = load.replicas
    inputs = {"queue_depth": load.queue_depth, "ttft_p95_ms": load.ttft_p95_ms,
              "gpu_util": round(load.gpu_util, 2), "replicas": current}
    lo, hi = settings.min_replicas, settings.max_replicas

    def result(desired: int, action: str, reason: str, new_state: ScalingState, drain: str | None = None):
        return Decision(load.model_id, current, desired, action, reason, drain, inputs), new_state

    # bounds first: below the minimum (e.g. a worker died) or above the maximum
    if current < lo:
        if _cooling(state.last_scale_up_at, settings.scale_up_cooldown_s, now):
            return result(current, "none", f"below min_replicas={lo}, scale-up cooling down", state)
        return result(lo, "scale_up", f"below min_replicas={lo}",
                      ScalingState(now, state.last_scale_down_at, None))
    if current > hi:
        if _cooling(state.last_scale_down_at, settings.scale_down_cooldown_s, now):
            return result(current, "none", f"above max_replicas={hi}, scale-down cooling down", state)
        return result(current - 1, "scale_down", f"above max_replicas={hi}",
                      ScalingState(state.last_scale_up_at, now, None), least_loaded(load.workers))

    per_replica = load.queue_depth / max(current, 1)
    pressure = []
    if per_replica > settings.target_queue_per_replica:
        pressure.append(f"queue/replica {per_replica:.1f} > {settings.target_queue_per_replica:g}")
    if load.ttft_p95_ms > settings.ttft_slo_ms:
        pressure.append(f"p95 TTFT {load.ttft_p95_ms:.0f} ms > SLO {settings.ttft_slo_ms:g} ms")
    if current and load.gpu_util > settings.gpu_util_high:
        pressure.append(f"GPU util {load.gpu_util:.0f}% > {settings.gpu_util_high:g}%")

    if pressure:
        if current >= hi:
            return result(current, "none", "under pressure but at max_replicas: " + "; ".join(pressure),
                          ScalingState(state.last_scale_up_at, state.last_scale_down_at, None))
        if _cooling(state.last_scale_up_at, settings.scale_up_cooldown_s, now):
            return result(current, "none", "scale-up cooling down: " + "; ".join(pressure),
                          ScalingState(state.last_scale_up_at, state.last_scale_down_at, None))
        step = 1
        if per_replica > settings.target_queue_per_replica:
            needed = math.ceil(load.queue_depth / settings.target_queue_per_replica)
            step = max(1, needed - current)
        desired = min(hi, current + step)
        return result(desired, "scale_up", "; ".join(pressure),
                      ScalingState(now, state.last_scale_down_at, None))

    low = settings.low_water_fraction
    quiet = (per_replica <= settings.target_queue_per_replica * low
             and load.ttft_p95_ms <= settings.ttft_slo_ms * max(low, 0.5)
             and load.gpu_util < settings.gpu_util_low)
    if not quiet or current <= lo:
        # between the bands: hold, and forget any quiet streak (hysteresis)
        why = "at min_replicas" if quiet else "load within band"
        return result(current, "none", why, ScalingState(state.last_scale_up_at, state.last_scale_down_at,
                                                         state.low_since if quiet else None))
    low_since = state.low_since if state.low_since is not None else now
    held = ScalingState(state.last_scale_up_at, state.last_scale_down_at, low_since)
    if now - low_since < settings.scale_down_stable_s:
        return result(current, "none", f"quiet for {now - low_since:.0f}s of {settings.scale_down_stable_s:g}s", held)
    if _cooling(state.last_scale_down_at, settings.scale_down_cooldown_s, now) or _cooling(
            state.last_scale_up_at, settings.scale_down_cooldown_s, now):
        return result(current, "none", "quiet, scale-down cooling down", held)
    return result(current - 1, "scale_down", "quiet: queue, TTFT and GPU util below the low-water marks",
                  ScalingState(state.last_scale_up_at, now, None), least_loaded(load.workers))


def _cooling(last: float | None, cooldown_s: float, now: float) -> bool:
    return last is not None and now - last < cooldown_s
