"""training/export/ on a really trained tiny run: merge (== adapter-on-base), GGUF f32 / q8_0 / q4_k_m through
llama.cpp's real converter, loaded back with the real llama-cpp-python and compared with the merged model here,
independently of the export's own checks; the Modelfile; each bad input a clear error with exit 2; a failed check
exit 3 with nothing left in the GGUF folder.

llama-cpp-python is an extra (`.[export]`, a ~5 minute compile): without it the GGUF tests skip, except in CI."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not HAVE_LLAMA and not os.environ.get("CI"),
                                 reason="needs llama-cpp-python (pip install -e '.[export]'; CI installs it, so CI "
                                        "never skips)")

# What the tiny model must reach against a float32 reference, measured here independently of the export's own
# check: (max |logit difference|, least top-1 agreement). Measured: f32 5e-4 / 1.0, q8_0 0.03 / 0.98,
# q4_k_m 0.08 / 0.89; the merged model without its adapter is 0.93 / 0.01 away, so these catch a broken conversion.
EXPECTED = {"f32": (0.01, 1.0), "q8_0": (0.1, 0.9), "q4_k_m": (0.3, 0.75)}


def run_export(args: list[str], cwd: Path = REPO, env: dict | None = None,
               timeout: int = 900) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "training.export", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out}"


@pytest.fixture
def trained(tiny_run) -> Path:
    """The shared 20-step tiny run (tests/conftest.py): outputs/tiny-run/adapter + run_summary.json."""
    return tiny_run


def tiny_prompt_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name the four seasons of the year."}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def load(path, **kw):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager",
                                                **kw).eval()


# ---------------------------------------------------------------------------------------------------------- merge
@pytest.mark.slow
def test_merge_equals_adapter_on_base(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoTokenizer

    proc = run_export(["--run", "tiny-run", "--output-dir", str(trained / "outputs"), "--format", "merged"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = trained / "outputs" / "tiny-run"
    merged = run_dir / "merged"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer.model", "merge_info.json",
                 "export_report.json"):
        assert (merged / name).is_file(), name
    assert not list(merged.parent.glob(".merged.tmp*")), "temporary merge folder left behind"
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config, "the merge must not come from 4-bit weights"
    assert config.get("dtype") == "float32"  # the tiny base's own precision
    assert (merged / "tokenizer.model").read_bytes() == (tiny_model_dir / "tokenizer.model").read_bytes()
    tok = AutoTokenizer.from_pretrained(str(merged))
    assert "<start_of_turn>" in (tok.chat_template or "")

    # independently of the export's own check: merged == base + adapter, and the adapter changed the base
    ids = tiny_prompt_ids(tok)
    base_only = hf_logits(load(tiny_model_dir), ids)
    on_base = hf_logits(PeftModel.from_pretrained(load(tiny_model_dir), str(run_dir / "adapter")).eval(), ids)
    merged_out = hf_logits(load(merged), ids)
    assert np.abs(merged_out - on_base).max() < 1e-4
    assert np.abs(on_base - base_only).max() > 1e-2, "the trained adapter should change the base's outputs"
    info = json.loads((merged / "merge_info.json").read_text())
    assert info["merged_vs_adapter_on_base"]["passed"] and info["merged_vs_adapter_on_base"]["top1_agreement"] == 1.0
    # informational: the model as trained (4-bit base + adapter) is close to the merged one, but not identical (NF4
    # rounding of the base); the base without the adapter would agree on ~1% of top tokens
    trained_cmp = info["merged_vs_trained_4bit"]
    assert trained_cmp["positions"] == info["merged_vs_adapter_on_base"]["positions"]
    assert 0.5 < trained_cmp["top1_agreement"] and 0 < trained_cmp["max_logit_diff"]


# ----------------------------------------------------------------------------------------------------------- GGUF
@pytest.mark.slow
@needs_llama
@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_k_m"])
def test_gguf_export_agrees_with_merged_model(trained, quant):
    assert HAVE_LLAMA, "CI: llama-cpp-python missing (CMAKE_ARGS=-DGGML_NATIVE=OFF pip install -e '.[export]')"
    import llama_cpp
    from transformers import AutoTokenizer

    gguf_dir = trained / "gguf"
    proc = run_export(["--run", "tiny-run", "--output-dir", str(trained / "outputs"), "--gguf-dir", str(gguf_dir),
                       "--quant", quant])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    folder = gguf_dir / f"tiny-run-{quant}"
    gguf = folder / f"tiny-run-{quant}.gguf"
    assert gguf.is_file() and (folder / "Modelfile").is_file() and (folder / "export_report.json").is_file()
    assert not list(gguf_dir.glob(".tmp-*")), "temporary export folder left behind"
    assert not (folder / "reference_logits.npz").exists() and not (folder / "intermediate.gguf").exists()

    report = json.loads((folder / "export_report.json").read_text())
    assert report["passed"] and all(c["passed"] for c in report["checks"].values()), report["checks"]
    assert report["gguf_bytes"] == gguf.stat().st_size
    assert report["checks"]["tensor_count"]["gguf"] == 2 + 11 * 2  # Gemma-2: embeddings, final norm, 11 per layer
    assert set(report["timings"]) >= {"merge_s", "convert_s", "check_s", "total_s"}

    # independently: this test's own llama-cpp-python load against the merged HF model
    merged = trained / "outputs" / "tiny-run" / "merged"
    tok = AutoTokenizer.from_pretrained(str(merged))
    ids = tiny_prompt_ids(tok)
    ref = hf_logits(load(merged), ids)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, logits_all=True, n_gpu_layers=0, verbose=False)
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    tokens_again = list(llm.tokenize(tok.decode(ids).encode(), add_bos=False, special=True))
    # Ollama's template has no <bos>; the chat template starts with it, so llama.cpp must add it
    bos_first = llm.tokenize(b"hello", add_bos=True, special=False)[0] == tok.bos_token_id
    chat_template = llm.metadata.get("tokenizer.chat_template", "")
    llm.close()
    assert got.shape == ref.shape
    max_diff, min_top1 = EXPECTED[quant]
    assert np.abs(got - ref).max() < max_diff
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= min_top1
    assert tokens_again == ids  # llama.cpp / Ollama read <start_of_turn> etc. as the same tokens
    assert bos_first and report["checks"]["tokenizer"]["bos_added_by_llama_cpp"] is True
    assert chat_template.strip() == tok.chat_template.strip()

    mf = parse_modelfile((folder / "Modelfile").read_text())
    assert (folder / mf["from"]).resolve() == gguf.resolve()
    assert ("stop", "<end_of_turn>") in mf["parameters"] and ("stop", "<start_of_turn>") in mf["parameters"]
    for piece in ("<start_of_turn>user", "<start_of_turn>model", "<end_of_turn>", ".Content", "range"):
        assert piece in mf["template"], piece
    if quant != "f32":
        assert "reusing the merge" in proc.stderr  # a second quantisation does not merge again


def parse_modelfile(text: str) -> dict:
    """The FROM / TEMPLATE / PARAMETER instructions of a Modelfile (Ollama's syntax, the subset the export writes)."""
    out: dict = {"from": None, "template": None, "system": None, "parameters": []}
    i, lines = 0, text.splitlines()
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        cmd, _, rest = line.partition(" ")
        cmd = cmd.upper()
        if cmd in ("TEMPLATE", "SYSTEM") and rest.startswith('"""'):
            body = rest[3:]
            while '"""' not in body:
                if i >= len(lines):
                    raise ValueError(f"{cmd}: unterminated triple-quoted string")
                body += "\n" + lines[i]
                i += 1
            out[cmd.lower()] = body[:body.index('"""')]
        elif cmd == "FROM":
            out["from"] = rest.strip()
        elif cmd == "PARAMETER":
            key, _, value = rest.strip().partition(" ")
            value = value.strip()
            out["parameters"].append((key, json.loads(value) if value.startswith('"') else value))
        else:
            raise ValueError(f"unknown Modelfile instruction {cmd!r}")
    return out


def test_modelfile_parser_reads_what_we_write_and_rejects_garbage():
    from training.export import modelfile_text
    from training.templates import OLLAMA_TEMPLATES

    mf = parse_modelfile(modelfile_text("x-q8_0.gguf", 4096))
    assert mf["from"] == "./x-q8_0.gguf" and mf["template"] == OLLAMA_TEMPLATES["gemma"] and mf["system"] is None
    chatml = parse_modelfile(modelfile_text("s.gguf", 8192, "chatml", "You are SmolLM."))
    assert chatml["template"] == OLLAMA_TEMPLATES["chatml"] and chatml["system"] == "You are SmolLM."
    assert ("stop", "<|im_end|>") in chatml["parameters"]
    assert ("num_ctx", "4096") in mf["parameters"]
    with pytest.raises(ValueError):
        parse_modelfile('FROM ./a.gguf\nTEMPLATE """never closed\n')
    with pytest.raises(ValueError):
        parse_modelfile("FROM ./a.gguf\nBOGUS 1\n")


# Conversations that end with a user turn: one turn, a system message and several turns, a multi-line message.
TEMPLATE_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": "three\nlines"}],
]


def render_ollama_template(template: str, system: str, conv: list[dict], tmp_path) -> str:
    """What Ollama writes for `conv` with this TEMPLATE and system text: Go's text/template, run for real."""
    (tmp_path / "render.go").write_text(GO_RENDER)
    job = {"Template": template,
           "Data": {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in conv]}}
    proc = subprocess.run(["go", "run", str(tmp_path / "render.go")], input=json.dumps(job), capture_output=True,
                          text=True, timeout=300, env={**os.environ, "GOCACHE": str(tmp_path / "gocache"),
                                                       "GOPATH": str(tmp_path / "gopath")})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var in struct {
		Template string
		Data     struct {
			System   string
			Messages []Message
		}
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	if err := template.Must(template.New("m").Parse(in.Template)).Execute(os.Stdout, in.Data); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs a Go toolchain (apt install golang-go) to run "
                                                        "Ollama's template language, Go's text/template")
def test_modelfile_template_renders_what_the_chat_template_renders(tmp_path, tiny_tokenizer):
    """Ollama renders TEMPLATE with Go's text/template; for every prompt that ends with a user turn it must give
    the text the run was trained on (Gemma's chat template, system folded into the first user turn), less the <bos>
    that llama.cpp adds itself."""
    from training.data import fold_system_message
    from training.templates import OLLAMA_TEMPLATES

    for conv in TEMPLATE_CONVERSATIONS:
        want = tiny_tokenizer.apply_chat_template(fold_system_message(conv), tokenize=False,
                                                  add_generation_prompt=True)
        got = render_ollama_template(OLLAMA_TEMPLATES["gemma"], "", conv, tmp_path)
        assert got == want.removeprefix(tiny_tokenizer.bos_token), conv


@pytest.mark.slow
@needs_llama
def test_failed_check_fails_the_export_and_leaves_nothing(trained, monkeypatch, caplog):
    """A limit no real conversion meets (max logit difference 0 sd): exit 3, no new folder, the old export intact."""
    assert HAVE_LLAMA, "CI: llama-cpp-python missing"
    import dataclasses

    from training import export

    gguf_dir = trained / "gguf-failed"
    previous = gguf_dir / "tiny-run-f32"
    previous.mkdir(parents=True)
    (previous / "export_report.json").write_text('{"old": true}')
    monkeypatch.setitem(export.QUANTS, "f32", dataclasses.replace(export.QUANTS["f32"], max_diff_std=0.0))
    monkeypatch.chdir(REPO)
    rc = export.main(["--run", "tiny-run", "--output-dir", str(trained / "outputs"), "--gguf-dir", str(gguf_dir),
                      "--quant", "f32"])
    assert rc == 3
    assert sorted(p.name for p in gguf_dir.iterdir()) == ["tiny-run-f32"]
    assert (previous / "export_report.json").read_text() == '{"old": true}'
    assert "logits_vs_merged: top-1 agreement" in caplog.text and "limit 0.0 sd" in caplog.text
    kept = json.loads((trained / "outputs" / "tiny-run" / "export_report-f32-failed.json").read_text())
    assert kept["passed"] is False and kept["checks"]["logits_vs_merged"]["passed"] is False


# ------------------------------------------------------------------------------------------------------ bad input
def test_no_such_run(tmp_path):
    (tmp_path / "outputs" / "other" / "adapter").mkdir(parents=True)
    (tmp_path / "outputs" / "other" / "adapter" / "adapter_config.json").write_text("{}")
    proc = run_export(["--run", "nope", "--output-dir", str(tmp_path / "outputs"), "--format", "merged"])
    assert_user_error(proc, "run 'nope'", "does not exist", "other")


def test_unknown_quantisation(tmp_path):
    proc = run_export(["--run", "x", "--output-dir", str(tmp_path), "--quant", "q3_weird"])
    assert_user_error(proc, "--quant q3_weird", "q4_k_m")


def test_unreadable_converter_source(tmp_path):
    bad = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    bad.write_text("not a tarball")
    proc = run_export(["--fetch-converter", "--converter-dir", str(tmp_path / "conv"), "--converter-sdist", str(bad)])
    assert_user_error(proc, "--converter-sdist", "not a readable")
    assert not (tmp_path / "conv").exists()


def test_converter_source_with_the_wrong_checksum_is_refused(tmp_path):
    """A tarball that has the right layout but is not the published llama-cpp-python 0.3.36 source."""
    import tarfile

    from training.export import LLAMA_CPP_PYTHON_VERSION, llama_cpp_version

    if (llama_cpp_version() or LLAMA_CPP_PYTHON_VERSION) != "0.3.36":
        pytest.skip("another llama-cpp-python version is installed: no pinned checksum for it")
    src = tmp_path / "src" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    (src / "gguf-py" / "gguf").mkdir(parents=True)
    (src / "convert_hf_to_gguf.py").write_text("print('not the real converter')\n")
    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        tar.add(tmp_path / "src" / "llama_cpp_python-0.3.36", arcname="llama_cpp_python-0.3.36")
    proc = run_export(["--fetch-converter", "--converter-dir", str(tmp_path / "conv"), "--converter-sdist", str(fake)])
    assert_user_error(proc, "sha256", "not the published llama-cpp-python 0.3.36")
    assert not (tmp_path / "conv").exists()


def _copy_run(trained: Path, dest: Path) -> Path:
    run = dest / "outputs" / "tiny-run"
    shutil.copytree(trained / "outputs" / "tiny-run" / "adapter", run / "adapter")
    shutil.copy(trained / "outputs" / "tiny-run" / "run_summary.json", run / "run_summary.json")
    return run


@pytest.mark.slow
def test_adapter_whose_base_does_not_match(trained, tiny_model_dir, tmp_path):
    _copy_run(trained, tmp_path)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    proc = run_export(["--run", "tiny-run", "--output-dir", str(tmp_path / "outputs"), "--format", "merged",
                       "--base", str(other)])
    assert_user_error(proc, "was trained on", "base_model_name_or_path", "--allow-other-base")
    assert not (tmp_path / "outputs" / "tiny-run" / "merged").exists()


@pytest.mark.slow
def test_missing_tokenizer_model(trained, tiny_model_dir, tmp_path):
    run = _copy_run(trained, tmp_path)
    (run / "adapter" / "tokenizer.model").unlink()
    base = tmp_path / "base-without-spm"
    shutil.copytree(tiny_model_dir, base)
    (base / "tokenizer.model").unlink()
    proc = run_export(["--run", "tiny-run", "--output-dir", str(tmp_path / "outputs"), "--format", "merged",
                       "--base", str(base), "--allow-other-base"])
    assert_user_error(proc, "no tokenizer.model", "copy tokenizer.model")
    assert not (run / "merged").exists()


@pytest.mark.slow
def test_too_little_memory(trained, tiny_model_dir, tmp_path):
    """A base whose safetensors declares 2^38 bf16 parameters (512 GiB): refused from the headers, nothing loaded."""
    _copy_run(trained, tmp_path)
    huge = tmp_path / "huge-base"
    huge.mkdir()
    shutil.copy(tiny_model_dir / "config.json", huge / "config.json")
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2**19, 2**19], "data_offsets": [0, 2**39]}}).encode()
    with open(huge / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
    try:
        os.truncate(huge / "model.safetensors", 8 + len(header) + 2**39)  # sparse: no real disk used
    except OSError as exc:
        pytest.skip(f"this filesystem cannot hold a sparse 512 GiB file: {exc}")
    cfg = json.loads((huge / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (huge / "config.json").write_text(json.dumps(cfg))
    proc = run_export(["--run", "tiny-run", "--output-dir", str(tmp_path / "outputs"), "--format", "merged",
                       "--base", str(huge), "--allow-other-base"])
    assert_user_error(proc, "not enough memory", "GiB")


@pytest.mark.slow
@needs_llama
def test_too_little_disk(trained, tmp_path):
    """A real 1 MiB tmpfs as the GGUF folder."""
    assert HAVE_LLAMA, "CI: llama-cpp-python missing"
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs (needs root/CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        proc = run_export(["--run", "tiny-run", "--output-dir", str(trained / "outputs"), "--gguf-dir", str(mnt),
                           "--quant", "f32"])
        assert_user_error(proc, "not enough disk space", str(mnt))
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
@needs_llama
def test_disk_full_during_the_export(trained, tmp_path):
    """A 64 MiB tmpfs as the GGUF folder passes the plan; it is filled as soon as the export's work folder appears:
    exit 2 naming the free space and the fix, nothing partial left; after space is freed the same command works."""
    import time

    assert HAVE_LLAMA, "CI: llama-cpp-python missing"
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    args = ["--run", "tiny-run", "--output-dir", str(trained / "outputs"), "--gguf-dir", str(mnt), "--quant", "q8_0"]
    try:
        export = subprocess.Popen([sys.executable, "-m", "training.export", *args], cwd=REPO, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not list(mnt.glob(".tmp-*")) and export.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        ballast = mnt / "ballast"
        with open(ballast, "wb") as fh:  # another writer takes the space while the GGUF is being written
            fh.write(b"\0" * (shutil.disk_usage(mnt).free - 16384))
        out, _ = export.communicate(timeout=600)
        assert export.returncode == 2 and "Traceback" not in out, out[-4000:]
        assert "disk full during the export" in out and f"MiB free on the disk of {mnt}" in out, out[-3000:]
        assert "--gguf-dir" in out
        assert [p.name for p in mnt.iterdir()] == ["ballast"]  # the partial GGUF folder is gone
        ballast.unlink()
        proc = run_export(args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (mnt / "tiny-run-q8_0" / "tiny-run-q8_0.gguf").is_file()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_stale_temporary_export_folders_are_removed(tmp_path):
    from training.export.gguf import remove_stale_tmp

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".tmp-run-q8_0-{dead.pid}").mkdir()
    (tmp_path / f".tmp-run-f32-{os.getpid()}").mkdir()  # a live export's folder stays
    (tmp_path / "run-q8_0").mkdir()
    remove_stale_tmp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".tmp-run-f32-{os.getpid()}", "run-q8_0"])


def test_hub_base_matches_its_cache_snapshot(tmp_path):
    from training.export.run import same_base

    snap = tmp_path / "hub" / "models--google--gemma-2-2b" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert same_base("google/gemma-2-2b", snap)
    assert not same_base("google/gemma-2-9b", snap)


def test_llama_cpp_python_pin_is_one_version_everywhere():
    """pyproject's export extra, the Dockerfile's export stages and the converter's sha256 table name one release:
    a bump in one place alone would build a wheel and a converter from different llama.cpp versions."""
    import re

    from training import export

    pins = set(re.findall(r"llama-cpp-python==([0-9.]+)", (REPO / "pyproject.toml").read_text()))
    args = set(re.findall(r"ARG LLAMA_CPP_PYTHON_VERSION=([0-9.]+)", (REPO / "Dockerfile").read_text()))
    assert len(re.findall(r"ARG LLAMA_CPP_PYTHON_VERSION=", (REPO / "Dockerfile").read_text())) == 2  # both stages
    assert pins == args == {export.LLAMA_CPP_PYTHON_VERSION}, (pins, args, export.LLAMA_CPP_PYTHON_VERSION)
    assert export.LLAMA_CPP_PYTHON_VERSION in export.SDIST_SHA256
