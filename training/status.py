"""`make train-status`: one screen of truth about the stack and the current run.

Usage:
    python -m training.status --logs-dir logs [--output-dir outputs] [--backup-dir backup] [--run NAME]
                              [--json] [--watch [SECONDS]]

Shows the agent-* containers and their health (when a Docker engine answers), each GPU's latest sample from
logs/gpu_metrics.jsonl, the current run (the newest logs/<run>/metrics.jsonl unless --run: step / max_steps, loss
and its trend, tokens/s, ETA, status, last complete checkpoint, last backup and its age) and warnings (GPU memory
nearly full, disk too small for the next checkpoint, no metrics for a while during a run, the training container
exited non-zero). A run whose events say running but whose process is gone (the pid on this host, or the container
its start event names, exited) is shown as died. `--json` prints the same content as one JSON object; `--watch`
refreshes until Ctrl-C.

It only reads files (and asks `docker ps`/`docker inspect`), so it works while a run trains and after it stopped.
Inside a container without docker, pass the host's view: `docker inspect $(docker ps -aq) | ... --docker-inspect -`
(a snapshot: with --watch the containers part does not refresh).
Missing, cut-off or garbled files are reported as missing data, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from training.checkpoints import MARKER_NAME, checkpoint_step, iter_complete_checkpoints, read_manifest
from training.disk import free_bytes
from training.runfiles import (BACKUP_EVENTS, GPU_METRICS, LAST_BACKUP, METRICS, as_int, list_runs, num,
                               read_history, run_status, tail_records)

NO_RUNS_MESSAGE = "no runs yet: start one with make demo / make train-gemma-2b"
TREND_WINDOW = 10  # logged steps the loss trend is computed over
STALE_MINUTES = 10.0  # a running run with no metrics line for this long gets a warning (a hang, a kill -9)
GPU_MEM_WARN_PCT = 95.0  # above this an allocation spike is likely to OOM
CONTAINER_ID = re.compile(r"[0-9a-f]{12}")  # a container's default host name: its short id
SIGTERM_EXIT = 128 + 15  # make train-stop: the run saved and said `stopped`; not a fault
DISK_HEADROOM = 2.0  # the next checkpoint needs ~its size, plus the trainer's temp copy; ask for 2x
STACK_SERVICES = {"qlora-training", "training-dev", "training-monitor", "gpu-monitor", "training-backup"}
TRAINING_SERVICE = "qlora-training"


# ---------------------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------------------
def loss_trend(losses: list[float]) -> dict[str, Any] | None:
    """Least-squares slope over the window, as the change it implies across the window and a direction."""
    n = len(losses)
    if n < 2:
        return None
    xs = range(n)
    mx, my = (n - 1) / 2, sum(losses) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, losses)) / sum((x - mx) ** 2 for x in xs)
    change = slope * (n - 1)
    rel = change / abs(my) if my else 0.0
    direction = "down" if rel < -0.01 else "up" if rel > 0.01 else "flat"  # +-1% over the window: noise
    return {"window": n, "change": round(change, 6), "direction": direction, "values": [round(v, 6) for v in losses]}


def find_checkpoints(run_out: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """(newest complete checkpoint, "checkpoint-N: why" for newer folders that are not complete).

    "Complete" is training/checkpoints.py's definition, checked at the cheap "sizes" level (no re-hashing, so the
    screen stays instant on multi-GB checkpoints): marker present, manifest readable, every file at its size.
    """
    skipped: list[str] = []
    for ckpt in iter_complete_checkpoints(run_out, level="sizes"):
        path = ckpt.path
        if not ckpt.complete:
            skipped.append(f"{path.name}: {ckpt.problem.replace(str(path) + '/', '').replace(str(path) + ': ', '')}")
            continue
        manifest = read_manifest(path) or {}
        files = manifest.get("files") or {}
        size = sum(int(num(f.get("size")) or 0) for f in files.values() if isinstance(f, dict))
        created = num(manifest.get("created"))
        if created is None:
            try:
                created = (path / MARKER_NAME).stat().st_mtime
            except OSError:
                pass
        info = {"path": str(path), "step": checkpoint_step(path), "size_bytes": size, "created": created}
        return info, list(reversed(skipped))
    return None, list(reversed(skipped))


def find_last_backup(backup_dir: Path, run: str, now: float) -> dict[str, Any] | None:
    """Newest `<backup>/<run>/checkpoint-N/` (backup.py renames a `.tmp-` copy to this name only once verified).

    Its time comes from backup.py's `<backup>/<run>/LAST_BACKUP.json` when that names this checkpoint, else from the
    folder's mtime. A `failed` record for the run in `<backup>/backup_events.jsonl`, newer than that copy, is
    reported as `last_error`.
    """
    root = backup_dir / run
    best = None
    try:
        entries = list(root.iterdir())
    except OSError:
        entries = []
    for d in entries:
        step = checkpoint_step(d)
        if step is not None and d.is_dir() and (best is None or step > best[0]):
            best = (step, d)
    info: dict[str, Any] | None = None
    if best is not None:
        step, d = best
        ts = None
        try:
            last = json.loads((root / LAST_BACKUP).read_text(encoding="utf-8"))
            if isinstance(last, dict) and last.get("checkpoint") == d.name:
                ts = num(last.get("ts"))
        except (OSError, ValueError):
            pass
        if ts is None:
            try:
                ts = d.stat().st_mtime
            except OSError:
                pass
        info = {"path": str(d), "step": step, "ts": ts, "age_s": None if ts is None else max(0.0, now - ts),
                "last_error": None}
    failed = None
    for rec in tail_records(backup_dir / BACKUP_EVENTS):
        if rec.get("run") == run and rec.get("event") == "failed" and num(rec.get("ts")) is not None:
            failed = rec
    if failed is not None and (info is None or info["ts"] is None or failed["ts"] > info["ts"]):
        info = info or {"path": None, "step": None, "ts": None, "age_s": None}
        info["last_error"] = str(failed.get("error") or "backup failed")
    return info


def read_run(logs_dir: Path, output_dir: Path, backup_dir: Path, run: str, now: float) -> dict[str, Any]:
    metrics_path = logs_dir / run / METRICS
    history = read_history(metrics_path)
    train, events, last_ts = history.train, history.events, history.end_ts
    eval_loss = history.evals[-1][1] if history.evals else None
    state = run_status(events, trained=bool(train))
    status = state.status

    last = train[-1] if train else {}
    max_steps = as_int(last.get("max_steps"))
    step = as_int(last.get("step"))
    for ev in events:
        if max_steps is None and as_int(ev.get("max_steps")) is not None:
            max_steps = as_int(ev.get("max_steps"))
        if as_int(ev.get("step")) is not None and (step is None or as_int(ev.get("step")) > step):
            step = as_int(ev.get("step"))
    losses = [v for v in (num(r.get("loss")) for r in train) if v is not None]
    eta_s = num(last.get("eta_s")) if status == "running" else (0.0 if status == "finished" else None)
    last_event = events[-1] if events else None

    checkpoint, incomplete = find_checkpoints(output_dir / run)
    return {
        "name": run,
        "metrics_path": str(metrics_path),
        "status": status,
        "step": step,
        "max_steps": max_steps,
        "progress_pct": round(100.0 * step / max_steps, 1) if step is not None and max_steps else None,
        "epoch": num(last.get("epoch")),
        "loss": losses[-1] if losses else None,
        "loss_trend": loss_trend(losses[-TREND_WINDOW:]),
        "eval_loss": eval_loss,
        "learning_rate": num(last.get("learning_rate")),
        "tokens_per_s": num(last.get("tokens_per_s")),
        "eta_s": eta_s,
        "started_ts": state.started_ts,
        "last_record_ts": last_ts,
        "last_record_age_s": None if last_ts is None else max(0.0, now - last_ts),
        "last_event": None if last_event is None else {k: last_event.get(k) for k in ("event", "ts", "step")},
        "error": state.error,
        "signal": state.signal,
        "process": {"host": state.host, "pid": state.pid},  # the one training now, when the events say running
        "logged_steps": len(train),
        "last_checkpoint": checkpoint,
        "incomplete_checkpoints": incomplete,
        "last_backup": find_last_backup(backup_dir, run, now),
    }


# ---------------------------------------------------------------------------------------------------------------
# GPUs and containers
# ---------------------------------------------------------------------------------------------------------------
def read_gpus(logs_dir: Path, now: float) -> dict[str, Any]:
    path = logs_dir / GPU_METRICS
    latest: dict[int, dict[str, Any]] = {}
    last_event = None
    for rec in tail_records(path):
        ts = num(rec.get("ts"))
        if ts is None:
            continue
        if "event" in rec:
            last_event = rec
            continue
        idx = as_int(rec.get("index"))
        if idx is not None and (idx not in latest or ts >= latest[idx]["ts"]):
            latest[idx] = rec
    gpus = []
    for idx in sorted(latest):
        r = latest[idx]
        used, total = num(r.get("mem_used_mib")), num(r.get("mem_total_mib"))
        gpus.append({
            "index": idx, "name": r.get("name"), "ts": r["ts"], "age_s": max(0.0, now - r["ts"]),
            "util_pct": num(r.get("util_pct")), "mem_used_mib": used, "mem_total_mib": total,
            "mem_pct": round(100.0 * used / total, 1) if used is not None and total else None,
            "temp_c": num(r.get("temp_c")), "power_w": num(r.get("power_w")),
            "throttle_reasons": r.get("throttle_reasons") if isinstance(r.get("throttle_reasons"), list) else None,
            "disk_free_gib": num(r.get("disk_free_gib")),
        })
    newest_sample = max((g["ts"] for g in gpus), default=None)
    event = None
    if last_event is not None and (newest_sample is None or last_event["ts"] > newest_sample):
        event = {"event": last_event.get("event"), "message": last_event.get("message"), "ts": last_event["ts"]}
    return {"path": str(path), "available": path.exists(), "gpus": gpus, "event": event}


def _docker(args: list[str], timeout: float = 5.0) -> str | None:
    try:
        proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _docker_time(value: Any) -> float | None:
    """Docker's RFC 3339 time (nanoseconds, Z) -> unix seconds; its zero time (never started) -> None."""
    if not isinstance(value, str) or value.startswith("0001-"):
        return None
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", value)
    if not m:
        return None
    from datetime import datetime

    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    try:
        base = datetime.fromisoformat(m.group(1) + tz).timestamp()
    except ValueError:
        return None
    return base + (float(m.group(2)) if m.group(2) else 0.0)


def containers_from_inspect(items: Any, now: float) -> list[dict[str, Any]]:
    """The stack's containers (name agent-*, or a compose service of this stack) from `docker inspect` output."""
    rows = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        state = item.get("State") if isinstance(item.get("State"), dict) else {}
        config = item.get("Config") if isinstance(item.get("Config"), dict) else {}
        labels = config.get("Labels") if isinstance(config.get("Labels"), dict) else {}
        name = str(item.get("Name", "")).lstrip("/")
        service = labels.get("com.docker.compose.service")
        if not (name.startswith("agent-") or service in STACK_SERVICES):
            continue
        st = str(state.get("Status", "unknown"))
        health = state.get("Health") if isinstance(state.get("Health"), dict) else {}
        started, finished = _docker_time(state.get("StartedAt")), _docker_time(state.get("FinishedAt"))
        exit_code = as_int(state.get("ExitCode")) if st in ("exited", "dead") else None
        if st == "running" and started is not None:
            since = f"up {_duration(now - started)}"
        elif st in ("exited", "dead") and finished is not None:
            since = f"exited ({exit_code}) {_duration(now - finished)} ago" + (", OOM-killed" if state.get(
                "OOMKilled") else "")
        else:
            since = st
        rows.append({"id": str(item.get("Id", ""))[:12], "name": name, "service": service,
                     "image": config.get("Image"), "state": st, "status": since, "exit_code": exit_code,
                     "oom_killed": bool(state.get("OOMKilled")), "health": health.get("Status")})
    return sorted(rows, key=lambda r: r["name"])


def read_containers(now: float, inspect_json: str | None = None) -> dict[str, Any]:
    """Containers of the stack: from `docker inspect` run here, or from its output given as text (--docker-inspect,
    for status running inside a container that has no docker, fed by the host)."""
    if inspect_json is None:
        if shutil.which("docker") is None:
            return {"available": False, "message": "docker not available", "containers": []}
        ids = _docker(["ps", "-aq", "--no-trunc"])
        if ids is None:
            return {"available": False, "message": "docker not available (engine not reachable)", "containers": []}
        inspect_json = _docker(["inspect", *ids.split()]) if ids.split() else "[]"
        if inspect_json is None:  # a container removed between ps and inspect: try once more
            inspect_json = _docker(["inspect", *(_docker(["ps", "-aq", "--no-trunc"]) or "").split()]) or "[]"
    if not inspect_json.strip():
        return {"available": False, "message": "docker not available (no docker inspect output)", "containers": []}
    try:
        items = json.loads(inspect_json)
    except json.JSONDecodeError:
        return {"available": False, "message": "docker inspect output unreadable", "containers": []}
    rows = containers_from_inspect(items, now)
    return {"available": True, "message": None if rows else "no stack containers", "containers": rows}


# ---------------------------------------------------------------------------------------------------------------
# the whole picture
# ---------------------------------------------------------------------------------------------------------------
def collect_status(logs_dir: str | os.PathLike = "logs", output_dir: str | os.PathLike = "outputs",
                   backup_dir: str | os.PathLike = "backup", run: str | None = None, now: float | None = None,
                   docker: bool = True, stale_minutes: float = STALE_MINUTES,
                   docker_inspect: str | None = None) -> dict[str, Any]:
    """Everything the screen shows, as plain data (what --json prints).

    docker=False: containers are not asked for; docker_inspect: `docker inspect` output (JSON text) to use instead
    of running docker here.
    """
    logs_dir, output_dir, backup_dir = Path(logs_dir), Path(output_dir), Path(backup_dir)
    now = time.time() if now is None else now
    runs = list_runs(logs_dir)
    status: dict[str, Any] = {
        "ts": now, "logs_dir": str(logs_dir), "output_dir": str(output_dir), "backup_dir": str(backup_dir),
        "containers": read_containers(now, docker_inspect) if docker or docker_inspect is not None else {
            "available": False, "message": "docker not queried", "containers": []},
        "gpu": read_gpus(logs_dir, now), "runs": runs, "run": None, "message": None, "warnings": [],
    }
    if run is not None and run not in runs:
        status["message"] = (f"no run {run!r} under {logs_dir}/ (no {logs_dir / run / METRICS}); "
                             + (f"runs there: {', '.join(runs)}" if runs else NO_RUNS_MESSAGE))
    elif not runs:
        status["message"] = NO_RUNS_MESSAGE
    else:
        status["run"] = read_run(logs_dir, output_dir, backup_dir, run or runs[-1], now)
        gone = process_gone(status["run"], status["containers"])
        if gone:  # the events still say running, but nothing trains: a hard kill, a crash, a reboot
            status["run"].update(status="died", error=gone, eta_s=None)
    status["warnings"] = find_warnings(status, output_dir, stale_minutes)
    return status


def process_gone(run: dict[str, Any], containers: dict[str, Any]) -> str | None:
    """Why a run whose events say running has no process left, or None (alive, or not knowable from here). The start
    and resumed events name the process (host, pid); a container's host name is its short id, so a run trained in a
    container is checked against that container (exited, or replaced by a later run's: gone), and a native one
    against the pid on this host."""
    host, pid = run["process"]["host"], run["process"]["pid"]
    if run["status"] != "running" or not host:
        return None
    if host == socket.gethostname() and pid:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"its process (pid {pid}) is gone without a last record: killed hard (kill -9, the OOM killer)"
        except OSError:
            pass  # PermissionError: alive, under another user
        return None
    if not containers["available"]:
        return None
    mine = [c for c in containers["containers"] if c["id"] and c["id"] == host[:12]]
    if mine and mine[0]["state"] in ("exited", "dead"):
        return f"its container {mine[0]['name']} {mine[0]['status']} without a last record"
    if not mine and CONTAINER_ID.fullmatch(host):
        return f"its container ({host}) is gone (replaced by a later run, or removed) without a last record"
    return None


def find_warnings(status: dict[str, Any], output_dir: Path, stale_minutes: float) -> list[dict[str, str]]:
    warnings = []
    for g in status["gpu"]["gpus"]:
        if g["mem_pct"] is not None and g["mem_pct"] > GPU_MEM_WARN_PCT:
            warnings.append({"code": "gpu_memory_full", "message": (
                f"GPU {g['index']} memory {g['mem_pct']:.1f}% full ({g['mem_used_mib']:.0f}/{g['mem_total_mib']:.0f} "
                "MiB): an allocation spike may OOM; lower the micro-batch or max_seq_length")})
    run = status["run"]
    if run is not None:
        ckpt = run["last_checkpoint"]
        if ckpt and ckpt["size_bytes"]:
            try:
                free = free_bytes(output_dir / run["name"])[0]
            except OSError:
                free = None
            if free is not None and free < DISK_HEADROOM * ckpt["size_bytes"]:
                warnings.append({"code": "disk_low", "message": (
                    f"{_bytes(free)} free under {output_dir}, the last checkpoint is {_bytes(ckpt['size_bytes'])}: "
                    f"the next one may not fit (want {DISK_HEADROOM:g}x); free space or keep fewer checkpoints "
                    "(--set keep_checkpoints=1)")})
        age = run["last_record_age_s"]
        if run["status"] == "running" and age is not None and age > stale_minutes * 60:
            warnings.append({"code": "metrics_stale", "message": (
                f"run {run['name']} is running but wrote no metrics for {_duration(age)}: is the trainer alive? "
                "see its train.log (make logs RUN=name, or make train-logs for the container)")})
        bk = run["last_backup"]
        if bk is not None and bk.get("last_error"):
            warnings.append({"code": "backup_failed", "message": f"last backup of {run['name']} failed: "
                             f"{bk['last_error']} (see the training-backup container's log)"})
        newest_gpu = max((g["ts"] for g in status["gpu"]["gpus"]), default=None)
        if run["status"] == "running" and newest_gpu is not None and status["ts"] - newest_gpu > stale_minutes * 60:
            warnings.append({"code": "gpu_samples_stale", "message": (
                f"the newest GPU sample is {_duration(status['ts'] - newest_gpu)} old while {run['name']} runs: "
                "is the gpu-monitor service up?")})
        if run["status"] == "failed":
            warnings.append({"code": "run_failed", "message": f"run {run['name']} failed: {run['error'] or '?'}"})
        if run["status"] == "died":
            warnings.append({"code": "run_died", "message": (
                f"run {run['name']} died: {run['error']}; the same command resumes it from its last complete "
                "checkpoint")})
    for c in status["containers"]["containers"]:
        is_training = c["service"] == TRAINING_SERVICE or TRAINING_SERVICE in c["name"]
        if is_training and c["state"] in ("exited", "dead") and c.get("exit_code") not in (0, None, SIGTERM_EXIT):
            oom = " (killed for lack of host memory)" if c.get("oom_killed") else ""
            warnings.append({"code": "training_container_failed", "message": (
                f"container {c['name']} exited with code {c['exit_code']}{oom}: see docker logs {c['name']}")})
        if c["state"] == "restarting":
            warnings.append({"code": "container_restarting", "message": (
                f"container {c['name']} keeps restarting (crash loop?): see docker logs {c['name']}")})
        if c.get("health") == "unhealthy" and c["state"] == "running":  # an exited one may keep its last health
            warnings.append({"code": "container_unhealthy", "message": f"container {c['name']} is unhealthy"})
    return warnings


# ---------------------------------------------------------------------------------------------------------------
# rendering (rich)
# ---------------------------------------------------------------------------------------------------------------
def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt(value: Any, spec: str = "", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in values)


def render(status: dict[str, Any]):
    """A rich renderable of the status dict (so --watch and the one-shot screen are the same)."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    parts = []
    # containers
    c = status["containers"]
    if c["containers"]:
        t = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("container", "state", "health", "status"):
            t.add_column(col)
        for row in c["containers"]:
            state_style = {"running": "green", "exited": "red" if row.get("exit_code") else "yellow"}.get(
                row["state"], "")
            t.add_row(Text(row["name"]), Text(str(row["state"]), style=state_style),
                      Text(row.get("health") or "-"), Text(row.get("status") or ""))
        parts.append(Panel(t, title="containers", title_align="left"))
    else:
        parts.append(Text(f"containers: {c['message']}", style="dim"))
    # GPUs
    g = status["gpu"]
    if g["gpus"]:
        t = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("gpu", "name", "util", "memory", "temp", "power", "sample age"):
            t.add_column(col)
        for gpu in g["gpus"]:
            mem = (f"{_fmt(gpu['mem_used_mib'], '.0f')}/{_fmt(gpu['mem_total_mib'], '.0f')} MiB"
                   + (f" ({gpu['mem_pct']:.0f}%)" if gpu["mem_pct"] is not None else ""))
            t.add_row(str(gpu["index"]), Text(str(gpu["name"] or "-")), _fmt(gpu["util_pct"], ".0f", "%"), mem,
                      _fmt(gpu["temp_c"], ".0f", " °C"), _fmt(gpu["power_w"], ".0f", " W"), _duration(gpu["age_s"]))
        parts.append(Panel(t, title="GPUs", title_align="left"))
    if g["event"]:
        parts.append(Text(f"gpu monitor: {g['event']['event']}: {g['event']['message']}", style="yellow"))
    elif not g["gpus"]:
        parts.append(Text(f"GPUs: no samples in {g['path']} (gpu-monitor not running?)", style="dim"))
    # run
    run = status["run"]
    if run is None:
        parts.append(Text(status["message"] or NO_RUNS_MESSAGE, style="bold"))
    else:
        parts.append(Panel(_render_run(run), title=f"run {run['name']}", title_align="left"))
    # warnings
    for w in status["warnings"]:
        parts.append(Text(f"warning: {w['message']}", style="bold red"))
    return Group(*parts)


def _render_run(run: dict[str, Any]):
    from rich.table import Table
    from rich.text import Text

    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()

    def row(label: str, value: Any) -> None:  # Text(): paths and errors may hold [brackets], not rich markup
        t.add_row(label, value if isinstance(value, Text) else Text(str(value)))
    style = {"running": "green", "finished": "cyan", "failed": "red", "died": "red", "stopped": "yellow"}.get(
        run["status"], "")
    detail = ""
    if run["status"] in ("failed", "died") and run["error"]:
        detail = f" ({run['error']})"
    elif run["status"] == "stopped" and run["signal"]:
        detail = f" (signal {run['signal']})"
    row("status", Text(run["status"] + detail, style=style))
    step = f"{_fmt(run['step'])} / {_fmt(run['max_steps'])}"
    if run["progress_pct"] is not None:
        step += f"  ({run['progress_pct']:.1f}%)"
    row("step", step)
    loss = _fmt(run["loss"], ".4f")
    trend = run["loss_trend"]
    if trend:
        arrow = {"down": "↓", "up": "↑", "flat": "→"}[trend["direction"]]
        loss += f"  {arrow} {trend['change']:+.4f} over {trend['window']} logged steps  {sparkline(trend['values'])}"
    row("loss", loss)
    if run["eval_loss"] is not None:
        row("eval loss", f"{run['eval_loss']:.4f}")
    row("learning rate", _fmt(run["learning_rate"], ".3g"))
    row("tokens/s", _fmt(run["tokens_per_s"], ",.0f"))
    if run["status"] == "running":
        row("ETA", _duration(run["eta_s"]) if run["eta_s"] is not None else "-")
    row("last metrics", f"{_duration(run['last_record_age_s'])} ago" if run["last_record_age_s"] is not None
              else "-")
    ck = run["last_checkpoint"]
    ck_text = "none yet" if ck is None else f"{ck['path']}  ({_bytes(ck['size_bytes'])})"
    if run["incomplete_checkpoints"]:
        bad = run["incomplete_checkpoints"]
        names = ", ".join(b.split(":")[0] for b in bad)
        ck_text += f"  [not complete: {bad[0]}]" if len(bad) == 1 else f"  [not complete: {names}; {bad[-1]}]"
    row("last checkpoint", ck_text)
    bk = run["last_backup"]
    if bk is None or bk["path"] is None:
        bk_text = "none"
    else:
        bk_text = f"{bk['path']}  ({_duration(bk['age_s'])} ago)"
    if bk is not None and bk.get("last_error"):
        bk_text += "  [last attempt failed]"
    row("last backup", bk_text)
    return t


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.status", description=__doc__.split("\n\n")[0])
    p.add_argument("--logs-dir", default="logs", help="folder with <run>/metrics.jsonl and gpu_metrics.jsonl")
    p.add_argument("--output-dir", default="outputs", help="folder with <run>/checkpoint-N (default outputs)")
    p.add_argument("--backup-dir", default="backup", help="folder with <run>/checkpoint-N backups (default backup)")
    p.add_argument("--run", default=None, help="run name (default: the run whose metrics changed last)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the screen")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    p.add_argument("--stale-minutes", type=float, default=STALE_MINUTES,
                   help=f"warn when a running run wrote no metrics for this long (default {STALE_MINUTES:g})")
    p.add_argument("--no-docker", action="store_true", help="do not ask docker for the containers")
    p.add_argument("--docker-inspect", metavar="FILE", default=None,
                   help="read `docker inspect` output from FILE ('-' = stdin) instead of running docker: for status "
                        "inside a container, e.g. docker inspect $(docker ps -aq) | ... --docker-inspect -")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        print(f"--watch {args.watch:g}: the refresh period must be a positive number of seconds, e.g. 2",
              file=sys.stderr)
        return 2

    docker_inspect = None
    if args.docker_inspect is not None:
        try:
            if args.docker_inspect == "-":
                docker_inspect = sys.stdin.read()
            else:
                docker_inspect = Path(args.docker_inspect).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            print(f"--docker-inspect {args.docker_inspect}: cannot read it ({exc})", file=sys.stderr)
            return 2

    def collect() -> dict[str, Any]:
        return collect_status(args.logs_dir, args.output_dir, args.backup_dir, run=args.run,
                              docker=not args.no_docker, stale_minutes=args.stale_minutes,
                              docker_inspect=docker_inspect)

    from rich.console import Console

    console = Console()
    try:
        if args.watch is None:
            status = collect()
            if args.json:
                print(json.dumps(status, indent=2, default=str))
            else:
                console.print(render(status))
            return 1 if args.run is not None and status["run"] is None else 0
        if args.json:
            while True:  # one JSON object per line per refresh: `--json --watch` streams for scripts
                print(json.dumps(collect(), default=str), flush=True)
                time.sleep(args.watch)
        from rich.live import Live

        with Live(render(collect()), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(args.watch)
                live.update(render(collect()))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
