"""Data changed between a stop and `--resume auto`: refused naming what changed; the override continues and logs it."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import REPO
from tests.test_resume_e2e import Run
from training.checkpoints import CheckpointError, verify_checkpoint
from training.data_fingerprint import check_resume_data, fingerprint_changes
from training.runfiles import DATA_FINGERPRINT


def test_fingerprint_changes_name_each_file_and_the_split(tmp_path):
    old = {"files": {"a.jsonl": {"size": 10, "sha256": "x"}, "b.json": {"size": 5, "sha256": "y"},
                     "c.csv": {"size": 7, "sha256": "z"}},
           "split": {"eval_fraction": 0.05, "seed": 42, "train_examples": 90, "eval_examples": 5,
                     "train_sha256": "t", "eval_sha256": "e"}}
    new = {"files": {"a.jsonl": {"size": 12, "sha256": "x2"}, "c.csv": {"size": 7, "sha256": "z2"},
                     "d.jsonl": {"size": 3, "sha256": "w"}},
           "split": {**old["split"], "train_examples": 91}}
    assert fingerprint_changes(old, new) == [
        "a.jsonl: content changed (size 10 -> 12 bytes)", "b.json: removed",
        "c.csv: content changed (same size (7 bytes))", "d.jsonl: new file (3 bytes)",
        "split train_examples: 90 -> 91"]
    assert fingerprint_changes(old, json.loads(json.dumps(old))) == []
    retokenized = {**old, "split": {**old["split"], "train_sha256": "other"}}
    assert fingerprint_changes(old, retokenized) == [
        "the tokenized training examples differ (tokenizer or max_seq_length changed?)"]

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / DATA_FINGERPRINT).write_text(json.dumps(old))
    logged = []
    # same files and examples, tokenized differently: the position still fits, so a warning and no reset
    assert check_resume_data(ckpt, retokenized, allow_new_data=False, log=logged.append) == []
    assert "same data, tokenized differently" in logged[-1]
    with pytest.raises(CheckpointError, match="b.json: removed"):
        check_resume_data(ckpt, new, allow_new_data=False, log=logged.append)
    assert len(check_resume_data(ckpt, new, allow_new_data=True, log=logged.append)) == 5
    assert "the data position is reset" in logged[-1]


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_model_dir")
def test_resume_with_edited_data_is_refused_then_continues_with_the_override(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(REPO / "datasets" / "sample", data)
    run = Run(tmp_path, "edited")
    sets = {"data": str(data)}
    rc, log = run.run(2, resume="never", sets=sets)
    assert rc == 0, log[-4000:]
    ckpt = run.out / "checkpoint-2"
    saved = json.loads((ckpt / DATA_FINGERPRINT).read_text())
    assert set(saved["files"]) == {"alpaca.json", "chat.jsonl"} and saved["split"]["train_sha256"]
    assert DATA_FINGERPRINT in json.loads((ckpt / "COMPLETE").read_text())["files"]  # covered by the manifest

    chat = data / "chat.jsonl"
    size = chat.stat().st_size
    first = chat.read_text().splitlines()[0]
    with open(chat, "a") as fh:
        fh.write(first.replace("window", "doorway") + "\n")  # one more example
    rc, log = run.run(4, resume="auto", sets=sets)
    assert rc == 2 and "Traceback" not in log, log[-4000:]
    assert f"cannot resume from {ckpt}: the training data changed" in log
    assert f"chat.jsonl: content changed (size {size:,} -> {chat.stat().st_size:,} bytes)" in log
    assert "--set resume_with_new_data=true" in log and "--resume never" in log
    assert not run.events("resumed") and verify_checkpoint(ckpt) == []

    rc, log = run.run(4, resume="auto", sets={**sets, "resume_with_new_data": "true"})
    assert rc == 0, log[-4000:]
    changed = run.events("data_changed")
    assert len(changed) == 1 and changed[0]["step"] == 2 and changed[0]["data_position"] == "reset"
    assert changed[0]["checkpoint"] == str(ckpt) and any("chat.jsonl: content changed" in c
                                                         for c in changed[0]["changes"])
    assert run.events("resumed")[-1]["path"] == str(ckpt)
    assert json.loads((run.out / "run_summary.json").read_text())["steps"] == 4
    assert json.loads((run.out / "checkpoint-4" / DATA_FINGERPRINT).read_text())["files"]["chat.jsonl"]["size"] \
        == chat.stat().st_size

    rc, log = run.run(6, resume="auto", sets=sets)  # the newest checkpoint was trained on this data: no refusal
    assert rc == 0, log[-4000:]
    assert len(run.events("data_changed")) == 1 and run.events("resumed")[-1]["step"] == 4
