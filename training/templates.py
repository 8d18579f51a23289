"""Chat templates per model family: which template a run uses, where an assistant turn ends, and the Ollama
template that says the same thing.

A tokenizer that has its own chat template keeps it (Gemma's `<start_of_turn>`, SmolLM2's ChatML `<|im_start|>`, ...).
One without is refused with the fix (`--set chat_template=path/to/template.jinja`): a template from another family
would teach the model turn markers it never saw. The training loss mask (training/data.py), the tokens that end a
generated answer (training/chat.py, training/evaluate.py) and the Ollama Modelfile (training/export/modelfile.py) all follow
the template the run was trained with, which the adapter folder carries.
"""

from __future__ import annotations

import re
from pathlib import Path

from training.qlora_config import ConfigError

# Gemma-2's chat template (it has no system role: training/data.py folds system text into the first user turn).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

PROBE_ANSWER = "PROBE-ANSWER-7f3a"  # a string no template writes by itself

# Ollama Go templates per family. Gemma has no system role: a system message joins the first user turn, as in
# training (training/data.py folds it the same way).
OLLAMA_TEMPLATES = {
    "gemma": """{{- $system := .System }}{{- $first := true }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}<start_of_turn>user
{{ if and $first $system }}{{ $system }}

{{ end }}{{ $first = false }}{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}""",
    "chatml": """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}""",
}
OLLAMA_STOPS = {"gemma": ("<end_of_turn>", "<start_of_turn>"), "chatml": ("<|im_end|>", "<|im_start|>")}


def missing_template_message(model: str) -> str:
    return (f"the tokenizer of '{model}' has no chat template, so conversations cannot be formatted the way this "
            "model expects.\n-> give it one: --set chat_template=path/to/template.jinja (the Jinja template from the "
            "model's own tokenizer_config.json or chat_template.jinja, e.g. of its instruct version), or train on "
            "'text' / 'prompt'+'completion' records, which need none")


def apply_chat_template_file(tokenizer, path: str) -> None:
    """`--set chat_template=PATH`: the template in that file replaces the tokenizer's own."""
    if not path:
        return
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"chat_template={path}: no such file; give the path of a Jinja chat template "
                          "(e.g. a chat_template.jinja copied from the model's repository)")
    tokenizer.chat_template = p.read_text(encoding="utf-8")
    try:
        render(tokenizer, [{"role": "user", "content": "u"}], generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - jinja raises many kinds; all mean a broken template file
        raise ConfigError(f"chat_template={path}: the template does not render a one-turn conversation: {exc}") \
            from None


def render(tokenizer, messages, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def end_of_turn_text(tokenizer) -> str:
    """What the template writes right after an assistant answer, up to the first whitespace ('<|im_end|>',
    '<end_of_turn>'): the text the model learns to emit when it is done."""
    conv = [{"role": "user", "content": "u"}, {"role": "assistant", "content": PROBE_ANSWER}]
    text = render(tokenizer, conv)
    after = text[text.rindex(PROBE_ANSWER) + len(PROBE_ANSWER):]
    return after.strip().split()[0] if after.strip() else ""


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a generated answer: the template's end-of-turn token and the tokenizer's eos."""
    ids = []
    eot = end_of_turn_text(tokenizer)
    if eot:
        tok_id = tokenizer.convert_tokens_to_ids(eot)
        if isinstance(tok_id, int) and tok_id != tokenizer.unk_token_id:
            ids.append(tok_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def family(tokenizer) -> str | None:
    """'chatml', 'gemma', or None for a template this project has no Ollama twin of."""
    text = render(tokenizer, [{"role": "user", "content": "u"}], generation_prompt=True)
    if "<|im_start|>" in text:
        return "chatml"
    if "<start_of_turn>" in text:
        return "gemma"
    return None


def default_system_prompt(tokenizer) -> str | None:
    """The system text a ChatML template adds when a conversation has none (SmolLM2's 'You are a helpful AI
    assistant named SmolLM...'), so that Ollama says the same without being told."""
    text = render(tokenizer, [{"role": "user", "content": "u"}], generation_prompt=True)
    m = re.match(r"\s*<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return m.group(1) if m else None
