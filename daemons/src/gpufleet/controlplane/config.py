"""Control plane and reconciler settings, read from the environment in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gpufleet.common.config import ConfigError, Env, redact_url, secret_hash
from gpufleet.common.metrics_access import allow_from_env
from gpufleet.common.rediskeys import DEFAULT_PREFIX
from gpufleet.controlplane.scaling import ScalingSettings
from gpufleet.controlplane.sd import SdSettings


@dataclass(frozen=True)
class ControlPlaneConfig:
    database_url: str = field(repr=False)
    redis_url: str = field(repr=False)
    admin_token_hash: str = field(repr=False)
    bind_host: str = "0.0.0.0"
    bind_port: int = 8003
    redis_prefix: str = DEFAULT_PREFIX
    heartbeat_interval_s: float = 10.0
    reconcile_interval_s: float = 5.0
    probe_timeout_s: float = 2.0
    workers: int = 2
    max_body_bytes: int = 64 * 1024
    migrate_on_start: bool = False
    probe_concurrency: int = 256
    join_secret_ttl_s: float = 3600.0
    log_level: str = "INFO"
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    sd: SdSettings = field(default_factory=SdSettings)
    metrics_allow_from: tuple = ()

    @property
    def stale_after_s(self) -> float:
        """A heartbeat older than this makes a worker unroutable."""
        return 3 * self.heartbeat_interval_s

    def describe(self) -> str:
        return (f"database={redact_url(self.database_url)} redis={redact_url(self.redis_url)} "
                f"prefix={self.redis_prefix!r} heartbeat={self.heartbeat_interval_s}s "
                f"reconcile={self.reconcile_interval_s}s probe_timeout={self.probe_timeout_s}s")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *,
                 need_admin_token: bool = True) -> ControlPlaneConfig:
        """``need_admin_token=False`` for the reconciler, which serves no admin API."""
        env = Env(environ)
        database_url = env.str("GPUFLEET_DATABASE_URL", required=True,
                               example="postgresql://gpufleet:PASSWORD@127.0.0.1:5432/gpufleet")
        if not database_url.startswith(("postgresql://", "postgres://")) and "dbname=" not in database_url:
            raise ConfigError("GPUFLEET_DATABASE_URL is not a PostgreSQL DSN: set it to e.g. "
                              "postgresql://gpufleet:PASSWORD@127.0.0.1:5432/gpufleet")
        redis_url = env.str("GPUFLEET_REDIS_URL", required=True, example="redis://:PASSWORD@127.0.0.1:6379/0")
        if not redis_url.startswith("unix://"):  # a socket path has no host part
            redis_url = env.url("GPUFLEET_REDIS_URL", example="redis://:PASSWORD@127.0.0.1:6379/0",
                                schemes=("redis", "rediss"))
        token = env.str("GPUFLEET_ADMIN_TOKEN", required=need_admin_token,
                        example="sha256:<hex of the admin token>")
        host, port = env.bind("GPUFLEET_BIND", "0.0.0.0:8003")
        return cls(
            database_url=database_url,
            redis_url=redis_url,
            admin_token_hash=secret_hash("GPUFLEET_ADMIN_TOKEN", token) if token else "",
            bind_host=host,
            bind_port=port,
            redis_prefix=env.str("GPUFLEET_REDIS_PREFIX", DEFAULT_PREFIX),
            heartbeat_interval_s=env.float("GPUFLEET_HEARTBEAT_INTERVAL_S", 10.0, minimum=0.1, maximum=3600),
            reconcile_interval_s=env.float("GPUFLEET_RECONCILE_INTERVAL_S", 5.0, minimum=0.05, maximum=3600),
            probe_timeout_s=env.float("GPUFLEET_PROBE_TIMEOUT_S", 2.0, minimum=0.05, maximum=60),
            workers=env.int("GPUFLEET_WORKERS", 2, minimum=1, maximum=64),
            max_body_bytes=env.int("GPUFLEET_MAX_BODY_BYTES", 64 * 1024, minimum=1024, maximum=16 * 1024 * 1024),
            migrate_on_start=env.bool("GPUFLEET_MIGRATE_ON_START", False),
            probe_concurrency=env.int("GPUFLEET_PROBE_CONCURRENCY", 256, minimum=1, maximum=2048),
            join_secret_ttl_s=env.float("GPUFLEET_JOIN_SECRET_TTL_S", 3600.0, minimum=1, maximum=30 * 86400),
            log_level=env.str("GPUFLEET_LOG_LEVEL", "INFO"),
            scaling=ScalingSettings.from_env(env),
            sd=SdSettings.from_env(env),
            metrics_allow_from=allow_from_env(env),
        )
