"""Talk to a trained run: its adapter on its base, with the run's own chat template, tokens streamed as they come.

Usage:
    python -m training.chat --run NAME                       # interactive: /reset forgets, /exit or Ctrl-D ends
    python -m training.chat --run NAME --prompt "Hi" --greedy  # one answer on stdout, then exit (for scripts)
    python -m training.chat --run NAME --merged              # adapter merged into the base in 16/32-bit, not 4-bit

Everything comes from the run folder: run_summary.json names the base model and its settings, adapter/ holds the
adapter and the tokenizer with the chat template it was trained with. The default loads the base in 4-bit as it was
trained (what the training's eval loss measured); --merged loads it in its own precision (bf16 on a GPU, float32 on
the CPU) and merges the adapter, as the export does. The history is cut, oldest turns first, to the context length
the run trained on (--max-context). Sampling by default (temperature 0.7, top-p 0.9); --greedy for reproducible
answers.

Exit status: 0 done, 2 bad input (no such run, the base missing or not the one trained on), 1 a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python training/chat.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("training.chat")


@dataclass
class RunModel:
    """A run's adapter on its base, ready to generate."""

    model: object  # a PeftModel (adapter on the base) or, with merged=True, the merged model
    tokenizer: object
    run_dir: Path
    base_name: str
    max_context: int  # tokens: the run's max_seq_length
    stop_ids: list[int]
    adapter_on: bool = True  # False: the base alone (the adapter switched off), to compare

    @property
    def device(self):
        return next(self.model.parameters()).device


def generation_attention(trained: str, cuda: bool) -> str:
    """The attention to generate with: the run's own, except where it was a training choice that does not carry over.
    On the CPU eager (flex compiles for minutes there; sdpa would drop Gemma-2's soft-cap). FlashAttention 4 -> flex:
    its self-checks cover training's path (packed rows, no KV cache), not generation with a cache, and the recipe
    drops a sliding window that its samples cannot outgrow (training/backends.py), which a long conversation can;
    nor does this card need to have it."""
    if not cuda:
        return "eager"
    return "flex_attention" if trained == "flash_attention_4" else trained


def load_run_model(output_dir: Path, run: str | None, merged: bool = False, base: str | None = None) -> RunModel:
    """The run's base (4-bit as trained, or its own precision + merged adapter) with the adapter and tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from training.export import ExportError, find_run, read_json, resolve_base
    from training.runfiles import ADAPTER_DIR, RUN_SUMMARY
    from training.templates import stop_token_ids

    run_dir = find_run(output_dir, run, verb="chat")
    base_name, base_path = resolve_base(run_dir, base, allow_other_base=False)
    cfg = read_json(run_dir / RUN_SUMMARY).get("config", {})
    adapter_dir = run_dir / ADAPTER_DIR
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    if not tokenizer.chat_template:
        from training.templates import missing_template_message

        raise ExportError(f"{adapter_dir}: {missing_template_message(base_name)}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cuda = torch.cuda.is_available()
    dtype = (torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    kwargs = dict(dtype=dtype, attn_implementation=generation_attention(cfg.get("attn_implementation", "eager"), cuda),
                  device_map={"": 0 if cuda else "cpu"})
    if not merged:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.get("bnb_4bit_quant_type", "nf4"),
            bnb_4bit_use_double_quant=cfg.get("bnb_4bit_use_double_quant", True), bnb_4bit_compute_dtype=dtype)
    log.info("loading %s (%s) with the adapter of %s%s", base_name, base_path, run_dir.name,
             ", merged" if merged else ", base in 4-bit as trained")
    model = AutoModelForCausalLM.from_pretrained(str(base_path), **kwargs)
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ExportError(f"the adapter in {adapter_dir} does not fit the base {base_path}: "
                          f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}") \
            from None
    if merged:
        model = model.merge_and_unload()
    model.eval()
    return RunModel(model, tokenizer, run_dir, base_name, int(cfg.get("max_seq_length") or 2048),
                    stop_token_ids(tokenizer))


def fit_history(tokenizer, history: list[dict[str, str]], budget: int) -> tuple[list[dict[str, str]], list[int]]:
    """Prompt ids for the conversation, dropping the oldest user/assistant pairs until it fits `budget` tokens
    (a leading system message and the newest user turn are always kept)."""
    system = history[:1] if history and history[0]["role"] == "system" else []
    turns = history[len(system):]
    while True:
        kept = system + turns
        ids = prompt_ids(tokenizer, kept)
        if len(ids) <= budget or len(turns) <= 1:
            return kept, ids[-budget:] if len(ids) > budget else ids
        turns = turns[2:]


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The conversation as the run's template writes it before an answer (a system message folded into the first
    user turn for a template without a system role, as in training)."""
    from training.data import fold_system_message, supports_system_role

    if messages and messages[0]["role"] == "system" and not supports_system_role(tokenizer):
        messages = fold_system_message(messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Sampling:
    greedy: bool = False
    temperature: float = 0.7  # below 1: fewer unlikely words, still varied
    top_p: float = 0.9  # nucleus sampling: drop the long tail of the distribution
    top_k: int = 50
    repetition_penalty: float = 1.0  # >1 discourages loops in small models
    max_new_tokens: int = 256

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens,
                    "repetition_penalty": self.repetition_penalty}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty, "max_new_tokens": self.max_new_tokens}


def generate(rm: RunModel, ids: list[int], sampling: Sampling, streamer=None) -> list[int]:
    """New token ids after the prompt (ending with the end-of-turn token when the model finished its answer)."""
    import torch

    input_ids = torch.tensor([ids], device=rm.device)
    with torch.inference_mode(), rm.model.disable_adapter() if not rm.adapter_on else contextlib.nullcontext():
        out = rm.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                eos_token_id=rm.stop_ids, pad_token_id=rm.tokenizer.pad_token_id, streamer=streamer,
                                **sampling.generate_kwargs())
    return out[0, len(ids):].tolist()


def answer_text(rm: RunModel, new: list[int]) -> str:
    """The answer as text: without the end-of-turn token (Gemma's <end_of_turn> is not a 'special' token to
    transformers, so skip_special_tokens alone would print it)."""
    return rm.tokenizer.decode([t for t in new if t not in rm.stop_ids], skip_special_tokens=True)


class AnswerStreamer:
    """transformers' TextStreamer (prints words as they are decoded), minus the end-of-turn tokens."""

    def __init__(self, rm: RunModel):
        from transformers import TextStreamer

        self.stop = rm.stop_ids
        self.inner = TextStreamer(rm.tokenizer, skip_prompt=True, skip_special_tokens=True)

    def put(self, value):
        import torch

        if self.inner.next_tokens_are_prompt:  # the prompt: TextStreamer skips it
            return self.inner.put(value)
        keep = [t for t in value.reshape(-1).tolist() if t not in self.stop]
        if keep:
            self.inner.put(torch.tensor(keep))

    def end(self):
        self.inner.end()


def answer(rm: RunModel, history: list[dict[str, str]], sampling: Sampling, stream: bool = True,
           prefix: str = "") -> tuple[str, list[dict[str, str]]]:
    """Generate the assistant's reply to `history` (streamed to stdout after `prefix`); returns it and the history
    it saw."""
    budget = max(rm.max_context - sampling.max_new_tokens, 16)
    kept, ids = fit_history(rm.tokenizer, history, budget)
    if len(kept) < len(history):
        log.info("history cut to the last %d message(s): %d tokens of context, %d of them for the answer "
                 "(--max-context / --max-new-tokens)", len(kept), rm.max_context, sampling.max_new_tokens)
    if stream and prefix:
        print(prefix, end="", flush=True)
    new = generate(rm, ids, sampling, AnswerStreamer(rm) if stream else None)
    return answer_text(rm, new), kept


def repl(rm: RunModel, sampling: Sampling, system: str | None = None) -> int:
    """Read a line, answer it, repeat. /reset forgets the conversation, /exit (or Ctrl-D) ends, Ctrl-C stops an
    answer."""
    who = f"run '{rm.run_dir.name}'" if rm.adapter_on else f"the base of run '{rm.run_dir.name}' (no adapter)"
    print(f"Chatting with {who} (base {rm.base_name}). /reset clears the history, /exit or Ctrl-D "
          "quits, Ctrl-C stops an answer.", flush=True)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            history = list(start)
            print("(history cleared)", flush=True)
            continue
        history.append({"role": "user", "content": text})
        try:
            reply, history = answer(rm, history, sampling, prefix="bot> ")
        except KeyboardInterrupt:
            print("\n(stopped)", flush=True)
            history.pop()
            continue
        history = history + [{"role": "assistant", "content": reply}]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.chat", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run name under --output-dir (default: the newest run with an adapter)")
    p.add_argument("--output-dir", default=os.environ.get("OUTPUT_DIR", "outputs"), help="default: %(default)s")
    p.add_argument("--prompt", help="answer this once on stdout and exit (no REPL)")
    p.add_argument("--system", help="a system message (Gemma, which has none, gets it in the first user turn)")
    p.add_argument("--merged", action="store_true", help="merge the adapter into the base in its own precision "
                                                         "(bf16 on a GPU) instead of the 4-bit base as trained")
    p.add_argument("--base", help="base model id or folder (default: the one the run was trained on)")
    p.add_argument("--base-only", action="store_true", help="the base without the adapter, to compare answers")
    d = Sampling()
    p.add_argument("--greedy", action="store_true", help="always the most likely token: reproducible answers")
    p.add_argument("--temperature", type=float, default=d.temperature, help="default: %(default)s")
    p.add_argument("--top-p", type=float, default=d.top_p, help="default: %(default)s")
    p.add_argument("--top-k", type=int, default=d.top_k, help="default: %(default)s")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty, help="default: %(default)s")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="default: %(default)s")
    p.add_argument("--max-context", type=int, help="tokens of history kept (default: the run's max_seq_length)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    bad = [f"--{k.replace('_', '-')} {v}" for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                                         ("max_new_tokens", args.max_new_tokens)) if v <= 0]
    if args.base_only and args.merged:
        print("error: --base-only and --merged exclude each other (a merged model has no adapter to switch off)",
              file=sys.stderr)
        return 2
    if bad or not 0 < args.top_p <= 1:
        print(f"error: {', '.join(bad) or f'--top-p {args.top_p}'}: must be > 0 (--top-p at most 1)", file=sys.stderr)
        return 2
    from training.export import ExportError
    from training.model import ModelLoadError
    from training.console import quiet_libraries

    quiet_libraries()
    try:
        rm = load_run_model(Path(args.output_dir), args.run, merged=args.merged, base=args.base)
    except (ExportError, ModelLoadError) as exc:
        log.error("%s", exc)
        return 2
    if args.max_context:
        rm.max_context = args.max_context
    rm.adapter_on = not args.base_only
    from transformers import set_seed

    set_seed(args.seed)
    sampling = Sampling(greedy=args.greedy, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        answer(rm, system + [{"role": "user", "content": args.prompt}], sampling)
        return 0
    return repl(rm, sampling, args.system)


if __name__ == "__main__":
    sys.exit(main())
