"""Run report: real PNGs (signature, size, drawn pixels) built from the run's steps, GPU window, report.md, CLI.

Metric files are written per docs/contracts.md; matplotlib renders for real (Agg).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.jsonio import append_jsonl
from training.report import (DPI, FIGSIZE, ReportError, plot_gpu, plot_series, read_gpu_window, read_metrics,
                             write_report)

REPO = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(logs: Path, run: str, steps: int, max_steps: int, dt: float = 10.0, end: str | None = "finished"):
    path = logs / run / "metrics.jsonl"
    append_jsonl(path, {"event": "start", "ts": T0, "run": run, "step": 0, "preset": "tiny", "device": "cpu",
                        "max_steps": max_steps})
    for s in range(1, steps + 1):
        append_jsonl(path, {"ts": T0 + s * dt, "run": run, "step": s, "max_steps": max_steps, "epoch": s / 10,
                            "loss": 5.0 - 0.1 * s, "learning_rate": 1e-4 * s / steps, "grad_norm": 1.0,
                            "tokens_per_s": 1000.0 + s, "eta_s": (max_steps - s) * dt})
        if s % 5 == 0:
            append_jsonl(path, {"ts": T0 + s * dt, "run": run, "step": s, "max_steps": max_steps, "eval_loss": 4.0})
    if end:
        append_jsonl(path, {"event": end, "ts": T0 + steps * dt + 1, "run": run, "step": steps})
    return path


def write_gpu(logs: Path, times: list[float], path_name: str = "gpu_metrics.jsonl"):
    for i, ts in enumerate(times):
        for idx in (0, 1):
            append_jsonl(logs / path_name, {"ts": ts, "host": "h", "index": idx, "name": "NVIDIA H100",
                                            "util_pct": 50 + idx * 10, "mem_used_mib": 10_000 + i * 100,
                                            "mem_total_mib": 81_559, "temp_c": 60, "power_w": 400.0})
    append_jsonl(logs / path_name, {"ts": times[-1], "event": "nvml_error", "message": "ignored by the plot"})


def check_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as img:
        assert img.size == size
        pixels = np.asarray(img.convert("RGB"))
    # A blank figure is one or two colours; axes, text and a line in matplotlib's colours give many more.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, f"{path} looks empty"
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 80)  # matplotlib's first line colour, #1f77b4
    assert blue.sum() > 200, f"{path} has no data line"
    return pixels


def test_report_plots_and_summary(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "outputs"
    write_run(logs, "r", steps=20, max_steps=20)
    write_gpu(logs, [T0 - 3600, T0 - 5] + [T0 + 10 * k for k in range(21)] + [T0 + 3600])  # 2 outside the window
    report_dir = write_report(logs, "r", out)
    assert report_dir == out / "r" / "report"
    w, h = int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI)
    for name in ("loss.png", "learning_rate.png", "tokens_per_s.png"):
        check_png(report_dir / name, (w, h))
    check_png(report_dir / "gpu.png", (w, int(FIGSIZE[1] * 1.5 * DPI)))
    md = (report_dir / "report.md").read_text()
    assert "| status | finished |" in md
    assert "| steps | 20 / 20 (20 logged) |" in md
    assert "| loss first / last / min | 4.9000 / 3.0000 / 3.0000 |" in md
    assert "| eval loss (last) | 4.0000 |" in md
    assert "| tokens/s mean / last | 1,010 / 1,020 |" in md
    assert "GPU 0 util mean / peak memory | 50% / " in md and "(22 samples)" in md, "window: T0-5 .. end, not +-1 h"
    for name in ("loss.png", "learning_rate.png", "tokens_per_s.png", "gpu.png"):
        assert f"]({name})" in md
    assert "Notes" not in md


def test_plots_hold_the_runs_steps(tmp_path):
    logs = tmp_path / "logs"
    path = write_run(logs, "r", steps=12, max_steps=12)
    # a resume that went back to step 10 and re-logged steps 11-12: the newest values win, steps stay unique
    append_jsonl(path, {"event": "resumed", "ts": T0 + 500, "run": "r", "step": 10})
    for s in (11, 12):
        append_jsonl(path, {"ts": T0 + 500 + s, "run": "r", "step": s, "max_steps": 12, "loss": 0.5,
                            "learning_rate": 1e-5, "tokens_per_s": 10.0})
    m = read_metrics(path)
    assert m["steps"] == list(range(1, 13))
    fig = plot_series("r", m["series"]["loss"], "training loss", "loss", eval_points=m["eval_loss"])
    train_line, eval_line = fig.axes[0].lines
    assert list(train_line.get_xdata()) == list(range(1, 13))
    assert list(train_line.get_ydata())[:3] == pytest.approx([4.9, 4.8, 4.7])
    assert list(train_line.get_ydata())[-2:] == [0.5, 0.5]
    assert list(eval_line.get_xdata()) == [5, 10]


def test_gpu_window_reads_rotated_files(tmp_path):
    logs = tmp_path / "logs"
    write_gpu(logs, [T0 + 1, T0 + 2], "gpu_metrics.jsonl.2")
    write_gpu(logs, [T0 + 3], "gpu_metrics.jsonl.1")
    write_gpu(logs, [T0 + 4, T0 + 500], "gpu_metrics.jsonl")
    per_gpu = read_gpu_window(logs / "gpu_metrics.jsonl", T0, T0 + 100)
    assert sorted(per_gpu) == [0, 1]
    assert [r["ts"] for r in per_gpu[0]] == [T0 + 1, T0 + 2, T0 + 3, T0 + 4]
    fig = plot_gpu("r", per_gpu, T0)
    util_ax, mem_ax = fig.axes
    assert len(util_ax.lines) == 2
    assert list(util_ax.lines[0].get_xdata()) == pytest.approx([1, 2, 3, 4])
    assert mem_ax.get_xlabel() == "seconds since the run started"
    hours = plot_gpu("r", {0: per_gpu[0] + [{**per_gpu[0][-1], "ts": T0 + 7200}]}, T0).axes[1]
    assert hours.get_xlabel() == "minutes since the run started"
    assert list(hours.lines[0].get_xdata())[-1] == pytest.approx(120)
    assert list(mem_ax.lines[0].get_ydata()) == pytest.approx([(10_000 + k * 100) / 1024 for k in (0, 1, 0, 0)])


def test_no_gpu_data_skips_the_plot_with_a_note(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "outputs"
    write_run(logs, "cpu", steps=3, max_steps=3)
    stale = out / "cpu" / "report" / "gpu.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    report_dir = write_report(logs, "cpu", out)
    assert not (report_dir / "gpu.png").exists(), "a stale GPU plot from an earlier report is removed"
    assert (report_dir / "loss.png").stat().st_size > 1000
    md = (report_dir / "report.md").read_text()
    assert "gpu.png not drawn" in md and "](gpu.png)" not in md


def test_run_failed_before_any_step(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "outputs"
    path = write_run(logs, "early", steps=0, max_steps=100, end=None)
    append_jsonl(path, {"event": "failed", "ts": T0 + 2, "run": "early", "step": 0, "error": "data: bad.jsonl:3"})
    with open(path, "ab") as fh:
        fh.write(b'{"ts": 18000')  # cut-off last line
    report_dir = write_report(logs, "early", out)
    md = (report_dir / "report.md").read_text()
    assert "| status | failed (data: bad.jsonl:3) |" in md
    assert "no training loss values" in md
    assert list(report_dir.glob("*.png")) == []


def test_unknown_run_is_a_clear_error(tmp_path):
    write_run(tmp_path / "logs", "real", steps=2, max_steps=2)
    with pytest.raises(ReportError, match="runs under .*: real"):
        write_report(tmp_path / "logs", "typo", tmp_path / "outputs")
    proc = subprocess.run([sys.executable, "-m", "training.report", "--logs-dir", str(tmp_path / "logs"), "--run",
                           "typo"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "error: no metrics for run 'typo'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_defaults_to_latest_run(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "outputs"
    write_run(logs, "only", steps=4, max_steps=4)
    proc = subprocess.run([sys.executable, "-m", "training.report", "--logs-dir", str(logs), "--output-dir",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(out / "only" / "report" / "report.md") in proc.stdout
    assert (out / "only" / "report" / "loss.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.slow
def test_status_and_report_on_a_real_tiny_run(tmp_path, tiny_model_dir):
    """The real recipe (tiny preset, 4-bit, TRL) writes the files; status and report read them as a user would."""
    import json

    from tests.conftest import run_recipe
    from training.status import collect_status

    logs, outputs = tmp_path / "logs", tmp_path / "outputs"
    proc = run_recipe(["--model-config", "tiny", "--output-dir", str(outputs / "real"), "--logs-dir", str(logs),
                       "--run-name", "real", "--max-steps", "10", "--resume", "never",
                       "--set", "logging_steps=2", "--set", "save_steps=5", "--set", "eval_steps=5"],
                      env={"TINY_MODEL_DIR": str(tiny_model_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((outputs / "real" / "run_summary.json").read_text())

    st = collect_status(logs, outputs, tmp_path / "backup", docker=False)
    run = st["run"]
    assert run["name"] == "real" and run["status"] == "finished"
    assert (run["step"], run["max_steps"]) == (10, 10)
    assert run["loss"] == pytest.approx(summary["train_loss_last"])
    assert run["logged_steps"] == 6  # steps 1, 2, 4, 6, 8, 10
    assert run["tokens_per_s"] > 0 and run["eval_loss"] is not None
    if run["last_checkpoint"] is not None:  # once the trainer writes COMPLETE markers
        assert run["last_checkpoint"]["step"] == 10
    else:
        assert "checkpoint-10" in run["incomplete_checkpoints"]
    cli = subprocess.run([sys.executable, "-m", "training.status", "--logs-dir", str(logs), "--output-dir",
                          str(outputs), "--no-docker", "--json"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0 and json.loads(cli.stdout)["run"]["step"] == 10, cli.stderr

    report_dir = write_report(logs, "real", outputs)
    assert report_dir == outputs / "real" / "report"
    w, h = int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI)
    for name in ("loss.png", "learning_rate.png", "tokens_per_s.png"):
        check_png(report_dir / name, (w, h))
    m = read_metrics(logs / "real" / "metrics.jsonl")
    fig = plot_series("real", m["series"]["loss"], "training loss", "loss")
    assert list(fig.axes[0].lines[0].get_xdata()) == [1, 2, 4, 6, 8, 10]
    md = (report_dir / "report.md").read_text()
    assert "| status | finished |" in md and "| steps | 10 / 10 (6 logged) |" in md
    assert f"/ {summary['train_loss_last']:.4f} /" in md
