"""Strict validation of the worker payloads (pure: dict in, dataclass or PayloadError out).

Every error names the field, so an agent's operator sees what to fix; unknown fields are
ignored so a newer agent can talk to an older control plane.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from urllib.parse import urlparse

import idna

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_MODEL = re.compile(r"^[^\s\x00-\x1f\x7f]{1,256}$")
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
WORKER_STATUSES = ("starting", "ready", "draining")


class PayloadError(ValueError):
    def __init__(self, field: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.field = field
        self.status = status


def require_object(body) -> dict:
    if not isinstance(body, dict):
        raise PayloadError(None, "the request body must be a JSON object")
    return body


def ident(body: dict, name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise PayloadError(name, f"{name} is required")
        return None
    if not isinstance(value, str) or not _ID.match(value):
        raise PayloadError(name, f"{name} must be a string of letters, digits and ._:@- "
                                 "(1-128 characters, starting with a letter or digit)")
    return value


def model(body: dict, name: str = "model_id", *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise PayloadError(name, f"{name} is required")
        return None
    if not isinstance(value, str) or not _MODEL.match(value):
        raise PayloadError(name, f"{name} must be a non-empty string without spaces (at most 256 characters)")
    return value


def _control_free(value: str) -> bool:
    """No control characters (C0, DEL, C1) and no line or paragraph separators: a value
    that ends up in a log line cannot forge another one."""
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029" for c in value)


def text(body: dict, name: str, *, required: bool = False, max_len: int = 256) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise PayloadError(name, f"{name} is required")
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise PayloadError(name, f"{name} must be a string of at most {max_len} characters")
    if not _control_free(value):
        raise PayloadError(name, f"{name} must not contain control characters (newlines, tabs, escapes)")
    if required and not value.strip():
        raise PayloadError(name, f"{name} must not be empty")
    return value


def _valid_host(host: str) -> bool:
    """An IP literal, or a DNS name whose labels are valid IDNA (letters, digits, hyphens,
    1-63 characters, not starting or ending with a hyphen; Unicode names as IDNA 2008)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if len(host) > 253:
        return False
    try:
        encoded = idna.encode(host.rstrip("."), uts46=True, std3_rules=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return False
    return all(_LABEL.match(label) for label in encoded.split("."))


def url(body: dict, name: str) -> str:
    """A worker URL: ``http://host:port[/path]`` — what the routers and the reconciler can
    use. https is refused until the router speaks TLS to workers."""
    example = "http://100.64.0.7:8000"
    value = body.get(name)
    if value is None:
        raise PayloadError(name, f"{name} is required")
    if not isinstance(value, str) or len(value) > 512:
        raise PayloadError(name, f"{name} must be a URL string, e.g. {example}")
    if not _control_free(value) or any(c.isspace() for c in value):
        raise PayloadError(name, f"{name} must not contain spaces or control characters, e.g. {example}")
    parsed = urlparse(value)
    if parsed.scheme == "https":
        raise PayloadError(name, f"{name}: https worker URLs are not supported yet (the routers and the "
                                 f"reconciler speak plain HTTP to workers, over the tailnet); use http://, e.g. "
                                 f"{example}")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme != "http" or not parsed.hostname or port is None or not 0 < port < 65536 \
            or parsed.query or parsed.fragment or parsed.username is not None or parsed.password is not None \
            or ";" in parsed.path:
        raise PayloadError(name, f"{name} must be http://host:port[/path] with no credentials, query or "
                                 f"fragment, e.g. {example}")
    if not _valid_host(parsed.hostname):
        raise PayloadError(name, f"{name}: {parsed.hostname!r} is not a valid host name or IP address")
    return value.rstrip("/")


def integer(body: dict, name: str, default: int | None = None, *, minimum: int = 0,
            maximum: int = 2**31 - 1) -> int | None:
    value = body.get(name)
    if value is None:
        if default is None:
            raise PayloadError(name, f"{name} is required")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise PayloadError(name, f"{name} must be a whole number between {minimum} and {maximum}")
    return value


def number(body: dict, name: str, default: float | None = 0.0, *, minimum: float = 0.0,
           maximum: float = 1e12, required: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        if required:
            raise PayloadError(name, f"{name} is required")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not minimum <= value <= maximum:
        raise PayloadError(name, f"{name} must be a number between {minimum:g} and {maximum:g}")
    return float(value)


def gpus(body: dict, name: str = "gpus") -> list[dict]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > 64:
        raise PayloadError(name, f"{name} must be a list of at most 64 GPUs")
    result = []
    for i, gpu in enumerate(value):
        field = f"{name}[{i}]"
        if not isinstance(gpu, dict):
            raise PayloadError(field, f"{field} must be an object {{index, name, memory_total_mb}}")
        result.append({
            "index": integer(gpu, "index", minimum=0, maximum=1024) if "index" in gpu else i,
            "name": text(gpu, "name", max_len=128) or "",
            "memory_total_mb": number(gpu, "memory_total_mb", 0.0, maximum=10**8),
        })
    return result


@dataclass(frozen=True)
class Registration:
    instance_id: str
    worker_id: str
    provider_instance_id: str | None
    model_id: str
    advertise_url: str
    agent_url: str
    tensor_parallel_size: int
    gpu_memory_utilization: float | None
    gpus: list
    agent_version: str | None


@dataclass(frozen=True)
class Heartbeat:
    instance_id: str
    worker_id: str
    status: str
    model_id: str
    queue_depth: int
    running: int
    kv_cache_usage: float
    gpu_util: float
    gpu_mem_used_mb: float
    ttft_p95_ms: float
    e2e_p95_ms: float
    req_per_s: float
    inflight: int
    # the p95 TTFT over the agent's SCALING_TTFT_WINDOW_S; None from agents that predate it
    ttft_p95_scaling_ms: float | None = None


def _whole(body: dict, name: str) -> int:
    """Counts sent as numbers; a float like 3.0 is accepted and rounded."""
    return int(round(number(body, name, 0.0, maximum=10**9)))


def parse_registration(body) -> Registration:
    body = require_object(body)
    return Registration(
        instance_id=ident(body, "instance_id"),
        worker_id=ident(body, "worker_id"),
        provider_instance_id=text(body, "provider_instance_id", max_len=256),
        model_id=model(body),
        advertise_url=url(body, "advertise_url"),
        agent_url=url(body, "agent_url"),
        tensor_parallel_size=integer(body, "tensor_parallel_size", 1, minimum=1, maximum=64),
        gpu_memory_utilization=number(body, "gpu_memory_utilization", None, minimum=0.0, maximum=1.0),
        gpus=gpus(body),
        agent_version=text(body, "agent_version", max_len=64),
    )


def parse_heartbeat(body) -> Heartbeat:
    body = require_object(body)
    status = body.get("status")
    if status is None:
        raise PayloadError("status", "status is required")
    if status not in WORKER_STATUSES:
        raise PayloadError("status", f"status must be one of {', '.join(WORKER_STATUSES)}")
    return Heartbeat(
        instance_id=ident(body, "instance_id"),
        worker_id=ident(body, "worker_id"),
        status=status,
        model_id=model(body),
        queue_depth=_whole(body, "queue_depth"),
        running=_whole(body, "running"),
        kv_cache_usage=number(body, "kv_cache_usage", maximum=1.0),
        gpu_util=number(body, "gpu_util", maximum=100.0),
        gpu_mem_used_mb=number(body, "gpu_mem_used_mb"),
        ttft_p95_ms=number(body, "ttft_p95_ms"),
        e2e_p95_ms=number(body, "e2e_p95_ms"),
        req_per_s=number(body, "req_per_s"),
        inflight=_whole(body, "inflight"),
        ttft_p95_scaling_ms=number(body, "ttft_p95_scaling_ms", None),
    )
