"""GPU monitor sidecar: samples NVML (nvidia-ml-py) and appends one JSON line per GPU per sample.

Usage:
    python -m training.gpu_monitor --output logs/gpu_metrics.jsonl --interval 5 --disk-path outputs/

Each record follows the GPU JSONL contract in docs/contracts.md: ts, host, index, name, uuid, util_pct,
mem_used_mib, mem_total_mib, temp_c, power_w, sm_clock_mhz, throttle_reasons (decoded names), processes
(pid, name, used_mib), plus host_ram_used_mib, host_ram_total_mib and disk_free_gib of the checkpoints volume.
A field NVML cannot read on this card (not supported, no permission...) is null; the other fields still come.

Limits, stated plainly:
- No NVML library, no driver or no GPU: one `event` line (`no_nvml`, `no_gpu`, `nvml_error`) says so, then the
  monitor retries every --retry-interval seconds (default 60) and writes nothing more until the state changes.
  It never exits on its own, so a restart policy never turns it into a crash loop.
- Per-process memory shows the PIDs NVML reports; inside a container those are the host's PIDs, so `name` is
  null for processes outside our PID namespace.
- Rotation is by size: when the file would exceed --max-bytes it becomes `<output>.1` (older ones shift up to
  --keep); readers that want history read the rotated files first (see `training.runfiles.rotated_files`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from training.disk import free_bytes
from training.jsonio import append_jsonl
from training.runfiles import GPU_METRICS
from training.stop_signal import StopSignal

log = logging.getLogger("training.gpu_monitor")

DEFAULT_OUTPUT = f"logs/{GPU_METRICS}"
DEFAULT_INTERVAL_S = 5.0
RETRY_INTERVAL_S = 60.0  # NVML missing is rarely fixed within a minute; slower retries keep the log quiet
DEFAULT_MAX_BYTES = 50 * 1024 * 1024  # ~600 B per GPU sample every 5 s: one GPU fills this in about 5 days
DEFAULT_KEEP = 3  # rotated files kept beside the live one

MIB = 1024 * 1024
GIB = 1024 * MIB

# NVML clock event ("throttle") reason bits -> readable names. Stable NVML constants (nvml.h), decoded here so a
# record says "sw_power_cap" rather than 4.
THROTTLE_REASON_NAMES = {
    0x0001: "gpu_idle",
    0x0002: "applications_clocks_setting",
    0x0004: "sw_power_cap",
    0x0008: "hw_slowdown",
    0x0010: "sync_boost",
    0x0020: "sw_thermal_slowdown",
    0x0040: "hw_thermal_slowdown",
    0x0080: "hw_power_brake_slowdown",
    0x0100: "display_clock_setting",
}


def decode_throttle_reasons(mask: int) -> list[str]:
    """Bitmask -> list of names; bits this table does not know are kept as hex so nothing is hidden."""
    names = [name for bit, name in THROTTLE_REASON_NAMES.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASON_NAMES)
    if unknown:
        names.append(f"unknown_{unknown:#x}")
    return names


class RotatingJsonlWriter:
    """Appends whole JSON lines (training.jsonio.append_jsonl) and rotates by size, keeping the newest data."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep

    def write(self, records: list[dict[str, Any]]) -> None:
        """Write one sample's records; rotate first if they would push the live file past max_bytes."""
        if not records:
            return
        if self.max_bytes > 0:
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            incoming = sum(len(json.dumps(r, ensure_ascii=False, default=str)) + 1 for r in records)
            if size > 0 and size + incoming > self.max_bytes:
                self.rotate()
        for record in records:
            append_jsonl(self.path, record)

    def rotate(self) -> None:
        """<path>.{keep-1} -> <path>.{keep}, ..., <path> -> <path>.1; the oldest beyond `keep` is deleted."""
        if self.keep <= 0:
            self.path.unlink(missing_ok=True)
            return
        oldest = self.path.with_name(f"{self.path.name}.{self.keep}")
        oldest.unlink(missing_ok=True)
        for n in range(self.keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{n}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{n + 1}"))
        if self.path.exists():
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


def host_memory() -> tuple[float | None, float | None]:
    """(used MiB, total MiB) of host RAM; used = total - available, as `free` reports it."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return round((vm.total - vm.available) / MIB, 1), round(vm.total / MIB, 1)
    except Exception:  # noqa: BLE001 - a missing reading is null, never a crash of the sidecar
        return None, None


def disk_free_gib(path: str | os.PathLike) -> float | None:
    """Free space of the filesystem holding `path` (or its nearest existing parent: outputs/ may not exist yet)."""
    try:
        return round(free_bytes(path)[0] / GIB, 2)
    except OSError:
        return None


def process_name(pid: int) -> str | None:
    try:
        import psutil

        return psutil.Process(pid).name()
    except Exception:  # noqa: BLE001 - other PID namespace, process gone, no permission: all mean "unknown"
        return None


class NvmlSampler:
    """Reads one sample of every GPU through an NVML module (pynvml or a test's fake with the same names)."""

    def __init__(self, nvml: ModuleType | Any):
        self.nvml = nvml
        # Errors that mean the device or the library is gone, not that one field is unsupported: they end the
        # sample and send the monitor back to its retry loop.
        self._fatal_codes = {
            getattr(nvml, name)
            for name in ("NVML_ERROR_UNINITIALIZED", "NVML_ERROR_GPU_IS_LOST", "NVML_ERROR_DRIVER_NOT_LOADED",
                         "NVML_ERROR_LIBRARY_NOT_FOUND", "NVML_ERROR_RESET_REQUIRED")
            if hasattr(nvml, name)
        }

    def _field(self, read: Callable[[], Any]) -> Any:
        """One field: its value, or None when NVML cannot read it on this card."""
        try:
            return read()
        except self.nvml.NVMLError as exc:
            if getattr(exc, "value", None) in self._fatal_codes:
                raise
            return None

    def _throttle_reasons(self, handle: Any) -> list[str] | None:
        nv = self.nvml
        # Newer drivers call them "clock event reasons"; older nvidia-ml-py only has the throttle name.
        fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        if fn is None:
            return None
        mask = self._field(lambda: fn(handle))
        return None if mask is None else decode_throttle_reasons(int(mask))

    def _processes(self, handle: Any) -> list[dict[str, Any]] | None:
        procs = self._field(lambda: self.nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        if procs is None:
            return None
        out = []
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            out.append({"pid": int(p.pid), "name": process_name(int(p.pid)),
                        "used_mib": None if used is None else round(used / MIB, 1)})
        return out

    def sample_device(self, index: int) -> dict[str, Any]:
        nv = self.nvml
        h = nv.nvmlDeviceGetHandleByIndex(index)
        f = self._field
        util = f(lambda: nv.nvmlDeviceGetUtilizationRates(h))
        mem = f(lambda: nv.nvmlDeviceGetMemoryInfo(h))
        power_mw = f(lambda: nv.nvmlDeviceGetPowerUsage(h))
        return {
            "index": index,
            "name": f(lambda: _text(nv.nvmlDeviceGetName(h))),
            "uuid": f(lambda: _text(nv.nvmlDeviceGetUUID(h))),
            "util_pct": None if util is None else util.gpu,
            "mem_used_mib": None if mem is None else round(mem.used / MIB, 1),
            "mem_total_mib": None if mem is None else round(mem.total / MIB, 1),
            "temp_c": f(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            "power_w": None if power_mw is None else round(power_mw / 1000.0, 1),
            "sm_clock_mhz": f(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
            "throttle_reasons": self._throttle_reasons(h),
            "processes": self._processes(h),
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GpuMonitor:
    """The sidecar's loop: init NVML, sample every interval, write, and fall back to slow retries on trouble."""

    def __init__(self, output: str | os.PathLike = DEFAULT_OUTPUT, interval: float = DEFAULT_INTERVAL_S,
                 disk_path: str | os.PathLike = "outputs", nvml: ModuleType | Any | None = None,
                 retry_interval: float = RETRY_INTERVAL_S, max_bytes: int = DEFAULT_MAX_BYTES,
                 keep: int = DEFAULT_KEEP, host: str | None = None):
        if nvml is None:
            import pynvml as nvml  # nvidia-ml-py; importing needs no driver, nvmlInit does
        self.nvml = nvml
        self.sampler = NvmlSampler(nvml)
        self.writer = RotatingJsonlWriter(output, max_bytes=max_bytes, keep=keep)
        self.interval = interval
        self.retry_interval = retry_interval
        self.disk_path = disk_path
        self.host = host or socket.gethostname()
        self.stop_event = StopSignal()  # not threading.Event: SIGTERM may arrive inside its wait()
        self.initialised = False
        self.problem: str | None = None  # event name of the current trouble; one line per change, not per retry

    # -- one step -----------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Try one sample. True when GPU lines were written; False when in trouble (caller waits retry_interval)."""
        nv = self.nvml
        try:
            if not self.initialised:
                nv.nvmlInit()
                self.initialised = True
            count = nv.nvmlDeviceGetCount()
            if count == 0:
                self._trouble("no_gpu", "NVML sees no GPU: check that the container gets the GPU "
                              "(compose GPU override / `--gpus all`) and that `nvidia-smi` lists one")
                return False
            ts = time.time()
            ram_used, ram_total = host_memory()
            extra = {"host_ram_used_mib": ram_used, "host_ram_total_mib": ram_total,
                     "disk_free_gib": disk_free_gib(self.disk_path)}
            records = [{"ts": ts, "host": self.host, **self.sampler.sample_device(i), **extra}
                       for i in range(count)]
        except nv.NVMLError as exc:
            self._nvml_failed(exc)
            return False
        if self.problem is not None:
            log.info("NVML back after %s: sampling %d GPU(s)", self.problem, len(records))
            self.problem = None
        self.writer.write(records)
        return True

    def _nvml_failed(self, exc: Exception) -> None:
        code = getattr(exc, "value", None)
        if code in (getattr(self.nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", object()),
                    getattr(self.nvml, "NVML_ERROR_DRIVER_NOT_LOADED", object())):
            self._trouble("no_nvml", f"NVML unavailable ({exc}): no NVIDIA driver here, or the container does not "
                          "get it (NVIDIA Container Toolkit, compose GPU override). Retrying every "
                          f"{self.retry_interval:g} s.")
        else:
            self._trouble("nvml_error", f"NVML error: {exc} (code {code}). Retrying every "
                          f"{self.retry_interval:g} s.")
        if self.initialised:
            try:
                self.nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - a lost GPU may refuse shutdown too; we re-init on the next try
                pass
            self.initialised = False

    def _trouble(self, event: str, message: str) -> None:
        if self.problem == event:
            log.debug("%s persists", event)
            return
        self.problem = event
        log.warning("%s: %s", event, message)
        self.writer.write([{"ts": time.time(), "host": self.host, "event": event, "message": message,
                            "retry_in_s": self.retry_interval}])

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self, max_samples: int = 0) -> int:
        """Sample until stop() (SIGTERM/SIGINT) or max_samples GPU samples (0 = forever). Returns 0."""
        done = 0
        try:
            while not self.stop_event.is_set():
                started = time.monotonic()
                ok = self.step()
                if ok:
                    done += 1
                    if max_samples and done >= max_samples:
                        break
                wait = self.interval if ok else self.retry_interval
                self.stop_event.wait(max(0.0, wait - (time.monotonic() - started)))
        finally:
            if self.initialised:
                try:
                    self.nvml.nvmlShutdown()
                except Exception:  # noqa: BLE001 - exiting anyway
                    pass
                self.initialised = False
        return 0

    def stop(self, *_: Any) -> None:
        self.stop_event.set()


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.gpu_monitor", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=DEFAULT_OUTPUT, help=f"JSONL file to append to (default {DEFAULT_OUTPUT})")
    p.add_argument("--interval", type=float, default=None,
                   help=f"seconds between samples (default $GPU_MONITOR_INTERVAL or {DEFAULT_INTERVAL_S:g})")
    p.add_argument("--disk-path", default="outputs",
                   help="folder whose filesystem's free space is reported: the checkpoints volume (default outputs)")
    p.add_argument("--retry-interval", type=float, default=RETRY_INTERVAL_S,
                   help=f"seconds between retries when NVML or the GPU is missing (default {RETRY_INTERVAL_S:g})")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help="rotate the output once it would pass this size (default 50 MiB; 0 = never)")
    p.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="rotated files kept (default 3)")
    p.add_argument("--samples", type=int, default=0, help="stop after this many samples (default 0 = run forever)")
    return p


def _interval_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> float:
    if args.interval is not None:
        value, where = args.interval, "--interval"
    else:
        raw = os.environ.get("GPU_MONITOR_INTERVAL", "")
        if not raw.strip():
            return DEFAULT_INTERVAL_S
        try:
            value, where = float(raw), "GPU_MONITOR_INTERVAL"
        except ValueError:
            parser.error(f"GPU_MONITOR_INTERVAL={raw!r} is not a number of seconds; set it to e.g. 5")
    if value <= 0:
        parser.error(f"{where}={value:g}: the interval must be a positive number of seconds, e.g. 5")
    return value


def main(argv: list[str] | None = None, nvml: ModuleType | Any | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    interval = _interval_from(args, parser)
    if args.retry_interval <= 0:
        parser.error(f"--retry-interval={args.retry_interval:g}: must be a positive number of seconds, e.g. 60")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gpu_monitor %(levelname)s %(message)s")
    monitor = GpuMonitor(args.output, interval=interval, disk_path=args.disk_path, nvml=nvml,
                         retry_interval=args.retry_interval, max_bytes=args.max_bytes, keep=args.keep)
    monitor.stop_event.install()
    log.info("sampling every %g s into %s", interval, args.output)
    rc = monitor.run(max_samples=args.samples)
    log.info("stopped")
    return rc


if __name__ == "__main__":
    sys.exit(main())
