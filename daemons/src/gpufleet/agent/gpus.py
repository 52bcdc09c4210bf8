"""GPU inventory and live readings through NVML (nvidia-ml-py).

A host without the NVIDIA driver reports 0 GPUs: the failure is logged once and the
agent keeps working (the simulator-backed test fleet runs this way).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass

log = logging.getLogger("gpufleet.agent.gpus")


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    uuid: str
    memory_total_mb: float
    memory_used_mb: float
    utilization_percent: float
    temperature_c: float
    power_w: float

    def as_dict(self) -> dict:
        return asdict(self)


class GpuReader:
    def __init__(self, nvml=None):
        self._nvml = nvml
        self._lock = threading.Lock()
        self._initialised = False
        self._unavailable_reason: str | None = None

    @property
    def unavailable_reason(self) -> str | None:
        return self._unavailable_reason

    def _init(self) -> bool:
        if self._initialised:
            return True
        if self._unavailable_reason is not None:
            return False
        try:
            if self._nvml is None:
                import pynvml
                self._nvml = pynvml
            self._nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - any NVML failure means "no GPUs here"
            self._unavailable_reason = f"{type(exc).__name__}: {exc}"
            log.warning("NVML is not available (%s): reporting 0 GPUs", self._unavailable_reason)
            return False
        self._initialised = True
        return True

    def read(self) -> list[GpuReading]:
        with self._lock:
            if not self._init():
                return []
            nvml = self._nvml
            try:
                count = nvml.nvmlDeviceGetCount()
            except Exception as exc:  # noqa: BLE001
                log.warning("NVML could not count GPUs: %s", exc)
                return []
            return [reading for i in range(count) if (reading := self._read_one(nvml, i)) is not None]

    @staticmethod
    def _read_one(nvml, index: int) -> GpuReading | None:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except Exception as exc:  # noqa: BLE001 - a lost GPU must not break the scrape
            log.warning("NVML could not read GPU %d: %s", index, exc)
            return None

        def optional(fn, *args, scale=1.0):
            try:
                return float(fn(*args)) * scale
            except Exception:  # noqa: BLE001 - not every GPU exposes every sensor
                return 0.0

        try:
            utilization = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # noqa: BLE001
            utilization = 0.0
        return GpuReading(
            index=index,
            name=name.decode() if isinstance(name, bytes) else str(name),
            uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
            memory_total_mb=memory.total / 2**20,
            memory_used_mb=memory.used / 2**20,
            utilization_percent=utilization,
            temperature_c=optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
            power_w=optional(nvml.nvmlDeviceGetPowerUsage, handle, scale=0.001),
        )
