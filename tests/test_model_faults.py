"""Base-model faults through the real CLI: CPU admission by size, broken model folders, the hub gated/offline/down.

Folders are real ones damaged on purpose (a copy of the built-in tiny model with its shard cut short, files deleted);
the loader is never mocked. The hub cannot be reached from here, so the tests use what really happens without it:
HF_HUB_OFFLINE=1, a closed local port as HF_ENDPOINT (connection refused, huggingface_hub's own retries), and for
a gated repository a local HTTP server that answers like the hub does (401 + `X-Error-Code: GatedRepo`).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import REPO
from training.runfiles import read_records

# Gemma-2-2B's config.json (the fields that decide its size), as published for google/gemma-2-2b.
GEMMA_2B_CONFIG = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256000,
                   "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                   "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                   "max_position_embeddings": 8192, "tie_word_embeddings": True}
# SmolLM2-135M's shape (a Llama): 134.5M parameters.
SMOLLM2_135M_ARCH = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=2, eos_token_id=1,
                         pad_token_id=0)


def start_custom(model: str, tmp_path: Path, *extra: str, env: dict | None = None, name: str = "o"):
    cmd = [sys.executable, "-m", "training.qlora_finetune", "--model-config", "custom", "--model", model,
           "--data", "datasets/sample", "--output-dir", str(tmp_path / name), "--logs-dir", str(tmp_path / "l"),
           "--resume", "never", *extra]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout: int = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def assert_user_error(rc: int, out: str, *needles: str) -> None:
    assert rc == 2, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out[-4000:]}"


def test_cpu_admission_by_size_refuses_a_2b_config_with_a_time_estimate(tmp_path):
    folder = tmp_path / "gemma-2-2b-config"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(GEMMA_2B_CONFIG))
    rc, out = finish(start_custom(str(folder), tmp_path), timeout=180)
    assert_user_error(rc, out, "2,614M parameters", "more than the 400M", "--set allow_cpu=true", "needs a CUDA GPU",
                      "one optimizer step of 32,768 tokens would take at least ~")
    assert " hours" in out or " minutes" in out  # the step estimate: 6 x 2.6e9 x 32768 tokens on this CPU
    failed = [r for r in read_records(tmp_path / "l" / "o" / "metrics.jsonl") if r.get("event") == "failed"]
    assert failed and "ResourceError" in failed[0]["error"]


@pytest.mark.slow
def test_cpu_admission_trains_a_135m_model_without_allow_cpu(tmp_path, tiny_model_dir):
    """A SmolLM2-135M-shaped Llama (random weights, the tiny model's tokenizer) trains on the CPU by default."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llama-135m"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M_ARCH)).to(torch.bfloat16)
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    model.save_pretrained(str(folder))
    del model
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model_dir / name, folder / name)
    rc, out = finish(start_custom(str(folder), tmp_path, "--max-steps", "2", "--set", "max_seq_length=64",
                                  "--set", "per_device_train_batch_size=2", "--set", "gradient_accumulation_steps=1",
                                  "--set", "save_steps=2", "--set", "eval_fraction=0", "--set", "lora_r=4"))
    assert rc == 0, out[-4000:]
    assert "training on the CPU" in out and "135M parameters" in out and "allow_cpu" not in out.split("done in")[0]
    summary = json.loads((tmp_path / "o" / "run_summary.json").read_text())
    assert summary["steps"] == 2 and summary["device"].startswith("cpu")


def test_broken_model_folders_name_the_file_and_the_fix(tmp_path, tiny_model_dir):
    """Each damage on a real copy of the tiny model; all runs in parallel (each is a real CLI process)."""
    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_model_dir, tmp_path / name))

    truncated = copy("truncated")
    shard = truncated / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    no_tok = copy("no-tokenizer")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (no_tok / name).unlink()
    no_cfg = copy("no-config")
    (no_cfg / "config.json").unlink()
    no_weights = copy("no-weights")
    (no_weights / "model.safetensors").unlink()
    missing = tmp_path / "does-not-exist"

    procs = {key: start_custom(str(path), tmp_path, name=key) for key, path in
             [("truncated", truncated), ("no_tok", no_tok), ("no_cfg", no_cfg), ("no_weights", no_weights),
              ("missing", missing)]}
    results = {key: finish(proc, timeout=300) for key, proc in procs.items()}

    assert_user_error(*results["truncated"], str(shard), "damaged", "incomplete metadata", "models/README.md")
    assert_user_error(*results["no_tok"], f"{no_tok} has no tokenizer files", "tokenizer.json", "hf download")
    assert_user_error(*results["no_cfg"], f"{no_cfg / 'config.json'} is missing", "not a Hugging Face model folder")
    assert_user_error(*results["no_weights"], f"{no_weights} has no weights", "*.safetensors")
    assert_user_error(*results["missing"], f"{missing} does not exist")


class _GatedHub(http.server.BaseHTTPRequestHandler):
    """Answers every request the way huggingface.co answers for a gated repository without an accepted licence."""

    def _gated(self):
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model is restricted. You must have access to it.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _gated

    def log_message(self, *args):
        pass


def test_hub_gated_offline_and_unreachable(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gated_hub = f"http://127.0.0.1:{server.server_address[1]}"
    repo = "org/gated-model"
    base = {"HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "", "HF_HUB_OFFLINE": "0"}
    try:
        procs = {
            "gated": start_custom(repo, tmp_path, env={**base, "HF_ENDPOINT": gated_hub}, name="gated"),
            "gated_token": start_custom(repo, tmp_path, env={**base, "HF_ENDPOINT": gated_hub,
                                                             "HF_TOKEN": "hf_notreallyatoken"}, name="gated_token"),
            "offline": start_custom(repo, tmp_path, env={**base, "HF_HUB_OFFLINE": "1"}, name="offline"),
            # nothing listens on port 9: connection refused, after huggingface_hub's retries (~25 s)
            "down": start_custom(repo, tmp_path, env={**base, "HF_ENDPOINT": "http://127.0.0.1:9"}, name="down"),
        }
        results = {key: finish(proc, timeout=300) for key, proc in procs.items()}
    finally:
        server.shutdown()
    assert_user_error(*results["gated"], f"'{repo}' is gated", f"{gated_hub}/{repo}", "export HF_TOKEN=hf_...")
    assert_user_error(*results["gated_token"], "your HF_TOKEN has no access", f"{gated_hub}/{repo}")
    assert_user_error(*results["offline"], "HF_HUB_OFFLINE is set", "not in the Hugging Face cache", "--model /path")
    assert_user_error(*results["down"], "http://127.0.0.1:9", "unreachable", "HF_HUB_OFFLINE=1", "models/README.md")
