"""Data loading: every format and file type, file:line errors for bad input, masking on real tokens."""

from __future__ import annotations

import json

import pytest

from training.data import (IGNORE_INDEX, DataError, DataStats, Tokenize, build_datasets, fold_system_message,
                           load_examples, main, split_examples)

CHAT = {"messages": [{"role": "user", "content": "What is 2 plus 2?"},
                     {"role": "assistant", "content": "2 plus 2 is 4."}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
ALPACA = {"instruction": "Answer.", "input": "What colour is snow?", "output": "Snow is white."}
PROMPT_COMPLETION = {"prompt": "The capital of Peru is", "completion": " Lima."}
TEXT = {"text": "The quick brown fox."}
RECORDS = {"chat": CHAT, "sharegpt": SHAREGPT, "alpaca": ALPACA, "prompt_completion": PROMPT_COMPLETION,
           "text": TEXT}


def write_jsonl(path, records, newline="\n", bom=False):
    text = newline.join(json.dumps(r) for r in records) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_each_format_detected_in_jsonl(tmp_path, fmt):
    stats = DataStats()
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [RECORDS[fmt]] * 3), stats)
    assert len(examples) == 3 and {e.fmt for e in examples} == {fmt}
    assert stats.per_format == {fmt: 3}


def test_file_types_json_csv_parquet_and_saved_dataset(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    (tmp_path / "a.json").write_text(json.dumps([ALPACA, ALPACA], indent=2))
    (tmp_path / "b.csv").write_text("prompt,completion\r\nHello,\" there\"\r\nBye,\" now\"\r\n")
    pq.write_table(pa.Table.from_pylist([TEXT, TEXT, TEXT]), tmp_path / "c.parquet")
    stats = DataStats()
    examples = load_examples(tmp_path, stats)
    assert stats.per_format == {"alpaca": 2, "prompt_completion": 2, "text": 3}
    assert examples[2].prompt == "Hello" and examples[2].completion == " there"  # CRLF + quoting in CSV
    saved = tmp_path / "saved"
    Dataset.from_list([CHAT, CHAT]).save_to_disk(str(saved))
    stats = DataStats()
    assert [e.fmt for e in load_examples(saved, stats)] == ["chat", "chat"]


def test_bom_and_crlf_accepted(tmp_path):
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [CHAT, ALPACA | {}][:1] * 2, newline="\r\n", bom=True))
    assert len(examples) == 2 and examples[0].messages[1]["content"] == "2 plus 2 is 4."
    (tmp_path / "e.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([TEXT]).encode())
    assert load_examples(tmp_path / "e.json")[0].text == TEXT["text"]


@pytest.mark.parametrize("lines, where, needle", [
    ([json.dumps(CHAT), '{"messages": [', json.dumps(CHAT)], ":2:", "malformed JSON"),
    ([json.dumps(CHAT), json.dumps({"foo": 1})], ":2:", "unrecognised record with keys ['foo']"),
    ([json.dumps({"instruction": "x", "output": ""})], ":1:", "'output' is empty"),
    ([json.dumps(CHAT), "", json.dumps(ALPACA)], ":3:", "mixed formats in one file"),
    ([json.dumps({"messages": [{"role": "narrator", "content": "x"}]})], ":1:", "unknown role 'narrator'"),
    ([json.dumps({"messages": [{"role": "user", "content": "x"}]})], ":1:", "no assistant message"),
    ([json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})], ":1:",
     "must alternate"),
    ([json.dumps({"messages": [{"role": "user"}]})], ":1:", "must be an object with 'role' and 'content'"),
    ([json.dumps({"conversations": [{"from": "alien", "value": "x"}]})], ":1:", "unknown role 'alien'"),
    (["[1, 2]"], ":1:", "expected a JSON object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, lines, where, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert f"{path}{where}" in str(err.value) and needle in str(err.value)


def test_bad_json_array_points_at_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "ok"},\n  {"text": "also ok"},\n  {"nope": 1}\n]\n')
    with pytest.raises(DataError, match=rf"{path}:4: unrecognised record"):
        load_examples(path)
    path.write_text('[\n  {"text": "ok"},\n  {"text": "broken\n]\n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        load_examples(path)
    path.write_text('{"text": "not an array"}')
    with pytest.raises(DataError, match="expected a JSON array"):
        load_examples(path)


def test_empty_file_missing_path_wrong_type_empty_folder(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl:1: empty file"):
        load_examples(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="no such file or folder"):
        load_examples(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_examples(tmp_path / "x.txt")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="no data files found"):
        load_examples(tmp_path / "sub")
    csv = tmp_path / "bad.csv"
    csv.write_text("question,answer\nq,a\n")
    with pytest.raises(DataError, match=rf"{csv}:2: unrecognised record"):
        load_examples(csv)


def test_system_role_is_folded_into_first_user_turn(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    assert fold_system_message(messages)[0] == {"role": "user", "content": "Be brief.\n\nHi"}
    tok = Tokenize(tiny_tokenizer, 256)
    assert tok.fold_system  # Gemma's template refuses a system role
    from training.data import Example

    ids, _ = tok(Example("x", "chat", messages=messages))
    text = tiny_tokenizer.decode(ids)
    assert "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>" in text and "system" not in text


def test_completion_only_masking_on_tokens(tiny_tokenizer):
    from training.data import Example

    tok = Tokenize(tiny_tokenizer, 512)
    ex = Example("x", "chat", messages=[{"role": "user", "content": "What is 3 plus 4?"},
                                         {"role": "assistant", "content": "3 plus 4 is 7."},
                                         {"role": "user", "content": "And 1 plus 1?"},
                                         {"role": "assistant", "content": "1 plus 1 is 2."}])
    ids, labels = tok(ex)
    trained = tiny_tokenizer.decode([t for t, lbl in zip(ids, labels) if lbl != IGNORE_INDEX])
    masked = tiny_tokenizer.decode([t for t, lbl in zip(ids, labels) if lbl == IGNORE_INDEX])
    assert trained == "3 plus 4 is 7.<end_of_turn>\n1 plus 1 is 2.<end_of_turn>\n"
    assert "What is 3 plus 4?" in masked and "And 1 plus 1?" in masked and "<start_of_turn>model" in masked
    assert all(lbl in (IGNORE_INDEX, t) for t, lbl in zip(ids, labels))

    pc_ids, pc_labels = tok(Example("x", "prompt_completion", prompt="The capital of Peru is", completion=" Lima."))
    n_prompt = len(tiny_tokenizer("The capital of Peru is")["input_ids"])
    assert pc_labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert pc_labels[n_prompt:] == pc_ids[n_prompt:] and pc_ids[-1] == tiny_tokenizer.eos_token_id

    full = Tokenize(tiny_tokenizer, 512, completion_only_loss=False)
    ids2, labels2 = full(ex)
    assert labels2 == ids2


def test_build_datasets_split_is_deterministic_and_truncates(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "d.jsonl", [{"text": f"sample number {i} " * (1 + i % 7)} for i in range(200)])
    train1, eval1, stats = build_datasets(str(tmp_path), tiny_tokenizer, 32, 0.1, seed=1)
    train2, eval2, _ = build_datasets(str(tmp_path), tiny_tokenizer, 32, 0.1, seed=1)
    assert eval1["input_ids"] == eval2["input_ids"] and train1["input_ids"] == train2["input_ids"]
    assert 5 <= stats.n_eval <= 40 and stats.n_train + stats.n_eval == 200
    assert max(len(x) for x in train1["input_ids"]) == 32 and stats.truncated > 0
    assert stats.summary()["truncation_rate"] == round(stats.truncated / 200, 4)
    _, eval3, _ = build_datasets(str(tmp_path), tiny_tokenizer, 32, 0.1, seed=2)
    assert eval3["input_ids"] != eval1["input_ids"]


def test_split_keeps_examples_stable_when_data_grows(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"t{i}"} for i in range(100)])
    small = load_examples(tmp_path / "a.jsonl")
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"t{i}"} for i in range(150)])
    big = load_examples(tmp_path / "a.jsonl")
    _, eval_small = split_examples(small, 0.2, 42)
    _, eval_big = split_examples(big, 0.2, 42)
    assert {e.text for e in eval_small} <= {e.text for e in eval_big}


def test_validate_data_cli_reports_counts_and_truncation(tmp_path, tiny_model_dir, capsys):
    write_jsonl(tmp_path / "chat.jsonl", [CHAT] * 4)
    write_jsonl(tmp_path / "text.jsonl", [{"text": "word " * 100}] * 2)
    assert main(["validate", str(tmp_path), "--model", str(tiny_model_dir), "--max-seq-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "chat=4" in out and "text=2" in out and "Truncated at 64 tokens: 2" in out
    assert main(["validate", str(tmp_path / "missing"), "--model", str(tiny_model_dir)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_validate_data_counts_as_the_preset_trains(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The truncation length is the preset's (tiny trains at 256, not 2048); counting with the toy tokenizer says so;
    a preset without a model asks for one."""
    monkeypatch.setenv("TINY_MODEL_DIR", str(tiny_model_dir))
    write_jsonl(tmp_path / "text.jsonl", [{"text": "word " * 400}, {"text": "word " * 10}])
    assert main(["validate", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Truncated at 256 tokens: 1 (50.0%)" in out and "built-in tiny model's" in out
    assert main(["validate", str(tmp_path), "--model", str(tiny_model_dir), "--max-seq-length", "2048"]) == 0
    out = capsys.readouterr().out
    assert "Truncated at 2048 tokens: 0" in out and "built-in tiny model's" not in out
    assert main(["validate", str(tmp_path), "--preset", "custom"]) == 2
    assert "pass --model" in capsys.readouterr().err
