"""The agent's state and background loops, wired together (no HTTP routes here)."""

from __future__ import annotations

import logging
import threading
import time

from gpufleet import __version__

from . import readiness
from .config import AgentConfig
from .gpus import GpuReader
from .registration import Registrar
from .tokens import TokenStore
from .vllm import VllmMonitor

log = logging.getLogger("gpufleet.agent")


class Agent:
    def __init__(self, config: AgentConfig, gpu_reader: GpuReader | None = None):
        self.config = config
        self.version = __version__
        self.tokens = TokenStore(config.worker_auth_token, config.worker_auth_token_file,
                                 config.worker_join_secret_file)
        self.gpus = gpu_reader or GpuReader()
        self.vllm = VllmMonitor(config)
        self.registrar = Registrar(config, self.tokens, self.register_payload, self.heartbeat_payload,
                                   on_desired_status=self.apply_desired_status)
        self.vllm.on_change = self._status_may_have_changed
        self._lock = threading.Lock()
        self.drained_locally = False
        self.drained_by_control_plane = False
        self._last_status: str | None = None
        self._threads: list[threading.Thread] = []
        self.started_at = time.time()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the vLLM poller and the control-plane loop (after gunicorn's fork)."""
        if self._threads:
            return
        for name, target in (("vllm-poller", self.vllm.run), ("controlplane", self.registrar.run)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("agent %s started for instance %s, model %s, vLLM at %s, control plane %s",
                 self.version, self.config.instance_id, self.config.model_id, self.config.vllm_base_url,
                 self.config.control_plane_url)

    def stop(self) -> None:
        self.vllm.stop()
        self.registrar.stop()

    # -- status ------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.drained_locally or self.drained_by_control_plane

    def inputs(self) -> readiness.Inputs:
        snap = self.vllm.snapshot
        why = []
        if self.drained_locally:
            why.append("drained locally (POST /drain)")
        if self.drained_by_control_plane:
            why.append("the control plane asked this worker to drain")
        return readiness.Inputs(
            vllm_healthy=snap.healthy, vllm_detail=snap.health_detail, poll_stale=self.vllm.stale(),
            model_listed=snap.model_listed, model_detail=snap.model_detail,
            warmed=snap.warmed, warmup_detail=snap.warmup_detail,
            token_held=self.tokens.token is not None,
            registration_accepted=self.registrar.accepted, registration_detail=self.registrar.detail,
            draining=self.draining, drain_detail="; ".join(why))

    def status(self) -> str:
        return readiness.local_status(self.inputs())

    def _status_may_have_changed(self) -> None:
        status = self.status()
        with self._lock:
            changed, self._last_status = status != self._last_status, status
        if changed:
            log.info("worker status: %s", status)
            self.registrar.poke()

    def drain(self, *, by_control_plane: bool = False) -> None:
        if by_control_plane:
            self.drained_by_control_plane = True
        else:
            self.drained_locally = True
        self._status_may_have_changed()

    def undrain(self, *, by_control_plane: bool = False) -> None:
        if by_control_plane:
            self.drained_by_control_plane = False
        else:
            # An operator's undrain lifts both; the control plane re-asks if it still wants it.
            self.drained_locally = False
            self.drained_by_control_plane = False
        self._status_may_have_changed()

    def apply_desired_status(self, desired: str | None) -> None:
        """The heartbeat answer's ``desired_status``: "draining" drains; anything else
        (or no field) lifts a drain the control plane asked for, never a local one."""
        wants_drain = desired == readiness.DRAINING
        if wants_drain != self.drained_by_control_plane:
            log.info("control plane asks for status %s", desired or "ready")
            if wants_drain:
                self.drain(by_control_plane=True)
            else:
                self.undrain(by_control_plane=True)

    # -- payloads ----------------------------------------------------------------------

    def gpu_inventory(self) -> list[dict]:
        return [{"index": g.index, "name": g.name, "memory_total_mb": round(g.memory_total_mb)}
                for g in self.gpus.read()]

    def register_payload(self) -> dict:
        c = self.config
        return {
            "instance_id": c.instance_id, "worker_id": c.worker_id,
            "provider_instance_id": c.provider_instance_id, "model_id": c.model_id,
            "advertise_url": c.advertise_url, "agent_url": c.agent_url,
            "tensor_parallel_size": c.tensor_parallel_size, "gpu_memory_utilization": c.gpu_memory_utilization,
            "gpus": self.gpu_inventory(), "agent_version": self.version,
        }

    def load(self) -> dict:
        """The load figures shared by the heartbeat, /info and /metrics."""
        sample = self.vllm.snapshot.sample
        gpus = self.gpus.read()
        ttft_p95 = self.vllm.ttft.quantile(0.95)
        ttft_p95_scaling = self.vllm.ttft_scaling.quantile(0.95)
        e2e_p95 = self.vllm.e2e.quantile(0.95)
        return {
            "queue_depth": int(sample.waiting) if sample else 0,
            "running": int(sample.running) if sample else 0,
            "kv_cache_usage": round(sample.kv_cache_usage, 4) if sample else 0.0,
            "gpu_util": round(sum(g.utilization_percent for g in gpus) / len(gpus), 1) if gpus else 0.0,
            "gpu_mem_used_mb": round(sum(g.memory_used_mb for g in gpus)),
            "ttft_p95_ms": round(ttft_p95 * 1000, 1) if ttft_p95 is not None else 0.0,
            "ttft_p95_scaling_ms": round(ttft_p95_scaling * 1000, 1) if ttft_p95_scaling is not None else 0.0,
            "e2e_p95_ms": round(e2e_p95 * 1000, 1) if e2e_p95 is not None else 0.0,
            "req_per_s": round(self.vllm.requests.rate(), 3),
            "inflight": self.vllm.inflight(),
        }

    def heartbeat_payload(self) -> dict:
        status = self.status()
        with self._lock:
            self._last_status = status
        c = self.config
        return {"instance_id": c.instance_id, "worker_id": self.registrar.worker_id, "status": status,
                "model_id": c.model_id, **self.load()}

    def info(self) -> dict:
        c, snap = self.config, self.vllm.snapshot
        ready, _ = readiness.verdict(self.inputs())
        gpus = [g.as_dict() for g in self.gpus.read()]
        return {
            "instance_id": c.instance_id, "worker_id": self.registrar.worker_id,
            "provider_instance_id": c.provider_instance_id, "model_id": c.model_id,
            "versions": {"agent": self.version, "vllm": snap.version},
            "vllm_base_url": c.vllm_base_url, "advertise_url": c.advertise_url, "agent_url": c.agent_url,
            "control_plane_url": c.control_plane_url,
            "tensor_parallel_size": c.tensor_parallel_size, "gpu_memory_utilization": c.gpu_memory_utilization,
            "gpus": gpus, "gpu_count": len(gpus),
            "status": self.status(), "ready": ready, "draining": self.draining,
            "registration": {"state": self.registrar.state, "accepted": self.registrar.accepted,
                             "detail": self.registrar.detail, "token_source": self.tokens.source,
                             "heartbeat_interval_s": self.registrar.heartbeat_interval_s},
            "served_models": snap.models,
            **self.load(),
            "started_at": self.started_at,
        }
