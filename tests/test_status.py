"""train-status: finished, running, failed, stopped and no runs; warnings; tolerant reading; --json round-trip.

Metric files are written per docs/contracts.md (logs/<run>/metrics.jsonl, logs/gpu_metrics.jsonl,
outputs/<run>/checkpoint-N/COMPLETE, backup/<run>/checkpoint-N/). The CLI runs as a real subprocess; Docker is the
real engine when one answers (else that test skips).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from training.jsonio import append_jsonl
from training.status import NO_RUNS_MESSAGE, collect_status, loss_trend, render

REPO = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000.0  # a fixed clock: ages and staleness are computed against `now` passed in


def write_run(root: Path, name: str, steps: int, max_steps: int, end: dict | None = None, t0: float = T0,
              dt: float = 10.0, loss0: float = 4.0, dloss: float = -0.05, tokens_per_s: float = 1500.0) -> Path:
    """A run's metrics.jsonl as the trainer writes it: start, one line per step, checkpoint events, an end event."""
    path = root / "logs" / name / "metrics.jsonl"
    append_jsonl(path, {"event": "start", "ts": t0, "run": name, "step": 0, "preset": "tiny", "device": "cpu",
                        "max_steps": max_steps})
    for s in range(1, steps + 1):
        append_jsonl(path, {"ts": t0 + s * dt, "run": name, "step": s, "max_steps": max_steps, "epoch": s / 20,
                            "loss": loss0 + dloss * s, "learning_rate": 2e-4 * (1 - s / max_steps),
                            "grad_norm": 0.5, "tokens_per_s": tokens_per_s, "eta_s": (max_steps - s) * dt})
        if s % 10 == 0:
            append_jsonl(path, {"event": "checkpoint", "ts": t0 + s * dt, "run": name, "step": s,
                                "path": f"outputs/{name}/checkpoint-{s}"})
    if end is not None:
        append_jsonl(path, {"ts": t0 + steps * dt + 1, "run": name, "step": steps, **end})
    return path


def write_checkpoint(root: Path, run: str, step: int, size: int = 4096, complete: bool = True) -> Path:
    d = root / "outputs" / run / f"checkpoint-{step}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_model.safetensors").write_bytes(b"\0" * size)
    if complete:
        manifest = {"step": step, "created": T0 + step, "files": {
            "adapter_model.safetensors": {"size": size, "sha256": "0" * 64}}}
        (d / "COMPLETE").write_text(json.dumps(manifest))
    return d


def write_backup(root: Path, run: str, step: int, mtime: float) -> Path:
    d = root / "backup" / run / f"checkpoint-{step}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    os.utime(d, (mtime, mtime))
    return d


def status_of(root: Path, now: float, run: str | None = None, **kw) -> dict:
    return collect_status(root / "logs", root / "outputs", root / "backup", run=run, now=now, docker=False, **kw)


def screen(status: dict) -> str:
    console = Console(record=True, width=300)
    console.print(render(status))
    return console.export_text()


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.status", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env)


# --------------------------------------------------------------------------------------------------------------
def test_finished_run(tmp_path):
    write_run(tmp_path, "tiny-1", steps=40, max_steps=40, end={"event": "finished", "train_loss_last": 2.0})
    for s in (10, 20, 30, 40):
        write_checkpoint(tmp_path, "tiny-1", s)
    write_backup(tmp_path, "tiny-1", 30, mtime=T0 + 100)
    now = T0 + 3600
    st = status_of(tmp_path, now)
    run = st["run"]
    assert run["name"] == "tiny-1" and run["status"] == "finished"
    assert (run["step"], run["max_steps"], run["progress_pct"]) == (40, 40, 100.0)
    assert run["loss"] == pytest.approx(4.0 - 0.05 * 40)
    assert run["loss_trend"]["direction"] == "down" and run["loss_trend"]["window"] == 10
    assert run["loss_trend"]["change"] == pytest.approx(-0.45)
    assert run["tokens_per_s"] == 1500.0 and run["eta_s"] == 0.0
    assert run["last_checkpoint"]["step"] == 40 and run["last_checkpoint"]["size_bytes"] == 4096
    assert run["incomplete_checkpoints"] == []
    assert run["last_backup"]["step"] == 30 and run["last_backup"]["age_s"] == pytest.approx(3500, abs=1)
    assert run["last_record_age_s"] == pytest.approx(3600 - 401)
    assert st["warnings"] == [], "a finished run is not stale"
    text = screen(st)
    for needle in ("finished", "40 / 40", "2.0000", "1,500", "checkpoint-40", "58m"):
        assert needle in text, needle


def test_running_run_with_incomplete_checkpoint(tmp_path):
    write_run(tmp_path, "gemma", steps=30, max_steps=100, dt=5.0, dloss=-0.01)
    write_checkpoint(tmp_path, "gemma", 20)
    write_checkpoint(tmp_path, "gemma", 30, complete=False)  # being written right now
    now = T0 + 30 * 5 + 20
    st = status_of(tmp_path, now)
    run = st["run"]
    assert run["status"] == "running"
    assert (run["step"], run["max_steps"], run["progress_pct"]) == (30, 100, 30.0)
    assert run["eta_s"] == 70 * 5.0
    assert run["last_checkpoint"]["step"] == 20
    assert run["incomplete_checkpoints"] == ["checkpoint-30: no COMPLETE marker (the save did not finish)"]
    assert run["last_backup"] is None
    assert run["last_record_age_s"] == pytest.approx(20)
    assert st["warnings"] == []
    text = screen(st)
    for needle in ("running", "30 / 100", "(30.0%)", "ETA", "5m 50s", "checkpoint-20",
                   "not complete: checkpoint-30: no COMPLETE marker", "last backup      none"):
        assert needle in text, needle


def test_running_run_without_metrics_for_long_warns(tmp_path):
    write_run(tmp_path, "hung", steps=5, max_steps=100)
    last = T0 + 50
    assert not status_of(tmp_path, last + 9 * 60)["warnings"]
    warnings = status_of(tmp_path, last + 11 * 60)["warnings"]
    assert [w["code"] for w in warnings] == ["metrics_stale"]
    assert "11m" in warnings[0]["message"]
    assert [w["code"] for w in status_of(tmp_path, last + 3 * 60, stale_minutes=2)["warnings"]] == ["metrics_stale"]


def test_failed_run(tmp_path):
    write_run(tmp_path, "oom", steps=12, max_steps=100, end={"event": "failed", "error": "CUDA out of memory"})
    write_checkpoint(tmp_path, "oom", 10)
    st = status_of(tmp_path, T0 + 10_000)
    run = st["run"]
    assert run["status"] == "failed" and run["error"] == "CUDA out of memory"
    assert run["step"] == 12 and run["eta_s"] is None
    assert [w["code"] for w in st["warnings"]] == ["run_failed"], "failed, not also stale"
    assert "failed (CUDA out of memory)" in screen(st)


def test_stopped_then_resumed_run(tmp_path):
    path = write_run(tmp_path, "r", steps=10, max_steps=50, end={"event": "stopped", "signal": "SIGTERM"})
    st = status_of(tmp_path, T0 + 200)
    assert st["run"]["status"] == "stopped" and st["run"]["signal"] == "SIGTERM"
    append_jsonl(path, {"event": "resumed", "ts": T0 + 300, "run": "r", "step": 10, "path": "outputs/r/checkpoint-10"})
    append_jsonl(path, {"ts": T0 + 310, "run": "r", "step": 11, "max_steps": 50, "loss": 3.0, "tokens_per_s": 900.0,
                        "eta_s": 390.0})
    st = status_of(tmp_path, T0 + 320)
    assert st["run"]["status"] == "running" and st["run"]["step"] == 11 and st["run"]["tokens_per_s"] == 900.0


def test_a_run_whose_process_was_killed_hard_is_shown_died(tmp_path):
    """A real process writes the start event as the recipe does (training.runfiles.log_event: host and pid), then
    is killed with SIGKILL, so no last record is written: status says died (not running forever), with the resume
    hint; while it lives, running."""
    metrics = tmp_path / "logs" / "killed" / "metrics.jsonl"
    code = ("import sys, time; from pathlib import Path; from training.runfiles import log_event; "
            "log_event(Path(sys.argv[1]), 'killed', 0, 'start', max_steps=100); print('ready', flush=True); "
            "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(metrics)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        start = json.loads(metrics.read_text().splitlines()[0])
        assert start["pid"] == proc.pid and start["host"]
        assert status_of(tmp_path, time.time())["run"]["status"] == "running"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    st = status_of(tmp_path, time.time())
    assert st["run"]["status"] == "died" and f"pid {proc.pid}" in st["run"]["error"]
    assert [w["code"] for w in st["warnings"]] == ["run_died"] and "resumes it" in st["warnings"][0]["message"]
    assert "died (its process" in screen(st)


def test_a_run_whose_container_exited_is_shown_died(tmp_path):
    """In a container the start event's host is the container's short id: a run still 'running' by its events
    whose container exited (OOM-killed here) or is gone (a later run's replaced it) is died; with its container up
    it runs."""
    path = write_run(tmp_path, "boxed", steps=5, max_steps=100)
    lines = path.read_text().splitlines()
    start = {**json.loads(lines[0]), "host": "0123456789ab", "pid": 7}
    path.write_text("\n".join([json.dumps(start), *lines[1:]]) + "\n")

    def inspect(status: str, exit_code: int) -> str:
        return json.dumps([{"Id": "0123456789ab" + "c" * 52, "Name": "/agent-qlora-training",
                            "Config": {"Image": "qlora", "Labels": {"com.docker.compose.service": "qlora-training"}},
                            "State": {"Status": status, "ExitCode": exit_code, "OOMKilled": exit_code == 137,
                                      "StartedAt": "2027-01-15T08:00:00Z", "FinishedAt": "2027-01-15T08:01:00Z"}}])

    up = collect_status(tmp_path / "logs", tmp_path / "outputs", tmp_path / "backup", now=T0 + 60,
                        docker_inspect=inspect("running", 0))
    assert up["run"]["status"] == "running"
    down = collect_status(tmp_path / "logs", tmp_path / "outputs", tmp_path / "backup", now=T0 + 60,
                          docker_inspect=inspect("exited", 137))
    assert down["run"]["status"] == "died" and "agent-qlora-training exited (137)" in down["run"]["error"]
    assert "OOM-killed" in down["run"]["error"]
    replaced = collect_status(tmp_path / "logs", tmp_path / "outputs", tmp_path / "backup", now=T0 + 60,
                              docker_inspect=inspect("running", 0).replace("0123456789ab", "ba9876543210"))
    assert replaced["run"]["status"] == "died" and "(0123456789ab) is gone" in replaced["run"]["error"]
    unknown = collect_status(tmp_path / "logs", tmp_path / "outputs", tmp_path / "backup", now=T0 + 60, docker=False)
    assert unknown["run"]["status"] == "running"  # no view of the containers: not guessed


def test_no_runs_fresh_dir(tmp_path):
    st = status_of(tmp_path, T0)
    assert st["run"] is None and st["runs"] == [] and st["message"] == NO_RUNS_MESSAGE
    assert st["gpu"]["gpus"] == [] and st["warnings"] == []
    proc = run_cli("--logs-dir", str(tmp_path / "logs"), "--output-dir", str(tmp_path / "outputs"), "--no-docker")
    assert proc.returncode == 0, proc.stderr
    assert "no runs yet: start one with make demo / make train-gemma-2b" in proc.stdout
    assert proc.stderr == ""


def test_latest_run_by_mtime_and_run_flag(tmp_path):
    old = write_run(tmp_path, "zzz-old", steps=3, max_steps=10)
    new = write_run(tmp_path, "aaa-new", steps=7, max_steps=10)
    os.utime(old, (T0, T0))
    os.utime(new, (T0 + 10, T0 + 10))
    assert status_of(tmp_path, T0 + 100)["run"]["name"] == "aaa-new"
    assert status_of(tmp_path, T0 + 100, run="zzz-old")["run"]["step"] == 3
    st = status_of(tmp_path, T0 + 100, run="nope")
    assert st["run"] is None and "no run 'nope'" in st["message"] and "aaa-new" in st["message"]
    proc = run_cli("--logs-dir", str(tmp_path / "logs"), "--run", "nope", "--no-docker")
    assert proc.returncode == 1 and "no run 'nope'" in proc.stdout and "Traceback" not in proc.stderr


def test_tolerates_cut_off_and_garbled_lines(tmp_path):
    path = write_run(tmp_path, "messy", steps=8, max_steps=20)
    with open(path, "ab") as fh:
        fh.write(b'{"ts": 1800000100.0, "run": "messy", "step": 9, "loss": "NaN?", "tokens_per_s": null}\n')
        fh.write(b"\xff\xfe not json at all\n")
        fh.write(b"[1, 2, 3]\n")
        fh.write(b'{"ts": 1800000110.0, "run": "messy", "step": 10, "max_st')  # writer killed mid-line
    (tmp_path / "logs" / "gpu_metrics.jsonl").write_bytes(b'{"ts": "yesterday", "index": 0}\n{"ts": 1.0, "ind')
    write_checkpoint(tmp_path, "messy", 4)
    ckpt = write_checkpoint(tmp_path, "messy", 5)
    (ckpt / "COMPLETE").write_text("{not json")  # marker present, manifest unreadable: not a checkpoint
    ckpt6 = write_checkpoint(tmp_path, "messy", 6)
    (ckpt6 / "adapter_model.safetensors").write_bytes(b"short")  # truncated after the marker was written
    st = status_of(tmp_path, T0 + 200)
    run = st["run"]
    assert run["step"] == 9, "the whole line with a garbled loss still counts for the step"
    assert run["loss"] == pytest.approx(4.0 - 0.05 * 8), "a non-number loss is skipped"
    assert run["tokens_per_s"] is None and run["max_steps"] == 20
    assert run["last_checkpoint"]["step"] == 4 and run["last_checkpoint"]["size_bytes"] == 4096
    assert [i.split(":")[0] for i in run["incomplete_checkpoints"]] == ["checkpoint-5", "checkpoint-6"]
    assert "marker unreadable" in run["incomplete_checkpoints"][0]
    assert "size 5 bytes" in run["incomplete_checkpoints"][1]
    assert st["gpu"]["gpus"] == []
    screen(st)
    proc = run_cli("--logs-dir", str(tmp_path / "logs"), "--output-dir", str(tmp_path / "outputs"), "--no-docker")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_unreadable_paths_are_not_tracebacks(tmp_path):
    (tmp_path / "logs").write_text("a file where a folder should be")
    proc = run_cli("--logs-dir", str(tmp_path / "logs"), "--output-dir", str(tmp_path / "nothing"), "--no-docker")
    assert proc.returncode == 0 and NO_RUNS_MESSAGE in proc.stdout and "Traceback" not in proc.stderr


def test_gpu_samples_latest_per_gpu_and_memory_warning(tmp_path):
    gpu_log = tmp_path / "logs" / "gpu_metrics.jsonl"
    pad = "x" * 300
    for i in range(2000):  # ~1 MB: more than the tail window, so only the tail is read
        for idx in (0, 1):
            append_jsonl(gpu_log, {"ts": T0 + i, "host": "h", "index": idx, "name": f"GPU{idx}", "util_pct": i % 100,
                                   "mem_used_mib": 81_000 if idx == 1 else 1_000, "mem_total_mib": 81_559,
                                   "temp_c": 60, "power_w": 300.5, "pad": pad})
    write_run(tmp_path, "r", steps=2, max_steps=10, t0=T0 + 1990)
    st = status_of(tmp_path, T0 + 2000)
    gpus = st["gpu"]["gpus"]
    assert [g["index"] for g in gpus] == [0, 1]
    assert gpus[0]["util_pct"] == 1999 % 100 and gpus[0]["age_s"] == pytest.approx(1)
    assert gpus[1]["mem_pct"] == pytest.approx(99.3, abs=0.1)
    assert [w["code"] for w in st["warnings"]] == ["gpu_memory_full"]
    assert "GPU 1 memory 99.3% full" in st["warnings"][0]["message"]
    text = screen(st)
    assert "81000/81559 MiB (99%)" in text and "300 W" in text


def test_gpu_monitor_event_newer_than_samples_is_shown(tmp_path):
    gpu_log = tmp_path / "logs" / "gpu_metrics.jsonl"
    append_jsonl(gpu_log, {"ts": T0, "index": 0, "name": "g", "util_pct": 5, "mem_used_mib": 1, "mem_total_mib": 2})
    append_jsonl(gpu_log, {"ts": T0 + 5, "event": "nvml_error", "message": "NVML error: GPU is lost"})
    st = status_of(tmp_path, T0 + 10)
    assert st["gpu"]["event"]["event"] == "nvml_error"
    assert "GPU is lost" in screen(st)


def test_disk_too_small_for_next_checkpoint(tmp_path):
    write_run(tmp_path, "big", steps=10, max_steps=100)
    ckpt = write_checkpoint(tmp_path, "big", 10, size=1024)
    assert status_of(tmp_path, T0 + 110)["warnings"] == []
    # A checkpoint as large as the free space (a sparse file: it takes no real room); the next needs 2x: no fit.
    free = shutil.disk_usage(tmp_path).free
    weights = ckpt / "adapter_model.safetensors"
    os.truncate(weights, free)
    manifest = json.loads((ckpt / "COMPLETE").read_text())
    manifest["files"]["adapter_model.safetensors"]["size"] = free
    (ckpt / "COMPLETE").write_text(json.dumps(manifest))
    st = status_of(tmp_path, T0 + 110)
    assert st["run"]["last_checkpoint"]["size_bytes"] == free
    assert [w["code"] for w in st["warnings"]] == ["disk_low"]
    assert "the next one may not fit" in st["warnings"][0]["message"]


def test_loss_trend():
    assert loss_trend([3.0]) is None
    assert loss_trend([3.0, 2.9, 2.8])["direction"] == "down"
    assert loss_trend([2.0, 2.5, 3.0])["change"] == pytest.approx(1.0)
    assert loss_trend([2.0, 2.001, 1.999, 2.0])["direction"] == "flat"


def test_json_round_trips(tmp_path):
    write_run(tmp_path, "j", steps=15, max_steps=30, end={"event": "finished", "train_loss_last": 3.25})
    write_checkpoint(tmp_path, "j", 10)
    args = ["--logs-dir", str(tmp_path / "logs"), "--output-dir", str(tmp_path / "outputs"),
            "--backup-dir", str(tmp_path / "backup"), "--no-docker"]
    proc = run_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert json.loads(json.dumps(data)) == data
    expected = status_of(tmp_path, data["ts"])
    expected = json.loads(json.dumps(expected, default=str))
    assert data == expected, "--json is exactly collect_status()"
    assert data["run"]["step"] == 15 and data["run"]["status"] == "finished"
    assert data["run"]["last_checkpoint"]["step"] == 10
    screen_proc = run_cli(*args)
    assert "15 / 30" in screen_proc.stdout and "finished" in screen_proc.stdout


def test_watch_refreshes_until_interrupted(tmp_path):
    write_run(tmp_path, "w", steps=3, max_steps=10)
    proc = subprocess.Popen([sys.executable, "-m", "training.status", "--logs-dir", str(tmp_path / "logs"),
                             "--no-docker", "--json", "--watch", "0.1"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = json.loads(proc.stdout.readline())
    append_jsonl(tmp_path / "logs" / "w" / "metrics.jsonl",
                 {"ts": T0 + 100, "run": "w", "step": 4, "max_steps": 10, "loss": 1.0})
    deadline = time.monotonic() + 30
    step = first["run"]["step"]
    while step != 4 and time.monotonic() < deadline:
        step = json.loads(proc.stdout.readline())["run"]["step"]
    proc.send_signal(2)  # SIGINT = Ctrl-C
    _, err = proc.communicate(timeout=20)
    assert first["run"]["step"] == 3 and step == 4
    assert proc.returncode == 0 and "Traceback" not in err


def test_without_docker_on_path_says_so(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # the venv's bin, no docker there
    proc = run_cli("--logs-dir", str(tmp_path / "logs"), env=env)
    assert proc.returncode == 0 and "docker not available" in proc.stdout and "Traceback" not in proc.stderr


def _docker_image() -> str | None:
    if shutil.which("docker") is None:
        return None
    try:
        out = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    images = [i for i in out.stdout.split() if i and "<none>" not in i] if out.returncode == 0 else []
    return images[0] if images else None


@pytest.mark.docker
@pytest.mark.skipif(_docker_image() is None and not os.environ.get("CI"),
                    reason="needs a Docker engine with any local image (CI installs one, so CI never skips)")
def test_training_container_exit_code_is_a_warning(tmp_path):
    assert _docker_image() is not None, "CI: no Docker engine or no local image (scripts/ci_install_docker.sh)"
    name = f"agent-qlora-training-statustest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "run", "--name", name, "--entrypoint", "sh", _docker_image(), "-c", "exit 3"],
                   capture_output=True, timeout=120)
    try:
        st = collect_status(tmp_path / "logs", tmp_path / "outputs", tmp_path / "backup", now=T0)
        assert st["containers"]["available"] is True
        (c,) = [c for c in st["containers"]["containers"] if c["name"] == name]
        assert c["state"] == "exited" and c["exit_code"] == 3
        assert any(w["code"] == "training_container_failed" and name in w["message"] for w in st["warnings"])
        assert name in screen(st)
        # status inside a container has no docker: the host pipes `docker inspect` in (make train-status)
        inspect = subprocess.run(["docker", "inspect", name], capture_output=True, text=True, timeout=60).stdout
        env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
        proc = subprocess.run([sys.executable, "-m", "training.status", "--logs-dir", str(tmp_path / "logs"),
                               "--json", "--docker-inspect", "-"], input=inspect, cwd=REPO, capture_output=True,
                              text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        piped = json.loads(proc.stdout)
        assert [(c["name"], c["exit_code"]) for c in piped["containers"]["containers"]] == [(name, 3)]
        assert [w["code"] for w in piped["warnings"]] == ["training_container_failed"]
        # 143: stopped by SIGTERM (make train-stop), the run saved and said so: no warning
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
        subprocess.run(["docker", "run", "--name", name, "--entrypoint", "sh", _docker_image(), "-c", "exit 143"],
                       capture_output=True, timeout=120)
        st = collect_status(tmp_path / "logs", tmp_path / "outputs", tmp_path / "backup", now=T0)
        assert [c["exit_code"] for c in st["containers"]["containers"] if c["name"] == name] == [143]
        assert not any(w["code"] == "training_container_failed" for w in st["warnings"])
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


def test_backup_records_from_backup_sidecar(tmp_path):
    """backup.py writes <backup>/<run>/LAST_BACKUP.json and <backup>/backup_events.jsonl; status prefers them."""
    write_run(tmp_path, "b", steps=20, max_steps=100)
    write_checkpoint(tmp_path, "b", 20)
    write_backup(tmp_path, "b", 10, mtime=T0 + 5)
    write_backup(tmp_path, "b", 20, mtime=T0 + 5)
    (tmp_path / "backup" / "b" / ".tmp-checkpoint-30-123").mkdir()  # a copy in progress is not a backup
    (tmp_path / "backup" / "b" / "LAST_BACKUP.json").write_text(json.dumps(
        {"ts": T0 + 150, "run": "b", "checkpoint": "checkpoint-20", "step": 20, "path": "x", "bytes": 16}))
    st = status_of(tmp_path, T0 + 210)
    bk = st["run"]["last_backup"]
    assert bk["step"] == 20 and bk["age_s"] == pytest.approx(60) and bk["last_error"] is None
    assert st["warnings"] == []
    append_jsonl(tmp_path / "backup" / "backup_events.jsonl",
                 {"ts": T0 + 100, "event": "failed", "run": "b", "checkpoint": "checkpoint-10", "error": "old"})
    assert status_of(tmp_path, T0 + 210)["warnings"] == [], "a failure older than the last copy is over"
    append_jsonl(tmp_path / "backup" / "backup_events.jsonl",
                 {"ts": T0 + 200, "event": "failed", "run": "b", "checkpoint": "checkpoint-30",
                  "error": "backup disk full", "disk_full": True})
    append_jsonl(tmp_path / "backup" / "backup_events.jsonl",
                 {"ts": T0 + 201, "event": "failed", "run": "other", "error": "not ours"})
    st = status_of(tmp_path, T0 + 210)
    assert [w["code"] for w in st["warnings"]] == ["backup_failed"]
    assert "backup disk full" in st["warnings"][0]["message"]
    assert "last attempt failed" in screen(st)


def test_docker_inspect_input_empty_or_garbled(tmp_path):
    """The host had no docker (empty pipe) or sent garbage: say so, no traceback."""
    for text, message in (("", "docker not available"), ("{oops", "docker inspect output unreadable"),
                          ("[]", "no stack containers")):
        proc = subprocess.run([sys.executable, "-m", "training.status", "--logs-dir", str(tmp_path / "logs"),
                               "--docker-inspect", "-"], input=text, cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and message in proc.stdout and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.docker
@pytest.mark.skipif(_docker_image() is None and not os.environ.get("CI"),
                    reason="needs a Docker engine with any local image (CI installs one, so CI never skips)")
def test_running_container_health_is_shown(tmp_path):
    name = f"agent-statustest-health-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(["docker", "run", "-d", "--name", name, "--health-cmd", "exit 1", "--health-interval", "1s",
                           "--health-retries", "1", "--entrypoint", "sleep", _docker_image(), "60"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    try:
        deadline = time.monotonic() + 30
        while True:
            st = collect_status(tmp_path / "logs", tmp_path / "outputs", tmp_path / "backup")
            (c,) = [c for c in st["containers"]["containers"] if c["name"] == name]
            if c["health"] == "unhealthy" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert c["state"] == "running" and c["status"].startswith("up ") and c["exit_code"] is None
        assert c["health"] == "unhealthy"
        assert any(w["code"] == "container_unhealthy" and name in w["message"] for w in st["warnings"])
        subprocess.run(["docker", "stop", "-t", "1", name], capture_output=True, timeout=60)
        st = collect_status(tmp_path / "logs", tmp_path / "outputs", tmp_path / "backup")
        (c,) = [c for c in st["containers"]["containers"] if c["name"] == name]
        assert c["state"] == "exited"  # an engine may keep its last health: a stopped service is not a fault
        assert not any(w["code"] == "container_unhealthy" for w in st["warnings"])
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)


def test_old_gpu_samples_during_a_run_warn(tmp_path):
    write_run(tmp_path, "r", steps=5, max_steps=100, t0=T0 + 19 * 60)  # metrics until T0 + 19 min 50 s
    append_jsonl(tmp_path / "logs" / "gpu_metrics.jsonl", {"ts": T0, "index": 0, "name": "g", "util_pct": 90,
                                                          "mem_used_mib": 1000, "mem_total_mib": 24000})
    assert status_of(tmp_path, T0 + 20 * 60, stale_minutes=25)["warnings"] == []
    warnings = status_of(tmp_path, T0 + 20 * 60, stale_minutes=15)["warnings"]
    assert [w["code"] for w in warnings] == ["gpu_samples_stale"], "metrics are fresh; the GPU sample is 20 min old"


def test_make_status_and_plan_pass_run_model_and_args_on():
    """The commands make runs: `make status` hands RUN= and ARGS= to training.status; `make plan` hands on MODEL=
    (PRESET=custom needs it) and ARGS=. (Both were dropped before.)"""
    status = subprocess.run(["make", "-s", "-n", "status", "RUN=nope", "ARGS=--json"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0 and "-m training.status" in status.stdout and "--run nope --json" in status.stdout
    plan = subprocess.run(["make", "-s", "-n", "plan", "PRESET=custom", "MODEL=org/base", "ARGS=--seq-len 1024"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "--preset custom" in plan.stdout and "--model org/base --seq-len 1024" in plan.stdout, plan.stdout
