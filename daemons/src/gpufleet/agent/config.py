"""The agent's settings, read once from the environment (names fixed by DESIGN.md)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

from gpufleet.common.config import ConfigError, Env
from gpufleet.common.metrics_access import allow_from_env

DEFAULT_AGENT_PORT = 8080
DEFAULT_VLLM_BASE_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class AgentConfig:
    instance_id: str
    worker_id: str
    control_plane_url: str
    model_id: str
    provider_instance_id: str = ""
    worker_auth_token: str | None = None
    worker_auth_token_file: str | None = None
    worker_join_secret_file: str | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    vllm_base_url: str = DEFAULT_VLLM_BASE_URL
    vllm_api_key: str | None = None
    bind_host: str = "127.0.0.1"
    bind_port: int = DEFAULT_AGENT_PORT
    # also served on loopback (local /drain, health checks) when bound to another address
    extra_bind_hosts: tuple = ()
    metrics_allow_from: tuple = ()
    advertise_url: str = DEFAULT_VLLM_BASE_URL
    agent_url: str = f"http://127.0.0.1:{DEFAULT_AGENT_PORT}"
    heartbeat_interval_s: float = 10.0
    agent_admin_token: str | None = None
    # How often vLLM is polled; /readyz answers from a poll at most this old (plus timeouts).
    vllm_poll_interval_s: float = 0.5
    vllm_timeout_s: float = 1.0
    warmup_timeout_s: float = 60.0
    # Cap of the exponential back-off towards the control plane.
    retry_max_s: float = 30.0
    # Window of the TTFT / end-to-end percentiles and the request rate.
    metrics_window_s: float = 60.0
    # Window of the TTFT p95 sent for the control plane's scaling loop (ttft_p95_scaling_ms):
    # shorter than the display window, so scaling sees a burst end sooner.
    scaling_ttft_window_s: float = 20.0
    log_level: str = "INFO"


def _positive(env: Env, name: str, default: float, minimum: float = 0.05) -> float:
    return env.float(name, default, minimum=minimum)


def load_config(environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Build the settings; a missing or malformed value raises ConfigError naming it."""
    env = Env(os.environ if environ is None else environ)
    instance_id = env.str("INSTANCE_ID", required=True, example="gpu-worker-01")
    control_plane_url = env.url("CONTROL_PLANE_URL", required=True, example="http://cp.tailnet:8003")
    model_id = env.str("MODEL_ID", required=True, example="meta-llama/Llama-3.1-8B-Instruct")
    vllm_base_url = env.url("VLLM_BASE_URL", DEFAULT_VLLM_BASE_URL, example=DEFAULT_VLLM_BASE_URL)
    advertise_url = env.url("ADVERTISE_URL", vllm_base_url, example="http://100.64.0.7:8000")

    explicit_bind = env.raw("GPUFLEET_BIND") is not None
    if explicit_bind:
        host, port = env.bind("GPUFLEET_BIND", f"127.0.0.1:{DEFAULT_AGENT_PORT}")
    else:
        host = None
        port = env.int("AGENT_PORT", DEFAULT_AGENT_PORT, minimum=1, maximum=65535)

    agent_url = env.url("AGENT_URL", None, example="http://100.64.0.7:8080")
    if agent_url is None:
        advertised_host = urlparse(advertise_url).hostname or "127.0.0.1"
        if ":" in advertised_host:
            advertised_host = f"[{advertised_host}]"
        agent_url = f"http://{advertised_host}:{port}"
    extra_hosts: tuple = ()
    if not explicit_bind:
        # by default the agent listens only where it is reached: its advertised address
        # (the tailnet), plus loopback for local operators; never every interface
        host = urlparse(agent_url).hostname or "127.0.0.1"
        if not _is_loopback(host):
            extra_hosts = ("127.0.0.1",)

    token_file = env.str("WORKER_AUTH_TOKEN_FILE")
    if token_file is not None:
        _check_token_file(token_file)
    join_secret_file = env.str("WORKER_JOIN_SECRET_FILE")
    if join_secret_file is not None:
        _check_join_secret_file(join_secret_file)

    return AgentConfig(
        instance_id=instance_id,
        worker_id=env.str("WORKER_ID", instance_id),
        provider_instance_id=env.str("PROVIDER_INSTANCE_ID", ""),
        control_plane_url=control_plane_url,
        model_id=model_id,
        worker_auth_token=env.str("WORKER_AUTH_TOKEN"),
        worker_auth_token_file=token_file,
        worker_join_secret_file=join_secret_file,
        tensor_parallel_size=env.int("TENSOR_PARALLEL_SIZE", 1, minimum=1, maximum=64),
        gpu_memory_utilization=env.float("GPU_MEMORY_UTILIZATION", 0.9, minimum=0.01, maximum=1.0),
        vllm_base_url=vllm_base_url,
        vllm_api_key=env.str("VLLM_API_KEY"),
        bind_host=host,
        bind_port=port,
        extra_bind_hosts=extra_hosts,
        metrics_allow_from=allow_from_env(env),
        advertise_url=advertise_url,
        agent_url=agent_url,
        heartbeat_interval_s=_positive(env, "HEARTBEAT_INTERVAL_S", 10.0, minimum=0.1),
        agent_admin_token=env.str("AGENT_ADMIN_TOKEN"),
        vllm_poll_interval_s=_positive(env, "VLLM_POLL_INTERVAL_S", 0.5),
        vllm_timeout_s=_positive(env, "VLLM_TIMEOUT_S", 1.0),
        warmup_timeout_s=_positive(env, "WARMUP_TIMEOUT_S", 60.0),
        retry_max_s=_positive(env, "CONTROL_PLANE_RETRY_MAX_S", 30.0, minimum=0.1),
        metrics_window_s=_positive(env, "METRICS_WINDOW_S", 60.0, minimum=1.0),
        scaling_ttft_window_s=_positive(env, "SCALING_TTFT_WINDOW_S", 20.0, minimum=1.0),
        log_level=_log_level(env),
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _log_level(env: Env) -> str:
    level = (env.str("LOG_LEVEL", "INFO") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL={level!r} is not a log level: set it to DEBUG, INFO, WARNING or ERROR")
    return level


def _check_token_file(path: str) -> None:
    """The token file may not exist yet (bootstrap writes it), but its folder must."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(
            f"WORKER_AUTH_TOKEN_FILE={path!r}: the folder {folder} does not exist: create it "
            "or point WORKER_AUTH_TOKEN_FILE at e.g. /var/lib/gpufleet/worker-token")
    if os.path.isdir(path):
        raise ConfigError(f"WORKER_AUTH_TOKEN_FILE={path!r} is a folder: point it at a file, "
                          "e.g. /var/lib/gpufleet/worker-token")
    if os.path.exists(path) and not os.access(path, os.R_OK):
        raise ConfigError(f"WORKER_AUTH_TOKEN_FILE={path!r} is not readable by this user: fix its owner")


def _check_join_secret_file(path: str) -> None:
    """The one-time join secret (from ``gpufleet instances add``/``join-secret``, delivered
    by the role): it may be gone once the worker holds its token, but when present it must
    be readable by this user only."""
    if os.path.isdir(path):
        raise ConfigError(f"WORKER_JOIN_SECRET_FILE={path!r} is a folder: point it at the file holding "
                          "the join secret, e.g. /etc/gpufleet/join-secret")
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"WORKER_JOIN_SECRET_FILE={path!r} cannot be read: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"WORKER_JOIN_SECRET_FILE={path!r} is readable by others (mode {mode:o}): "
                          f"chmod 600 {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"WORKER_JOIN_SECRET_FILE={path!r} is not readable by this user: fix its owner")
