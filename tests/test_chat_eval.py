"""Try the result on a really trained tiny run: `make chat` (one-shot and the REPL through a real pseudo-terminal),
`make eval` and the end-of-run evaluation in the report, the chat-template rules, and the bad inputs of each."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from tests.conftest import REPO, reference_greedy, run_make, run_recipe

pytestmark = pytest.mark.slow
PROMPT = "What is 40 plus 7?"


def test_end_of_run_eval_is_in_eval_json_and_the_report(tiny_run):
    run_dir = tiny_run / "outputs" / "tiny-run"
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["data"]["source"] == "eval_split" and ev["examples"] > 0 and ev["end_of_turn"] == "<end_of_turn>"
    assert ev["adapter_loss"]["loss"] < ev["base_loss"]["loss"]  # 20 steps on the sample data help the random base
    assert ev["adapter_loss"]["perplexity"] == pytest.approx(2.718281828 ** ev["adapter_loss"]["loss"], rel=1e-6)
    assert len(ev["prompts"]) == 2 and ev["max_new_tokens"] == 16  # the tiny preset keeps it short
    assert all(p["reference"] and "adapter" in p and "base" in p for p in ev["prompts"])
    report = (run_dir / "report" / "report.md").read_text()
    assert "## Base vs fine-tuned" in report and "| prompt | base | fine-tuned |" in report
    assert f"{ev['adapter_loss']['loss']:.4f}" in report and ev["prompts"][0]["prompt"] in report


def test_make_chat_prompt_greedy_prints_what_generate_gives(tiny_run, tiny_model_dir):
    run_dir = tiny_run / "outputs" / "tiny-run"
    proc = run_make(["chat", "RUN=tiny-run", f"PROMPT={PROMPT}",
                     f"ARGS=--greedy --max-new-tokens 24 --output-dir {tiny_run / 'outputs'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, _ = reference_greedy(tiny_model_dir, run_dir / "adapter", PROMPT, 24)
    assert want.strip(), "the reference answer is empty: the comparison would prove nothing"
    assert proc.stdout.endswith(want + "\n"), (proc.stdout, want)
    assert proc.stdout.splitlines()[-1] == want.splitlines()[-1] and "<end_of_turn>" not in proc.stdout

    proc = run_make(["chat", "RUN=tiny-run", f"PROMPT={PROMPT}",
                     f"ARGS=--greedy --merged --max-new-tokens 24 --output-dir {tiny_run / 'outputs'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged, _ = reference_greedy(tiny_model_dir, run_dir / "adapter", PROMPT, 24, merged=True)
    assert proc.stdout.endswith(merged + "\n"), (proc.stdout, merged)


def test_repl_through_a_pseudo_terminal(tiny_run):
    pexpect = pytest.importorskip("pexpect")
    cmd = [sys.executable, "-m", "training.chat", "--run", "tiny-run", "--output-dir", str(tiny_run / "outputs"),
           "--greedy", "--max-new-tokens", "8"]
    child = pexpect.spawn(cmd[0], cmd[1:], cwd=str(REPO), encoding="utf-8", timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    child.expect("/reset clears the history")
    child.expect_exact("you> ")
    child.sendline("Name the four seasons.")
    child.expect_exact("bot> ")
    child.expect_exact("you> ")  # the answer streamed, then the next prompt
    first = child.before
    child.sendline("/reset")
    child.expect_exact("(history cleared)")
    child.expect_exact("you> ")
    child.sendline("Name the four seasons.")
    child.expect_exact("bot> ")
    child.expect_exact("you> ")
    assert child.before == first  # greedy + a cleared history: the same answer as the first turn
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    child = pexpect.spawn(cmd[0], cmd[1:], cwd=str(REPO), encoding="utf-8", timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    child.expect_exact("you> ")
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_generation_attention_does_not_inherit_a_training_only_kernel():
    from training.chat import generation_attention

    assert generation_attention("flash_attention_4", cuda=True) == "flex_attention"  # its window was dropped to train
    assert generation_attention("flex_attention", cuda=True) == "flex_attention"
    assert {generation_attention(a, cuda=False) for a in ("flash_attention_4", "flex_attention", "eager")} == {"eager"}


def test_history_is_cut_to_the_context_oldest_turns_first(tiny_tokenizer):
    from training.chat import fit_history, prompt_ids

    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"question number {i} about the seasons"},
                    {"role": "assistant", "content": f"answer number {i}, rather long for the test"}]
    history.append({"role": "user", "content": "the newest question"})
    budget = len(prompt_ids(tiny_tokenizer, history)) // 3
    kept, ids = fit_history(tiny_tokenizer, history, budget)
    assert len(ids) <= budget and kept[-1] == history[-1] and kept[0]["role"] == "user"
    assert kept == history[len(history) - len(kept):] and len(kept) < len(history)
    assert ids == prompt_ids(tiny_tokenizer, kept)
    system = [{"role": "system", "content": "Be brief."}]
    kept, ids = fit_history(tiny_tokenizer, system + history, budget)
    assert kept[0] == system[0] and kept[1]["role"] == "user" and kept[-1] == history[-1] and len(ids) <= budget


def test_make_eval_with_a_data_file_and_a_prompts_file(tiny_run, tmp_path):
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus 1?"},
                                                    {"role": "assistant", "content": f"{a} plus 1 is {a + 1}."}]})
                            + "\n" for a in range(5)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\nName a colour.\n\nWhat is 2 plus 2?\n")
    proc = run_make(["eval", "RUN=tiny-run", f"DATA={data}", f"PROMPTS={prompts}",
                     f"ARGS=--output-dir {tiny_run / 'outputs'} --logs-dir {tiny_run / 'logs'} --max-new-tokens 8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((tiny_run / "outputs" / "tiny-run" / "eval.json").read_text())
    assert ev["data"] == {"source": "file", "path": str(data)} and ev["examples"] == 5
    assert [p["prompt"] for p in ev["prompts"]] == ["Name a colour.", "What is 2 plus 2?"]
    assert ev["base_loss"]["tokens"] == ev["adapter_loss"]["tokens"] > 0
    assert "Name a colour." in (tiny_run / "outputs" / "tiny-run" / "report" / "report.md").read_text()


def assert_user_error(proc, *needles):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out[-3000:]}"


def chat(args, **kw):
    import subprocess

    return subprocess.run([sys.executable, "-m", "training.chat", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
                          **kw)


def test_chat_errors_missing_run_missing_base_other_base(tiny_run, tiny_model_dir, tmp_path):
    outputs = tiny_run / "outputs"
    assert_user_error(chat(["--run", "nope", "--output-dir", str(outputs), "--prompt", "hi"]),
                      "run 'nope'", "does not exist", "tiny-run", "make chat")
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    assert_user_error(chat(["--run", "tiny-run", "--output-dir", str(outputs), "--base", str(other),
                            "--prompt", "hi"]), "was trained on", "--base")
    moved = tmp_path / "outputs" / "moved"
    shutil.copytree(outputs / "tiny-run", moved)
    for rel, key in (("run_summary.json", None), ("adapter/adapter_config.json", "base_model_name_or_path")):
        data = json.loads((moved / rel).read_text())
        if key:
            data[key] = str(tmp_path / "gone")
        else:
            data["config"]["model_name_or_path"] = str(tmp_path / "gone")
        (moved / rel).write_text(json.dumps(data))
    assert_user_error(chat(["--run", "moved", "--output-dir", str(tmp_path / "outputs"), "--prompt", "hi"]),
                      f"cannot load '{tmp_path / 'gone'}'")


def test_a_tokenizer_without_a_chat_template_is_refused_with_the_fix(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from training.data import DataError, Example, Tokenize

    bare = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(str(bare))
    assert not tok.chat_template
    ex = Example("data.jsonl:3", "chat", messages=[{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello"}])
    with pytest.raises(DataError, match=r"(?s)data.jsonl:3: .*no chat template.*--set chat_template="):
        Tokenize(tok, 64)(ex)
    ids, labels = Tokenize(tok, 64)(Example("x", "text", text="plain text needs no template"))
    assert ids == labels

    logs = tmp_path / "logs"
    proc = run_recipe(["--model-config", "custom", "--model", str(bare), "--data", "datasets/sample",
                       "--output-dir", str(tmp_path / "outputs" / "bare"), "--logs-dir", str(logs), "--resume", "never",
                       "--set", "allow_cpu=true", "--max-steps", "1"])
    assert_user_error(proc, "has no chat template", "--set chat_template=path/to/template.jinja")
    template = tmp_path / "gemma.jinja"
    template.write_text(AutoTokenizer.from_pretrained(str(tiny_model_dir)).chat_template)
    proc = run_recipe(["--model-config", "tiny", "--model", str(bare), "--output-dir", str(tmp_path / "outputs" / "t"),
                       "--logs-dir", str(logs), "--resume", "never", "--max-steps", "2", "--set", "eval_fraction=0",
                       "--set", f"chat_template={template}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "outputs" / "t" / "adapter"))
    assert saved.chat_template == template.read_text()  # the run keeps the template it was trained with
    proc = run_recipe(["--model-config", "tiny", "--output-dir", str(tmp_path / "outputs" / "u"), "--logs-dir",
                       str(logs), "--set", f"chat_template={tmp_path / 'missing.jinja'}"])
    assert_user_error(proc, "chat_template=", "no such file")


def test_quickstart_notebook_runs_headless_on_the_tiny_run(tiny_run, monkeypatch):
    """notebooks/quickstart.ipynb as Jupyter runs it (a real kernel, nbclient): metrics plot, eval, chat."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for key, value in (("OUTPUT_DIR", str(tiny_run / "outputs")), ("LOGS_DIR", str(tiny_run / "logs")),
                       ("RUN", "tiny-run"), ("PYTHONPATH", str(REPO)), ("MPLBACKEND", "agg")):
        monkeypatch.setenv(key, value)
    nb = nbformat.read(str(REPO / "notebooks" / "quickstart.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss plot
    assert any("Base vs fine-tuned" in o.get("data", {}).get("text/markdown", "") for o in outputs)
    streamed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert f"run: {tiny_run / 'outputs' / 'tiny-run'}" in streamed
    ev = json.loads((tiny_run / "outputs" / "tiny-run" / "eval.json").read_text())
    assert len(ev["prompts"]) == 3 and ev["max_new_tokens"] == 32  # the notebook's own evaluation


def test_a_run_folder_named_apart_from_the_run_gets_its_eval_and_report(tmp_path):
    """--output-dir .../folder with another --run-name: the end-of-run evaluation and the report go with the run's
    folder (its logs are logs/<run-name>), never into a folder named after the run."""
    out = tmp_path / "outputs" / "folder"
    proc = run_recipe(["--model-config", "tiny", "--output-dir", str(out), "--run-name", "named",
                       "--logs-dir", str(tmp_path / "logs"), "--max-steps", "2", "--resume", "never"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["adapter_loss"]["loss"] > 0 and not (tmp_path / "outputs" / "named").exists()
    assert (tmp_path / "logs" / "named" / "metrics.jsonl").is_file()
    assert "# Run report: named" in (out / "report" / "report.md").read_text()
