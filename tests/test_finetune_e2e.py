"""The recipe end to end on the tiny preset, in a real subprocess: real bitsandbytes 4-bit, real PEFT, real TRL."""

from __future__ import annotations

import json

import pytest

from training.runfiles import read_records

pytestmark = pytest.mark.slow
METRIC_KEYS = {"ts", "run", "step", "max_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s",
               "eta_s"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """One real tiny fine-tune shared by the assertions below (42 steps, about half a minute on 2 cores): not a
    multiple of logging_steps (5), so the last step is logged only because it is the last."""
    from tests.conftest import run_recipe

    root = tmp_path_factory.mktemp("e2e")
    out, logs = root / "outputs" / "e2e", root / "logs"
    proc = run_recipe(["--model-config", "tiny", "--output-dir", str(out), "--logs-dir", str(logs),
                       "--max-steps", "42", "--resume", "never"], env={"TINY_MODEL_DIR": str(tiny_model_dir)})
    return proc, out, logs / "e2e"


def test_exit_zero_and_outputs(tiny_run):
    proc, out, logs = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "tokenizer.model").is_file()  # needed later by GGUF export
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (logs / "train.log").read_text().count("step ") >= 8
    # bitsandbytes on AVX512-BF16 CPUs logs how to "fix" a hub kernel it does not need: kept out of the user's log
    assert "kernels-community" not in proc.stderr + proc.stdout


def test_loss_falls_and_summary_is_complete(tiny_run):
    proc, out, _ = tiny_run
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["preset"] == "tiny" and summary["steps"] == 42 and summary["status"] == "finished"
    assert summary["train_loss_last"] < summary["train_loss_first"] - 0.3, summary
    assert summary["tokens_per_s"] > 0 and summary["duration_s"] > 0 and summary["device"].startswith("cpu")
    assert summary["config"]["lora_r"] == 8 and summary["versions"]["bitsandbytes"] != "missing"
    assert summary["data"]["records_per_format"] == {"alpaca": 160, "chat": 240}


def test_metrics_jsonl_follows_the_contract(tiny_run):
    _, _, logs = tiny_run
    records = read_records(logs / "metrics.jsonl")
    raw_lines = (logs / "metrics.jsonl").read_text().splitlines()
    assert len(records) == len(raw_lines)  # every line parses
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 5, 10, 15, 20, 25, 30, 35, 40, 42]
    for r in train:
        assert METRIC_KEYS <= r.keys(), r
        assert r["run"] == "e2e" and r["max_steps"] == 42
        assert 0.0 <= r["mean_token_accuracy"] <= 1.0  # what SFTTrainer logs from its LM head, passed through
    assert train[-1]["eta_s"] == 0
    events = [r["event"] for r in records if "event" in r]
    assert events[0] == "start" and events[-1] == "finished"
    assert any("eval_loss" in r for r in records)


def test_adapter_loads_back_on_the_4bit_base(tiny_run, tiny_model_dir):
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _, out, _ = tiny_run
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), quantization_config=quant,
                                                dtype=torch.float32, device_map={"": "cpu"})
    layers = [m for name, m in base.named_modules() if name.endswith(("q_proj", "down_proj"))]
    assert layers and all(isinstance(m, bnb.nn.Linear4bit) for m in layers)
    assert all(m.weight.quant_state.nested for m in layers)  # double quantisation
    ids = torch.tensor([[2, 10, 11, 12]])
    before = base(ids).logits.detach().clone()
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    after = model(ids).logits.detach()
    assert not torch.allclose(before, after), "the trained adapter changes nothing"


def test_runs_as_a_script_too(recipe):
    proc = recipe(["--help"], script=True)
    assert proc.returncode == 0 and "--model-config" in proc.stdout and "--resume" in proc.stdout


def test_big_preset_on_cpu_fails_fast_with_a_fix(recipe, tmp_path):
    proc = recipe(["--model-config", "gemma-9b", "--output-dir", str(tmp_path / "o"), "--logs-dir",
                   str(tmp_path / "l"), "--data", "datasets/sample"], timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "--model-config tiny" in proc.stderr
    assert "Traceback" not in proc.stderr
    failed = [r for r in read_records(tmp_path / "l" / "o" / "metrics.jsonl") if r.get("event") == "failed"]
    assert failed and "ResourceError" in failed[0]["error"]


def test_bad_data_fails_with_file_and_line(recipe, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    proc = recipe(["--model-config", "tiny", "--data", str(bad), "--output-dir", str(tmp_path / "o"),
                   "--logs-dir", str(tmp_path / "l")], timeout=180)
    assert proc.returncode == 2 and f"{bad}:2: malformed JSON" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_local_model_is_a_clear_error(recipe, tmp_path):
    proc = recipe(["--model-config", "custom", "--model", str(tmp_path / "no-model"), "--set", "allow_cpu=true",
                   "--data", "datasets/sample", "--output-dir", str(tmp_path / "o"), "--logs-dir",
                   str(tmp_path / "l")], timeout=180)
    assert proc.returncode == 2 and "cannot load" in proc.stderr and "Traceback" not in proc.stderr
