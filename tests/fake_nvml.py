"""A stand-in for the `pynvml` module, for tests only.

This is a mock on purpose, and the only one in the GPU monitor's tests: no NVIDIA driver (libnvidia-ml.so) exists
on the CI machines, so NVML itself cannot run there. Everything else stays real: the fake raises the real
`pynvml.NVMLError` subclasses with the real error codes, and uses the real constants, so the monitor's error
handling is exercised exactly as against a driver. The monitor is tested for real on a GPU machine separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml

MIB = 1024 * 1024


@dataclass
class FakeGpu:
    name: str = "NVIDIA GeForce RTX 4090"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    util_pct: int = 87
    mem_used_mib: int = 20_000
    mem_total_mib: int = 24_564
    temp_c: int = 71
    power_mw: int = 312_500
    sm_clock_mhz: int = 2_520
    throttle_mask: int = 0x4 | 0x20  # sw_power_cap + sw_thermal_slowdown
    processes: list[tuple[int, int | None]] = field(default_factory=lambda: [(4242, 19_000 * MIB)])
    unsupported: set[str] = field(default_factory=set)  # NVML function names that raise NotSupported


class FakeNvml:
    """Implements the pynvml functions the monitor calls. `fail_init` / `fail_count_on` inject driver trouble."""

    NVMLError = pynvml.NVMLError

    def __init__(self, gpus: list[FakeGpu] | None = None, fail_init: int | None = None):
        self.gpus = [FakeGpu()] if gpus is None else gpus
        self.fail_init = fail_init  # NVML error code nvmlInit raises (None = works)
        self.fail_count: int | None = None  # NVML error code nvmlDeviceGetCount raises, settable mid-run
        self.init_calls = 0
        self.shutdown_calls = 0
        self.initialised = False
        for name in dir(pynvml):  # real constants: NVML_ERROR_*, NVML_TEMPERATURE_GPU, NVML_CLOCK_SM...
            if name.startswith("NVML_"):
                setattr(self, name, getattr(pynvml, name))

    # -- library ------------------------------------------------------------------------------------------
    def nvmlInit(self):
        self.init_calls += 1
        if self.fail_init is not None:
            raise pynvml.NVMLError(self.fail_init)
        self.initialised = True

    def nvmlShutdown(self):
        self.shutdown_calls += 1
        self.initialised = False

    def _check(self):
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def nvmlDeviceGetCount(self):
        self._check()
        if self.fail_count is not None:
            raise pynvml.NVMLError(self.fail_count)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._check()
        return self.gpus[index]

    # -- per-device reads ---------------------------------------------------------------------------------
    def _read(self, gpu: FakeGpu, fn: str, value):
        self._check()
        if fn in gpu.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def nvmlDeviceGetName(self, h):
        return self._read(h, "nvmlDeviceGetName", h.name)

    def nvmlDeviceGetUUID(self, h):
        return self._read(h, "nvmlDeviceGetUUID", h.uuid)

    def nvmlDeviceGetUtilizationRates(self, h):
        return self._read(h, "nvmlDeviceGetUtilizationRates", SimpleNamespace(gpu=h.util_pct, memory=40))

    def nvmlDeviceGetMemoryInfo(self, h):
        used, total = h.mem_used_mib * MIB, h.mem_total_mib * MIB
        return self._read(h, "nvmlDeviceGetMemoryInfo", SimpleNamespace(used=used, total=total, free=total - used))

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._read(h, "nvmlDeviceGetTemperature", h.temp_c)

    def nvmlDeviceGetPowerUsage(self, h):
        return self._read(h, "nvmlDeviceGetPowerUsage", h.power_mw)

    def nvmlDeviceGetClockInfo(self, h, clock):
        assert clock == pynvml.NVML_CLOCK_SM
        return self._read(h, "nvmlDeviceGetClockInfo", h.sm_clock_mhz)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._read(h, "nvmlDeviceGetCurrentClocksEventReasons", h.throttle_mask)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        procs = [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in h.processes]
        return self._read(h, "nvmlDeviceGetComputeRunningProcesses", procs)
