"""training/runfiles.py (the one parser of the metrics JSONL, run state from events) and
checkpoints.iter_complete_checkpoints (the one listing of checkpoints with why each is not complete)."""

from __future__ import annotations

import json

import pytest

from training.checkpoints import iter_complete_checkpoints, write_complete_marker
from training.runfiles import RunPaths, log_event, read_history, read_records, run_status


def test_read_history_sorts_records_and_tolerates_garbage(tmp_path):
    path = RunPaths.of("r", logs_root=tmp_path).metrics
    log_event(path, "r", 0, "start", max_steps=4)
    lines = [{"ts": 2.0, "step": 1, "loss": 2.0}, {"ts": 3.0, "step": 2, "loss": 1.5},
             {"ts": 4.0, "step": 2, "eval_loss": 1.7}, {"ts": 5.0, "eval_loss": 1.6},
             {"ts": 1.0, "step": 1, "loss": 1.9}]
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in lines) + "not json\n{\"ts\": 9, \"step\"")
    h = read_history(path)
    assert [r["loss"] for r in h.train] == [2.0, 1.5, 1.9]  # file order (status)
    assert {s: r["loss"] for s, r in h.by_step().items()} == {1: 1.9, 2: 1.5}  # newest per step (report)
    assert h.evals == [(2, 1.7), (None, 1.6)] and h.evals_by_step() == [(2, 1.7)]
    assert [e["event"] for e in h.events] == ["start"] and h.start_ts == 1.0 and h.end_ts > 5.0
    assert len(read_records(path)) == 6


@pytest.mark.parametrize("events, trained, want", [
    ([], False, ("unknown", None)),
    ([], True, ("running", None)),
    ([{"event": "start", "ts": 1}, {"event": "failed", "error": "boom"}], False, ("failed", "boom")),
    ([{"event": "failed", "error": "boom"}, {"event": "resumed", "ts": 5}], False, ("running", None)),
    ([{"event": "start"}, {"event": "stopped", "signal": "SIGTERM"}], False, ("stopped", "SIGTERM")),
    ([{"event": "start"}, {"event": "finished"}], False, ("finished", None)),
])
def test_run_status(events, trained, want):
    state = run_status(events, trained=trained)
    assert (state.status, state.detail) == want


def test_iter_complete_checkpoints_newest_first_with_reasons(tmp_path):
    for step in (2, 4, 6):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "w.bin").write_bytes(b"x" * step)
        if step != 6:
            write_complete_marker(ckpt)
    (tmp_path / "checkpoint-4" / "w.bin").write_bytes(b"y" * 4)  # same size, other bytes
    full = list(iter_complete_checkpoints(tmp_path))
    assert [(c.step, c.complete) for c in full] == [(6, False), (4, False), (2, True)]
    assert "no COMPLETE marker" in full[0].problem and "SHA-256" in full[1].problem
    sizes = list(iter_complete_checkpoints(tmp_path, level="sizes", newest_first=False))
    assert [(c.step, c.complete) for c in sizes] == [(2, True), (4, True), (6, False)]
    assert [c.complete for c in iter_complete_checkpoints(tmp_path, level="marker")] == [False, True, True]


def test_pause_spec():
    from training.checkpoint_callback import PauseAt

    assert PauseAt.parse("save@2:30") == PauseAt("save", 2, 30.0)
    with pytest.raises(ValueError):
        PauseAt.parse("later@2")
