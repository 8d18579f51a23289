"""GPU monitor: records per the GPU JSONL contract, nulls for unreadable fields, driver trouble, rotation, SIGTERM.

NVML is replaced by tests/fake_nvml.py, a mock of the driver library only (no NVIDIA driver exists on CI machines);
it raises the real pynvml error classes. Files, rotation, signals and subprocesses are real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pynvml
import pytest

from tests.fake_nvml import FakeGpu, FakeNvml
from training.gpu_monitor import GpuMonitor, RotatingJsonlWriter, decode_throttle_reasons, main
from training.runfiles import read_records, rotated_files

REPO = Path(__file__).resolve().parents[1]
GPU_FIELDS = {"ts", "host", "index", "name", "uuid", "util_pct", "mem_used_mib", "mem_total_mib", "temp_c",
              "power_w", "sm_clock_mhz", "throttle_reasons", "processes", "host_ram_used_mib",
              "host_ram_total_mib", "disk_free_gib"}


def parse_every_line(path: Path) -> list[dict]:
    """Strict reader: every line must be a whole JSON object (the writer's promise)."""
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "last line not terminated"
    return [json.loads(line) for line in raw.decode().splitlines()]


def make_monitor(tmp_path: Path, nvml: FakeNvml, **kw) -> GpuMonitor:
    kw.setdefault("interval", 0.01)
    kw.setdefault("retry_interval", 60)
    return GpuMonitor(tmp_path / "gpu_metrics.jsonl", disk_path=tmp_path, nvml=nvml, host="testhost", **kw)


def test_sample_has_contract_fields_and_units(tmp_path):
    nvml = FakeNvml([FakeGpu(), FakeGpu(name=b"NVIDIA H100 80GB HBM3", uuid="GPU-1", util_pct=3, mem_used_mib=500,
                                        mem_total_mib=81_559, throttle_mask=0x1, processes=[])])
    mon = make_monitor(tmp_path, nvml)
    assert mon.step() is True
    recs = parse_every_line(tmp_path / "gpu_metrics.jsonl")
    assert [r["index"] for r in recs] == [0, 1]
    for r in recs:
        assert set(r) == GPU_FIELDS
        assert r["host"] == "testhost"
        assert r["host_ram_total_mib"] > 0 and 0 < r["host_ram_used_mib"] <= r["host_ram_total_mib"]
        assert r["disk_free_gib"] > 0
    assert recs[0]["ts"] == recs[1]["ts"], "one sample shares one timestamp"
    a, b = recs
    assert (a["name"], a["util_pct"], a["mem_used_mib"], a["mem_total_mib"]) == ("NVIDIA GeForce RTX 4090", 87,
                                                                                 20_000, 24_564)
    assert (a["temp_c"], a["power_w"], a["sm_clock_mhz"]) == (71, 312.5, 2520)
    assert a["throttle_reasons"] == ["sw_power_cap", "sw_thermal_slowdown"]
    (proc,) = a["processes"]
    assert (proc["pid"], proc["used_mib"]) == (4242, 19_000.0) and "name" in proc
    assert b["name"] == "NVIDIA H100 80GB HBM3", "bytes names (old nvidia-ml-py) are decoded"
    assert b["throttle_reasons"] == ["gpu_idle"] and b["processes"] == []


def test_process_name_resolved_for_a_visible_pid(tmp_path):
    nvml = FakeNvml([FakeGpu(processes=[(os.getpid(), None)])])
    make_monitor(tmp_path, nvml).step()
    (rec,) = read_records(tmp_path / "gpu_metrics.jsonl")
    assert rec["processes"] == [{"pid": os.getpid(), "name": rec["processes"][0]["name"], "used_mib": None}]
    assert rec["processes"][0]["name"], "our own process has a name"


def test_decode_throttle_reasons_keeps_unknown_bits():
    assert decode_throttle_reasons(0) == []
    assert decode_throttle_reasons(0x8 | 0x40) == ["hw_slowdown", "hw_thermal_slowdown"]
    assert decode_throttle_reasons(0x1 | 0x10000) == ["gpu_idle", "unknown_0x10000"]


def test_unsupported_fields_are_null_and_the_rest_still_come(tmp_path):
    gpu = FakeGpu(unsupported={"nvmlDeviceGetPowerUsage", "nvmlDeviceGetTemperature",
                               "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetComputeRunningProcesses",
                               "nvmlDeviceGetMemoryInfo"})
    mon = make_monitor(tmp_path, FakeNvml([gpu]))
    assert mon.step() is True
    (rec,) = parse_every_line(tmp_path / "gpu_metrics.jsonl")
    assert set(rec) == GPU_FIELDS
    for key in ("power_w", "temp_c", "throttle_reasons", "processes", "mem_used_mib", "mem_total_mib"):
        assert rec[key] is None, key
    assert rec["util_pct"] == 87 and rec["sm_clock_mhz"] == 2520 and rec["name"] == "NVIDIA GeForce RTX 4090"


def test_old_nvml_without_clock_event_name_uses_throttle_name(tmp_path):
    class OldNvml(FakeNvml):
        nvmlDeviceGetCurrentClocksEventReasons = None  # hidden: getattr finds None

        def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
            return 0x4

    make_monitor(tmp_path, OldNvml()).step()
    assert read_records(tmp_path / "gpu_metrics.jsonl")[0]["throttle_reasons"] == ["sw_power_cap"]


def test_nvml_error_mid_run_gives_one_event_then_recovers(tmp_path):
    nvml = FakeNvml()
    mon = make_monitor(tmp_path, nvml)
    assert mon.step() is True
    nvml.fail_count = pynvml.NVML_ERROR_GPU_IS_LOST
    assert mon.step() is False
    assert mon.step() is False
    assert mon.step() is False
    nvml.fail_count = None
    assert mon.step() is True
    recs = parse_every_line(tmp_path / "gpu_metrics.jsonl")
    assert [r.get("event") for r in recs] == [None, "nvml_error", None], "one event line for three failures"
    assert "GPU is lost" in recs[1]["message"] and recs[1]["retry_in_s"] == 60
    assert nvml.shutdown_calls >= 1 and nvml.init_calls == 4, "re-inits NVML after the error"


def test_a_lost_gpu_during_a_field_read_is_not_a_null_field(tmp_path):
    gpu = FakeGpu()
    nvml = FakeNvml([gpu])
    mon = make_monitor(tmp_path, nvml)

    def lost(h):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    nvml.nvmlDeviceGetPowerUsage = lost
    assert mon.step() is False
    (rec,) = parse_every_line(tmp_path / "gpu_metrics.jsonl")
    assert rec["event"] == "nvml_error", "a half-read sample of a lost GPU is not written"


def run_then_stop(mon, seconds: float) -> bool:
    """Run the monitor loop in a thread for `seconds`, stop it; True when the thread ended within 5 s."""
    t = threading.Thread(target=mon.run)
    t.start()
    time.sleep(seconds)
    mon.stop()
    t.join(timeout=5)
    return not t.is_alive()


@pytest.mark.parametrize("code,event", [(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "no_nvml"),
                                        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "no_nvml"),
                                        (pynvml.NVML_ERROR_NO_PERMISSION, "nvml_error")])
def test_no_driver_one_event_line_then_slow_retries(tmp_path, code, event):
    nvml = FakeNvml(fail_init=code)
    mon = make_monitor(tmp_path, nvml, interval=0.001, retry_interval=0.05)
    assert run_then_stop(mon, 0.6), "stop() ends the retry wait"
    recs = parse_every_line(tmp_path / "gpu_metrics.jsonl")
    assert len(recs) == 1 and recs[0]["event"] == event
    assert set(recs[0]) == {"ts", "host", "event", "message", "retry_in_s"}
    # retried (every 0.05 s, ~12 in 0.6 s), but at the retry pace, not the 0.001 s sampling pace (~600)
    assert 2 <= nvml.init_calls <= 40


def test_retry_interval_is_used_not_sampling_interval(tmp_path):
    nvml = FakeNvml(fail_init=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    mon = make_monitor(tmp_path, nvml, interval=0.001, retry_interval=60)
    assert run_then_stop(mon, 0.3), "stop() ends the retry wait"
    assert nvml.init_calls == 1, "a 60 s retry interval means one try in 0.3 s"


def test_no_gpu_event_then_gpu_appears(tmp_path):
    nvml = FakeNvml(gpus=[])
    mon = make_monitor(tmp_path, nvml)
    assert mon.step() is False and mon.step() is False
    nvml.gpus.append(FakeGpu())
    assert mon.step() is True
    recs = parse_every_line(tmp_path / "gpu_metrics.jsonl")
    assert [r.get("event") for r in recs] == ["no_gpu", None]


def test_run_stops_after_max_samples(tmp_path):
    nvml = FakeNvml([FakeGpu(), FakeGpu(uuid="GPU-1")])
    rc = make_monitor(tmp_path, nvml, interval=0.001).run(max_samples=5)
    assert rc == 0
    recs = parse_every_line(tmp_path / "gpu_metrics.jsonl")
    assert len(recs) == 10 and [r["index"] for r in recs[:4]] == [0, 1, 0, 1]
    assert nvml.shutdown_calls == 1, "NVML shut down on exit"


def test_rotation_keeps_newest_data_and_bounds_files(tmp_path):
    out = tmp_path / "gpu_metrics.jsonl"
    writer = RotatingJsonlWriter(out, max_bytes=2_000, keep=2)
    for i in range(300):
        writer.write([{"ts": float(i), "seq": i, "pad": "x" * 40}])
    files = rotated_files(out)
    assert [f.name for f in files] == ["gpu_metrics.jsonl.2", "gpu_metrics.jsonl.1", "gpu_metrics.jsonl"]
    assert not (tmp_path / "gpu_metrics.jsonl.3").exists()
    seqs = [r["seq"] for f in files for r in parse_every_line(f)]
    assert seqs[-1] == 299, "newest record is in the live file"
    assert seqs == list(range(seqs[0], 300)), "oldest-first order, no gap, no duplicate"
    assert seqs[0] > 200, "old data was dropped, not the new"
    for f in files:
        assert f.stat().st_size <= 2_000


def test_monitor_rotates_whole_samples(tmp_path):
    nvml = FakeNvml([FakeGpu(), FakeGpu(uuid="GPU-1")])
    mon = make_monitor(tmp_path, nvml, interval=0.001, max_bytes=4_000, keep=1)
    mon.run(max_samples=40)
    files = rotated_files(tmp_path / "gpu_metrics.jsonl")
    assert len(files) == 2
    for f in files:
        recs = parse_every_line(f)
        assert recs and recs[0]["index"] == 0 and recs[-1]["index"] == 1, "a sample never straddles two files"


def test_bad_interval_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPU_MONITOR_INTERVAL", "five")
    with pytest.raises(SystemExit) as exc:
        main(["--output", str(tmp_path / "g.jsonl")], nvml=FakeNvml())
    assert exc.value.code == 2
    assert "GPU_MONITOR_INTERVAL='five'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path / "g.jsonl"), "--interval", "0"], nvml=FakeNvml())


def test_env_interval_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_MONITOR_INTERVAL", "0.01")
    out = tmp_path / "g.jsonl"
    assert main(["--output", str(out), "--samples", "3", "--disk-path", str(tmp_path)], nvml=FakeNvml()) == 0
    assert len(parse_every_line(out)) == 3


def _start(code: str, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not get {n} lines in {timeout} s")


def test_sigterm_while_sampling_exits_zero_with_whole_lines(tmp_path):
    out = tmp_path / "gpu_metrics.jsonl"
    code = ("import sys; from tests.fake_nvml import FakeNvml, FakeGpu; from training.gpu_monitor import main; "
            f"sys.exit(main(['--output', {str(out)!r}, '--interval', '0.002', '--disk-path', '.'], "
            "nvml=FakeNvml([FakeGpu(), FakeGpu(uuid='GPU-1')])))")
    proc = _start(code, tmp_path)
    _wait_for_lines(out, 20, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "stopped" in err
    recs = parse_every_line(out)
    assert len(recs) >= 20 and all(set(r) == GPU_FIELDS for r in recs)


def test_real_cli_without_driver_logs_event_and_exits_on_sigterm(tmp_path):
    """The real pynvml on a machine with no NVIDIA driver (CI): one no_nvml line, then waits; SIGTERM ends it."""
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present here; the fake-NVML tests cover the no-driver path")
    except pynvml.NVMLError:
        pass
    out = tmp_path / "logs" / "gpu_metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "training.gpu_monitor", "--output", str(out), "--interval", "0.01"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(out, 1, proc)
    time.sleep(0.3)  # at a 0.01 s interval a crash loop or a flood would show up here
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    recs = parse_every_line(out)
    assert [r["event"] for r in recs] == ["no_nvml"]
    assert "driver" in recs[0]["message"]
