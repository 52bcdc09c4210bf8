"""The agent's /metrics: GPUs, vLLM load and latency, agent state — one registry per app.

Everything is collected at scrape time from the poller's latest snapshot (no background
bookkeeping of gauges), so a scrape is cheap and always consistent with /info.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from . import readiness
from .agent import Agent

REGISTRATION_STATES = ("unregistered", "registered", "rejected", "unreachable")


class AgentCollector:
    def __init__(self, agent: Agent):
        self.agent = agent

    def collect(self):
        agent, config = self.agent, self.agent.config
        yield from self._gpus()

        snap = agent.vllm.snapshot
        sample = snap.sample
        yield _gauge("gpufleet_agent_vllm_up", "1 when vLLM answers /health with 200", int(snap.healthy))
        yield _gauge("gpufleet_agent_vllm_requests_waiting", "Requests queued in vLLM (vllm:num_requests_waiting)",
                     sample.waiting if sample else 0)
        yield _gauge("gpufleet_agent_vllm_requests_running", "Requests running in vLLM (vllm:num_requests_running)",
                     sample.running if sample else 0)
        yield _gauge("gpufleet_agent_vllm_kv_cache_usage_ratio", "KV-cache usage of vLLM, 0..1",
                     sample.kv_cache_usage if sample else 0)
        yield _gauge("gpufleet_agent_vllm_prefix_cache_hit_ratio",
                     f"Share of prompt tokens found in vLLM's prefix cache over the last {config.metrics_window_s:g}s "
                     "(vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total; 0 without queries)",
                     agent.vllm.prefix_cache_hit_ratio())
        yield _gauge("gpufleet_agent_vllm_requests_per_second",
                     f"Finished requests per second over the last {config.metrics_window_s:g}s",
                     agent.vllm.requests.rate())
        for metric, window, help_text in (
                ("gpufleet_agent_vllm_ttft_seconds", agent.vllm.ttft, "Time to first token"),
                ("gpufleet_agent_vllm_e2e_latency_seconds", agent.vllm.e2e, "End-to-end request latency")):
            family = GaugeMetricFamily(metric, f"{help_text}, quantiles over the last {config.metrics_window_s:g}s "
                                       "(from vLLM's histogram deltas; 0 without requests)", labels=["quantile"])
            for q in (0.5, 0.95):
                value = window.quantile(q)
                family.add_metric([str(q)], value if value is not None else 0.0)
            yield family

        status = agent.status()
        family = GaugeMetricFamily("gpufleet_agent_status", "The worker's status (1 for the current one)",
                                   labels=["status"])
        for name in readiness.STATUSES:
            family.add_metric([name], int(status == name))
        yield family
        ready, checks = readiness.verdict(agent.inputs())
        yield _gauge("gpufleet_agent_ready", "1 when /readyz answers 200", int(ready))
        family = GaugeMetricFamily("gpufleet_agent_readiness_check", "1 when the readiness condition holds",
                                   labels=["check"])
        for check in checks:
            family.add_metric([check.name], int(check.ok))
        yield family
        family = GaugeMetricFamily("gpufleet_agent_registration_state",
                                   "Registration with the control plane (1 for the current state)", labels=["state"])
        for name in REGISTRATION_STATES:
            family.add_metric([name], int(agent.registrar.state == name))
        yield family
        family = CounterMetricFamily("gpufleet_agent_controlplane_calls", "Register and heartbeat calls by result",
                                     labels=["result"])
        for result, count in agent.registrar.counts.items():
            family.add_metric([result], count)
        yield family
        info = InfoMetricFamily("gpufleet_agent", "Identity of this worker")
        info.add_metric([], {"version": agent.version, "instance_id": config.instance_id,
                             "worker_id": agent.registrar.worker_id, "model_id": config.model_id,
                             "vllm_version": snap.version or ""})
        yield info

    def _gpus(self):
        gpus = self.agent.gpus.read()
        yield _gauge("gpufleet_agent_gpus", "GPUs visible through NVML (0 without the NVIDIA driver)", len(gpus))
        families = {
            "util": GaugeMetricFamily("gpufleet_agent_gpu_utilization_percent", "GPU utilisation", labels=["gpu"]),
            "used": GaugeMetricFamily("gpufleet_agent_gpu_memory_used_bytes", "GPU memory used", labels=["gpu"]),
            "total": GaugeMetricFamily("gpufleet_agent_gpu_memory_total_bytes", "GPU memory", labels=["gpu"]),
            "temp": GaugeMetricFamily("gpufleet_agent_gpu_temperature_celsius", "GPU temperature", labels=["gpu"]),
            "power": GaugeMetricFamily("gpufleet_agent_gpu_power_watts", "GPU power draw", labels=["gpu"]),
        }
        info = InfoMetricFamily("gpufleet_agent_gpu", "GPU model and UUID", labels=["gpu"])
        for g in gpus:
            label = [str(g.index)]
            families["util"].add_metric(label, g.utilization_percent)
            families["used"].add_metric(label, g.memory_used_mb * 2**20)
            families["total"].add_metric(label, g.memory_total_mb * 2**20)
            families["temp"].add_metric(label, g.temperature_c)
            families["power"].add_metric(label, g.power_w)
            info.add_metric(label, {"name": g.name, "uuid": g.uuid})
        yield from families.values()
        yield info


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def build_registry(agent: Agent) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
