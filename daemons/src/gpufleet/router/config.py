"""The router's settings, read from the environment in one place and validated at start."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from gpufleet.common.config import ConfigError, Env
from gpufleet.common.metrics_access import allow_from_env
from gpufleet.common.rediskeys import DEFAULT_PREFIX

from .policies import CacheAwareParams, CacheSettings

POLICIES = ("least_outstanding", "cache_aware", "round_robin", "random")


@dataclass(frozen=True)
class RouterConfig:
    redis_url: str
    host: str = "0.0.0.0"
    port: int = 8002
    processes: int = 1
    redis_prefix: str = DEFAULT_PREFIX
    vllm_api_key: str | None = None
    router_id: str = field(default_factory=socket.gethostname)
    policy: str = "cache_aware"
    connect_timeout_s: float = 3.0
    first_byte_timeout_s: float = 60.0
    read_timeout_s: float = 60.0
    retries: int = 2
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_s: float = 5.0
    breaker_failures: int = 3
    breaker_cooldown_s: float = 10.0
    lease_ttl_s: float = 10.0
    cache: CacheSettings = CacheSettings()  # the cache_aware policy's knobs
    max_body_bytes: int = 4 * 1024 * 1024
    key_cache_ttl_s: float = 5.0
    key_negative_ttl_s: float = 2.0
    refresh_interval_s: float = 2.0
    redis_timeout_s: float = 0.5
    redis_budget_s: float = 0.25  # a request-path Redis call slower than this: local fallback, degraded
    pool_maxsize: int = 256
    pool_max_idle_s: float = 2.0  # below uvicorn's (vLLM's) 5 s keep-alive
    max_response_bytes: int = 64 * 1024 * 1024
    log_level: str = "INFO"
    metrics_dir: str | None = None
    access_log: bool = False  # one JSON line per request on the gpufleet.router.access logger
    metrics_allow_from: tuple = ()  # who may read /metrics (GPUFLEET_METRICS_ALLOW_FROM); empty: anyone
    tls_cert_file: str | None = None  # PEM certificate (chain) clients see; with tls_key_file, HTTPS
    tls_key_file: str | None = None
    background: bool = True  # the event listener, refresher and lease renewer (off in some unit tests)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RouterConfig:
        env = Env(environ)
        redis_url = env.url("GPUFLEET_REDIS_URL", required=True, example="redis://:pass@127.0.0.1:6379/0",
                            schemes=("redis", "rediss", "unix"))
        host, port = env.bind("GPUFLEET_BIND", "0.0.0.0:8002")
        policy = (env.str("GPUFLEET_ROUTER_POLICY", "cache_aware") or "").lower().replace("-", "_")
        if policy not in POLICIES:
            raise ConfigError(f"GPUFLEET_ROUTER_POLICY={policy!r} is unknown: set it to one of {', '.join(POLICIES)}")
        prefix = env.str("GPUFLEET_REDIS_PREFIX", DEFAULT_PREFIX)
        first_byte = env.float("GPUFLEET_ROUTER_FIRST_BYTE_TIMEOUT_S", 60.0, minimum=0.1)
        cfg = cls(
            redis_url=redis_url,
            host=host,
            port=port,
            processes=env.int("GPUFLEET_ROUTER_PROCESSES", os.cpu_count() or 1, minimum=1, maximum=256),
            redis_prefix=prefix,
            vllm_api_key=env.str("GPUFLEET_VLLM_API_KEY"),
            router_id=env.str("GPUFLEET_ROUTER_ID", socket.gethostname()),
            policy=policy,
            connect_timeout_s=env.float("GPUFLEET_ROUTER_CONNECT_TIMEOUT_S", 3.0, minimum=0.05, maximum=600),
            first_byte_timeout_s=first_byte,
            read_timeout_s=env.float("GPUFLEET_ROUTER_READ_TIMEOUT_S", max(first_byte, 60.0), minimum=0.1),
            retries=env.int("GPUFLEET_ROUTER_RETRIES", 2, minimum=0, maximum=10),
            retry_budget_ratio=env.float("GPUFLEET_ROUTER_RETRY_BUDGET_RATIO", 0.2, minimum=0.0, maximum=10.0),
            retry_budget_min_per_s=env.float("GPUFLEET_ROUTER_RETRY_BUDGET_MIN_PER_S", 5.0, minimum=0.0),
            breaker_failures=env.int("GPUFLEET_ROUTER_BREAKER_FAILURES", 3, minimum=1, maximum=1000),
            breaker_cooldown_s=env.float("GPUFLEET_ROUTER_BREAKER_COOLDOWN_S", 10.0, minimum=0.1, maximum=3600),
            lease_ttl_s=env.float("GPUFLEET_ROUTER_LEASE_TTL_S", 10.0, minimum=1.0, maximum=3600),
            cache=_cache_settings(env),
            max_body_bytes=env.int("GPUFLEET_ROUTER_MAX_BODY_BYTES", 4 * 1024 * 1024, minimum=1024),
            key_cache_ttl_s=env.float("GPUFLEET_ROUTER_KEY_CACHE_TTL_S", 5.0, minimum=0.0, maximum=300),
            key_negative_ttl_s=env.float("GPUFLEET_ROUTER_KEY_NEGATIVE_TTL_S", 2.0, minimum=0.0, maximum=300),
            refresh_interval_s=env.float("GPUFLEET_ROUTER_REFRESH_INTERVAL_S", 2.0, minimum=0.1, maximum=300),
            redis_timeout_s=env.float("GPUFLEET_ROUTER_REDIS_TIMEOUT_S", 0.5, minimum=0.05, maximum=30),
            redis_budget_s=env.float("GPUFLEET_ROUTER_REDIS_BUDGET_S", 0.25, minimum=0.005, maximum=30),
            pool_maxsize=env.int("GPUFLEET_ROUTER_POOL_MAXSIZE", 256, minimum=1, maximum=100000),
            pool_max_idle_s=env.float("GPUFLEET_ROUTER_POOL_MAX_IDLE_S", 2.0, minimum=0.0, maximum=3600),
            max_response_bytes=env.int("GPUFLEET_ROUTER_MAX_RESPONSE_BYTES", 64 * 1024 * 1024, minimum=1024),
            log_level=(env.str("GPUFLEET_LOG_LEVEL", "INFO") or "INFO").upper(),
            metrics_dir=env.str("PROMETHEUS_MULTIPROC_DIR"),
            access_log=env.bool("GPUFLEET_ROUTER_ACCESS_LOG", False),
            metrics_allow_from=allow_from_env(env),
            **_tls_files(env),
        )
        if cfg.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"GPUFLEET_LOG_LEVEL={cfg.log_level!r} is not a level: set it to INFO or DEBUG")
        if not cfg.router_id or any(c.isspace() for c in cfg.router_id):
            raise ConfigError("GPUFLEET_ROUTER_ID must be a non-empty word, e.g. router-1")
        return cfg

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert_file else "http"


def _cache_settings(env: Env) -> CacheSettings:
    """``GPUFLEET_ROUTER_CACHE_*``: the cache_aware policy's knobs (read whatever the policy)."""
    d, p = CacheSettings(), CacheAwareParams()
    params = CacheAwareParams(
        block_tokens=env.int("GPUFLEET_ROUTER_CACHE_BLOCK_TOKENS", p.block_tokens, minimum=1, maximum=1024),
        overload_factor=env.float("GPUFLEET_ROUTER_CACHE_OVERLOAD_FACTOR", p.overload_factor, minimum=1.0,
                                  maximum=100.0),
        overload_slack=env.float("GPUFLEET_ROUTER_CACHE_OVERLOAD_SLACK", p.overload_slack, minimum=0.0,
                                 maximum=1e9),
        queue_tokens=env.float("GPUFLEET_ROUTER_CACHE_QUEUE_TOKENS", p.queue_tokens, minimum=0.0, maximum=1e9),
        kv_tokens=env.float("GPUFLEET_ROUTER_CACHE_KV_TOKENS", p.kv_tokens, minimum=0.0, maximum=1e9),
    )
    return CacheSettings(
        chars_per_token=env.float("GPUFLEET_ROUTER_CACHE_CHARS_PER_TOKEN", d.chars_per_token, minimum=0.5,
                                  maximum=64.0),
        max_blocks=env.int("GPUFLEET_ROUTER_CACHE_MAX_BLOCKS", d.max_blocks, minimum=1, maximum=4096),
        capacity_blocks=env.int("GPUFLEET_ROUTER_CACHE_CAPACITY_BLOCKS", d.capacity_blocks, minimum=1,
                                maximum=100_000_000),
        ttl_s=env.float("GPUFLEET_ROUTER_CACHE_TTL_S", d.ttl_s, minimum=1.0, maximum=7 * 86400),
        decode_tokens=env.int("GPUFLEET_ROUTER_CACHE_DECODE_TOKENS", d.decode_tokens, minimum=0, maximum=1_000_000),
        params=params,
    )


def _tls_files(env: Env) -> dict:
    """Both TLS files or neither; each must be readable now, not at the first handshake."""
    names = ("GPUFLEET_ROUTER_TLS_CERT_FILE", "GPUFLEET_ROUTER_TLS_KEY_FILE")
    cert, key = (env.str(name) for name in names)
    if bool(cert) != bool(key):
        raise ConfigError(f"set both {names[0]} and {names[1]} (PEM files) to serve HTTPS, or neither for HTTP")
    for name, path in zip(names, (cert, key), strict=True):
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{name}={path!r} cannot be read: point it at a PEM file the router's user can read")
    return {"tls_cert_file": cert, "tls_key_file": key}
