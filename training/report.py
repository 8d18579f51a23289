"""Run report: PNG plots and a short markdown summary of one run, in `outputs/<run>/report/`.

Usage:
    python -m training.report --logs-dir logs --run NAME [--output-dir outputs]
    make report RUN=NAME

Reads `logs/<run>/metrics.jsonl` (loss, learning rate, tokens/s per logged step; eval loss when present) and
`logs/gpu_metrics.jsonl` plus its rotated files (GPU utilisation and memory), keeping only the GPU samples inside the
run's time window. Writes `loss.png`, `learning_rate.png`, `tokens_per_s.png`, `gpu.png` (skipped, with a note, when
there is no GPU data for the window) and `report.md`. The trainer calls `write_report()` at the end of a run.

Limits: a resumed run that went back to an earlier step keeps the newest value for each step; the GPU plot is over
time (seconds, minutes or hours since the run started), since the GPU monitor knows nothing of steps; with several
runs at once on one machine the GPU plot shows all of them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # the object API: no pyplot global state, no display; PNGs go through Agg

from training.checkpoints import iter_complete_checkpoints
from training.console import format_duration
from training.errors import UserError
from training.runfiles import (EVAL, GPU_METRICS, GPU_PLOT, METRICS, REPORT_DIR, REPORT_MD, iter_records, list_runs, num,
                               read_history, rotated_files, run_status)

FIGSIZE = (8.0, 4.5)  # inches; at DPI below: 800 x 450 px, readable in a markdown preview
DPI = 100
GPU_WINDOW_MARGIN_S = 30.0  # GPU samples this close before the start / after the end still belong to the run


class ReportError(UserError):
    """A problem the user can fix (wrong run name, no metrics): printed without a traceback."""


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------
def read_metrics(metrics_path: Path) -> dict[str, Any]:
    """Training series (by step; newest value wins per step), eval series and events of one run."""
    h = read_history(metrics_path)
    train = h.by_step()
    steps = list(train)
    series = {key: [(s, num(train[s].get(key))) for s in steps] for key in
              ("loss", "learning_rate", "tokens_per_s", "grad_norm")}
    series = {k: [(s, v) for s, v in pts if v is not None] for k, pts in series.items()}
    return {"steps": steps, "series": series, "eval_loss": h.evals_by_step(), "events": h.events,
            "start_ts": h.start_ts, "end_ts": h.end_ts,
            "max_steps": next((int(num(train[s].get("max_steps"))) for s in reversed(steps)
                               if num(train[s].get("max_steps")) is not None), None)}


def read_gpu_window(gpu_path: Path, start: float, end: float) -> dict[int, list[dict[str, Any]]]:
    """GPU samples (per GPU index, in time order) between start and end, across rotated files."""
    per_gpu: dict[int, list[dict[str, Any]]] = {}
    for path in rotated_files(gpu_path):
        for rec in iter_records(path):
            ts, idx = num(rec.get("ts")), num(rec.get("index"))
            if "event" in rec or ts is None or idx is None or not (start <= ts <= end):
                continue
            per_gpu.setdefault(int(idx), []).append(rec)
    for samples in per_gpu.values():
        samples.sort(key=lambda r: r["ts"])
    return dict(sorted(per_gpu.items()))


# ---------------------------------------------------------------------------------------------------------------
# plots (each returns a Figure, so tests can look at the data behind the pixels)
# ---------------------------------------------------------------------------------------------------------------
def _figure(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def plot_series(run: str, points: list[tuple[int, float]], what: str, ylabel: str,
                eval_points: list[tuple[int, float]] | None = None) -> Figure:
    fig, ax = _figure(f"{run}: {what}", "step", ylabel)
    xs, ys = zip(*points)
    ax.plot(xs, ys, marker="." if len(xs) < 60 else None, label=what)
    if eval_points:
        ex, ey = zip(*eval_points)
        ax.plot(ex, ey, marker="o", linestyle="--", label="eval loss")
        ax.legend()
    return fig


def plot_gpu(run: str, per_gpu: dict[int, list[dict[str, Any]]], start: float) -> Figure:
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] * 1.5), dpi=DPI, layout="constrained")
    ax_util, ax_mem = fig.subplots(2, 1, sharex=True)
    ax_util.set_title(f"{run}: GPU utilisation and memory")
    ax_util.set_ylabel("utilisation (%)")
    ax_util.set_ylim(0, 105)
    ax_mem.set_ylabel("memory used (GiB)")
    span = max(r["ts"] for samples in per_gpu.values() for r in samples) - start
    unit, scale = ("seconds", 1.0) if span < 300 else ("minutes", 60.0) if span < 5 * 3600 else ("hours", 3600.0)
    ax_mem.set_xlabel(f"{unit} since the run started")
    for idx, samples in per_gpu.items():
        label = f"GPU {idx}" + (f" ({samples[-1].get('name')})" if samples[-1].get("name") else "")
        util = [((r["ts"] - start) / scale, num(r.get("util_pct"))) for r in samples]
        util = [(t, u) for t, u in util if u is not None]
        if util:
            ax_util.plot(*zip(*util), label=label)
        mem = [((r["ts"] - start) / scale, num(r.get("mem_used_mib"))) for r in samples]
        mem = [(t, m / 1024) for t, m in mem if m is not None]
        if mem:
            line = ax_mem.plot(*zip(*mem), label=label)[0]
            total = num(samples[-1].get("mem_total_mib"))
            if total:
                ax_mem.axhline(total / 1024, color=line.get_color(), linestyle=":", linewidth=1)
    for ax in (ax_util, ax_mem):
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
    return fig


def save_png(fig: Figure, path: Path) -> None:
    """Temp file + rename, so a reader never opens half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------------
def _f(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def draw_plots(run: str, m: dict, metrics_path: Path, gpu_path: Path, report_dir: Path):
    """The loss, learning-rate, throughput and GPU plots of the run: (plots as (file, caption), notes, GPU samples
    per GPU index). A plot with no data is removed, so an old one never contradicts the report."""
    series = m["series"]
    plots: list[tuple[str, str]] = []  # (file, caption)
    notes: list[str] = []

    for key, what, ylabel, extra in (
            ("loss", "training loss", "loss", m["eval_loss"]),
            ("learning_rate", "learning rate", "learning rate", None),
            ("tokens_per_s", "throughput", "tokens / s", None)):
        if series[key]:
            save_png(plot_series(run, series[key], what, ylabel, eval_points=extra), report_dir / f"{key}.png")
            plots.append((f"{key}.png", what))
        else:
            (report_dir / f"{key}.png").unlink(missing_ok=True)  # an old plot would not match this report
            notes.append(f"no {what} values in {metrics_path}: {key}.png not drawn")

    per_gpu: dict[int, list[dict[str, Any]]] = {}
    if m["start_ts"] is not None:
        per_gpu = read_gpu_window(gpu_path, m["start_ts"] - GPU_WINDOW_MARGIN_S, m["end_ts"] + GPU_WINDOW_MARGIN_S)
    if per_gpu:
        save_png(plot_gpu(run, per_gpu, m["start_ts"]), report_dir / GPU_PLOT)
        plots.append((GPU_PLOT, "GPU utilisation and memory"))
    else:
        (report_dir / GPU_PLOT).unlink(missing_ok=True)  # an old plot would not match this report
        notes.append(f"no GPU samples in {gpu_path} during the run (no GPU, or the gpu-monitor was not running): "
                     "gpu.png not drawn")

    return plots, notes, per_gpu


def summary_table(run: str, m: dict, metrics_path: Path, per_gpu: dict, run_dir: Path) -> list[str]:
    """The report's heading and its table of the run's state, numbers and GPU use."""
    series = m["series"]
    state = run_status(m["events"])
    losses = [v for _, v in series["loss"]]
    tps = [v for _, v in series["tokens_per_s"]]
    last_step = m["steps"][-1] if m["steps"] else None
    checkpoint = next((c for c in iter_complete_checkpoints(run_dir, level="sizes") if c.complete), None)
    start_ev = next((e for e in m["events"] if e.get("event") == "start"), {})
    lines = [
        f"# Run report: {run}", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())} from `{metrics_path}`.", "",
        "| | |", "|---|---|",
        f"| status | {state.status}{f' ({state.detail})' if state.detail else ''} |",
        f"| preset / device | {start_ev.get('preset', '-')} / {start_ev.get('device', '-')} |",
        f"| steps | {last_step if last_step is not None else '-'} / {m['max_steps'] if m['max_steps'] else '-'} "
        f"({len(m['steps'])} logged) |",
        f"| duration | {format_duration(m['end_ts'] - m['start_ts']) if m['start_ts'] is not None else '-'} |",
        f"| loss first / last / min | {_f(losses[0] if losses else None, '.4f')} / "
        f"{_f(losses[-1] if losses else None, '.4f')} / {_f(min(losses) if losses else None, '.4f')} |",
        f"| eval loss (last) | {_f(m['eval_loss'][-1][1] if m['eval_loss'] else None, '.4f')} |",
        f"| tokens/s mean / last | {_f(sum(tps) / len(tps) if tps else None, ',.0f')} / "
        f"{_f(tps[-1] if tps else None, ',.0f')} |",
    ]
    for idx, samples in per_gpu.items():
        util = [u for u in (num(r.get("util_pct")) for r in samples) if u is not None]
        mem = [x for x in (num(r.get("mem_used_mib")) for r in samples) if x is not None]
        lines.append(f"| GPU {idx} util mean / peak memory | {_f(sum(util) / len(util) if util else None, '.0f')}% / "
                     f"{_f(max(mem) / 1024 if mem else None, '.1f')} GiB ({len(samples)} samples) |")
    lines.append(f"| last complete checkpoint | {checkpoint.path if checkpoint else 'none'} |")
    return lines


def write_report(logs_dir: str | os.PathLike, run: str, output_dir: str | os.PathLike = "outputs",
                 report_dir: str | os.PathLike | None = None) -> Path:
    """Write the plots and report.md for `run` into `<output_dir>/<run>/report/` (or `report_dir` when the run
    folder is not named after the run); returns that folder.

    Raises ReportError (a message for people) when the run has no metrics file.
    """
    logs_dir, output_dir = Path(logs_dir), Path(output_dir)
    metrics_path = logs_dir / run / METRICS
    if not metrics_path.is_file():
        runs = list_runs(logs_dir)
        raise ReportError(f"no metrics for run {run!r}: {metrics_path} does not exist; "
                          + (f"runs under {logs_dir}/: {', '.join(runs)}" if runs else f"no runs under {logs_dir}/"))
    m = read_metrics(metrics_path)
    report_dir = Path(report_dir) if report_dir else output_dir / run / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    plots, notes, per_gpu = draw_plots(run, m, metrics_path, logs_dir / GPU_METRICS, report_dir)
    lines = summary_table(run, m, metrics_path, per_gpu, report_dir.parent)
    lines.append("")
    lines += eval_section(report_dir.parent / EVAL)
    for file, caption in plots:
        lines += [f"![{caption}]({file})", ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    tmp = report_dir / f".{REPORT_MD}.tmp{os.getpid()}"
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, report_dir / REPORT_MD)
    return report_dir


def _cell(text: str | None, limit: int = 300) -> str:
    text = " ".join((text or "").split())
    text = text[:limit] + "..." if len(text) > limit else text
    return text.replace("|", "\\|") or "(empty)"


def eval_section(path: Path) -> list[str]:
    """Base vs fine-tuned, from the run's eval.json (training/evaluate.py); nothing when there is none."""
    try:
        ev = json.loads(path.read_text(encoding="utf-8"))
        base, adapter = ev["base_loss"], ev["adapter_loss"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    lines = ["## Base vs fine-tuned", "",
             f"Held-out data: {ev.get('data', {}).get('source', '-')} `{ev.get('data', {}).get('path', '-')}`, "
             f"{ev.get('examples', '-')} examples (`{path.name}`, written by `make eval`).", "",
             "| | base | fine-tuned |", "|---|---|---|",
             f"| held-out loss | {_f(base.get('loss'), '.4f')} | {_f(adapter.get('loss'), '.4f')} |",
             f"| perplexity | {_f(base.get('perplexity'), '.2f')} | {_f(adapter.get('perplexity'), '.2f')} |", ""]
    if ev.get("prompts"):
        lines += [f"Greedy answers (at most {ev.get('max_new_tokens', '-')} new tokens):", "",
                  "| prompt | base | fine-tuned |", "|---|---|---|"]
        lines += [f"| {_cell(p.get('prompt'))} | {_cell(p.get('base'))} | {_cell(p.get('adapter'))} |"
                  for p in ev["prompts"]]
        lines.append("")
    return lines


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--logs-dir", default="logs", help="folder with <run>/metrics.jsonl and gpu_metrics.jsonl")
    p.add_argument("--run", default=None, help="run name (default: the run whose metrics changed last)")
    p.add_argument("--output-dir", default="outputs", help="the report goes to <output-dir>/<run>/report/")
    return p


def write_run_report(paths) -> None:
    """The report of a finished run (training/runfiles.py::RunPaths), next to its outputs; a report problem never
    fails the run it describes (the recipe and `make eval` call this after their real work is saved)."""
    import logging

    log = logging.getLogger("training")
    try:
        log.info("report: %s", write_report(paths.logs_dir.parent, paths.name, paths.run_dir.parent,
                                            report_dir=paths.report_dir))
    except Exception as exc:  # noqa: BLE001 - matplotlib missing or a plotting bug: say so and go on
        log.warning("run report not written (%s); make report RUN=%s retries", exc, paths.name)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    run = args.run
    if run is None:
        runs = list_runs(Path(args.logs_dir))
        if not runs:
            print(f"no runs under {args.logs_dir}/: start one with make demo / make train-gemma-2b", file=sys.stderr)
            return 1
        run = runs[-1]
    try:
        report_dir = write_report(args.logs_dir, run, args.output_dir)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot write the report under {args.output_dir}/{run}/report/: {exc}", file=sys.stderr)
        return 1
    print(f"report: {report_dir / REPORT_MD}")
    for png in sorted(report_dir.glob("*.png")):
        print(f"  {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
