"""GPU readings through NVML's API, with a stand-in for the driver library (the test
hosts have no GPU): units, per-GPU metrics, the inventory sent at registration, and the
load sent in heartbeats."""

from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.agent.agent import Agent
from gpufleet.agent.app import create_app
from gpufleet.agent.config import load_config
from gpufleet.agent.gpus import GpuReader

MIB = 2**20


class FakeNvml:
    """The subset of pynvml the agent calls, for two H100s; GPU 1 lacks a power sensor."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self):
        self.inits = 0

    def nvmlInit(self):  # noqa: N802 - NVML's names
        self.inits += 1

    def nvmlDeviceGetCount(self):  # noqa: N802
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):  # noqa: N802
        return index

    def nvmlDeviceGetName(self, handle):  # noqa: N802
        return b"NVIDIA H100 80GB HBM3" if handle == 0 else "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, handle):  # noqa: N802
        return f"GPU-{handle:08d}"

    def nvmlDeviceGetMemoryInfo(self, handle):  # noqa: N802
        return SimpleNamespace(total=81559 * MIB, used=(70000 if handle == 0 else 10000) * MIB)

    def nvmlDeviceGetUtilizationRates(self, handle):  # noqa: N802
        return SimpleNamespace(gpu=90 if handle == 0 else 30)

    def nvmlDeviceGetTemperature(self, handle, sensor):  # noqa: N802
        return 61 + handle

    def nvmlDeviceGetPowerUsage(self, handle):  # noqa: N802
        if handle == 1:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 350_500  # milliwatts


def test_readings_are_converted_to_plain_units():
    nvml = FakeNvml()
    reader = GpuReader(nvml)
    gpus = reader.read()
    reader.read()
    assert nvml.inits == 1  # initialised once
    assert [g.name for g in gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    first, second = gpus
    assert (first.memory_total_mb, first.memory_used_mb) == (81559, 70000)
    assert first.utilization_percent == 90 and first.temperature_c == 61
    assert first.power_w == pytest.approx(350.5)
    assert second.power_w == 0.0  # a missing sensor reads 0, the GPU is still reported


def test_metrics_registration_and_heartbeat_carry_the_gpus():
    config = load_config({"INSTANCE_ID": "gpu-01", "CONTROL_PLANE_URL": "http://127.0.0.1:9", "MODEL_ID": "m",
                          "TENSOR_PARALLEL_SIZE": "2"})
    agent = Agent(config, gpu_reader=GpuReader(FakeNvml()))
    app = create_app(config, start=False, agent=agent)
    text = app.test_client().get("/metrics").get_data(as_text=True)
    samples = {(s.name, s.labels.get("gpu")): s for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("gpufleet_agent_gpus", None)].value == 2
    assert samples[("gpufleet_agent_gpu_utilization_percent", "1")].value == 30
    assert samples[("gpufleet_agent_gpu_memory_used_bytes", "0")].value == 70000 * MIB
    assert samples[("gpufleet_agent_gpu_memory_total_bytes", "1")].value == 81559 * MIB
    assert samples[("gpufleet_agent_gpu_temperature_celsius", "1")].value == 62
    assert samples[("gpufleet_agent_gpu_power_watts", "0")].value == pytest.approx(350.5)
    assert samples[("gpufleet_agent_gpu_info", "0")].labels["uuid"] == "GPU-00000000"

    register = agent.register_payload()
    assert register["gpus"] == [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559},
                                {"index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_total_mb": 81559}]
    assert register["tensor_parallel_size"] == 2
    heartbeat = agent.heartbeat_payload()
    assert heartbeat["gpu_util"] == 60.0  # the mean over the worker's GPUs
    assert heartbeat["gpu_mem_used_mb"] == 80000
    assert heartbeat["status"] == "starting"
    info = app.test_client().get("/info").get_json()
    assert info["gpu_count"] == 2 and info["gpus"][1]["uuid"] == "GPU-00000001"
