"""W&B tracking never blocks or fails training: offline without a key, offline when the server is down."""

from __future__ import annotations

import http.server
import os
import threading

import pytest

from training.runfiles import read_records
from training.tracking import resolve_report_to, server_answers


@pytest.fixture
def clean_wandb_env(monkeypatch):
    for var in ("WANDB_MODE", "WANDB_BASE_URL", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT", "WANDB_SILENT"):
        monkeypatch.setenv(var, "")  # recorded, so whatever the code under test sets is undone afterwards
        monkeypatch.delenv(var)
    return monkeypatch


@pytest.fixture
def local_http_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_tensorboard_only_is_untouched(clean_wandb_env, tmp_path):
    assert resolve_report_to("tensorboard", tmp_path) == ["tensorboard"]
    assert "WANDB_MODE" not in os.environ
    assert resolve_report_to("none", tmp_path) == []


def test_no_key_means_offline_under_the_run_logs(clean_wandb_env, tmp_path):
    assert resolve_report_to("tensorboard,wandb", tmp_path) == ["tensorboard", "wandb"]
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path)


def test_down_server_falls_back_to_offline(clean_wandb_env, tmp_path, caplog):
    clean_wandb_env.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: connection refused
    assert not server_answers("http://127.0.0.1:9", timeout=1)
    assert resolve_report_to("wandb", tmp_path) == ["wandb"]
    assert os.environ["WANDB_MODE"] == "offline"
    assert "does not answer" in caplog.text


def test_up_server_is_used(clean_wandb_env, tmp_path, local_http_server):
    clean_wandb_env.setenv("WANDB_BASE_URL", local_http_server)
    assert resolve_report_to("wandb", tmp_path) == ["wandb"]
    assert "WANDB_MODE" not in os.environ


def test_missing_package_drops_wandb(clean_wandb_env, tmp_path, caplog):
    import training.tracking as tracking

    clean_wandb_env.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    assert resolve_report_to("tensorboard,wandb", tmp_path) == ["tensorboard"]
    assert "wandb package is missing" in caplog.text


@pytest.mark.slow
def test_training_with_a_down_wandb_server_finishes_and_logs_offline(recipe, tmp_path, tiny_model_dir):
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install '.[wandb]')")
    out, logs = tmp_path / "o" / "wb", tmp_path / "l"
    proc = recipe(["--model-config", "tiny", "--output-dir", str(out), "--logs-dir", str(logs), "--max-steps", "10",
                   "--set", "report_to=tensorboard,wandb", "--set", "save_steps=10", "--set", "eval_steps=10"],
                  env={"WANDB_BASE_URL": "http://127.0.0.1:9", "TINY_MODEL_DIR": str(tiny_model_dir),
                       "WANDB_API_KEY": "", "WANDB_MODE": "", "WANDB_DIR": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "does not answer: logging offline" in proc.stderr
    runs = list((logs / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history = runs[0].read_bytes()
    logged = [r for r in read_records(logs / "wb" / "metrics.jsonl") if "loss" in r]
    assert history.count(b"train/loss") >= len(logged) == 3
    assert (out / "report" / "loss.png").is_file() and (out / "report" / "report.md").is_file()
