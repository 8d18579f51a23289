"""Did the run get better? The held-out loss and perplexity of the base and of the adapter, and the greedy answers of
both to a few prompts, in outputs/<run>/eval.json (docs/contracts.md) and in the run report.

Usage:
    python -m training.evaluate --run NAME                    # the run's own eval split, prompts taken from it
    python -m training.evaluate --run NAME --data FILE        # every record of FILE is held-out data
    python -m training.evaluate --run NAME --prompts FILE     # prompts: one per line (blank and '#' lines skipped)

The model is the one training measured: the base in 4-bit as trained with the adapter on; the base's numbers come
from the same weights with the adapter switched off. Loss is the mean cross-entropy over the tokens training learns
(the answers, with the run's chat template and loss mask), perplexity its exponential. The run's eval split is the
same deterministic split training used (same data, eval_fraction, seed). The end of a training run writes this
automatically when the run has an eval split.

Exit status: 0 written, 2 bad input (no run, no data, no eval split), 1 a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python training/evaluate.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("training.evaluate")
DEFAULT_PROMPTS = 4  # greedy answers shown per model: a handful is enough to see the style, and cheap
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_MAX_EXAMPLES = 200  # loss over at most this many held-out examples (a large eval split would take long)


def held_out_examples(run_dir: Path, data: str | None):
    """(examples, where they came from): every record of `data`, or the run's own eval split."""
    from training.data import load_examples, split_examples
    from training.export import ExportError, read_json
    from training.runfiles import RUN_SUMMARY

    if data:
        return load_examples(data), {"source": "file", "path": data}
    cfg = read_json(run_dir / RUN_SUMMARY).get("config", {})
    path, fraction = cfg.get("data"), float(cfg.get("eval_fraction") or 0)
    if not path or fraction <= 0:
        raise ExportError(f"run '{run_dir.name}' has no eval split (eval_fraction={fraction}).\n-> pass DATA=path "
                          "(make eval) or --data PATH with held-out records")
    if not Path(path).exists():
        raise ExportError(f"the run's data {path} (run_summary.json config.data) is not there any more.\n-> run from "
                          "the folder training ran in, or pass --data PATH with held-out records")
    _, held_out = split_examples(load_examples(path), fraction, int(cfg.get("seed", 42)))
    if not held_out:
        raise ExportError(f"the eval split of {path} (eval_fraction={fraction}) is empty.\n-> pass --data PATH")
    return held_out, {"source": "eval_split", "path": path, "eval_fraction": fraction}


def read_prompts(path: str) -> list[str]:
    from training.export import ExportError

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"--prompts {path}: no such file (one prompt per line)")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ExportError(f"--prompts {path}: no prompts in it (one per line; blank and '#' lines are skipped)")
    return prompts


def conversation_prompts(examples, n: int) -> list[dict]:
    """The conversation before the last answer of the first `n` chat examples, with that answer as reference."""
    out: list[dict] = []
    for ex in examples:
        if len(out) >= n:
            break
        if ex.messages is None:
            continue
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        out.append({"messages": ex.messages[:last], "reference": ex.messages[last]["content"]})
    return out


def mean_loss(model, tokenized: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over the trained (unmasked) tokens, and how many there were."""
    import torch

    from training.data import IGNORE_INDEX

    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for ids, labels in tokenized:
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
            target = torch.tensor(labels[1:], device=device)
            keep = target != IGNORE_INDEX
            if keep.any():
                total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
                count += int(keep.sum())
    return (total / count if count else float("nan")), count


def evaluate_run(rm, examples, source: dict, prompts: list[dict], max_new_tokens: int, max_examples: int) -> dict:
    """Loss/perplexity and greedy answers of the base (adapter off) and the adapter; returns eval.json's content."""
    from training.chat import Sampling, answer_text, generate, prompt_ids
    from training.data import Tokenize
    from training.templates import end_of_turn_text

    t0 = time.time()
    tok = Tokenize(rm.tokenizer, rm.max_context)
    tokenized = [(ids[:rm.max_context], labels[:rm.max_context]) for ids, labels in map(tok, examples[:max_examples])]
    sampling = Sampling(greedy=True, max_new_tokens=max_new_tokens)
    result = {"run": rm.run_dir.name, "created": time.time(), "base": rm.base_name, "data": source,
              "examples": len(tokenized), "model": "base in 4-bit as trained; base = the same with the adapter off",
              "end_of_turn": end_of_turn_text(rm.tokenizer), "max_new_tokens": max_new_tokens}
    answers: dict[str, list[str]] = {}
    for name in ("base", "adapter"):
        with rm.model.disable_adapter() if name == "base" else contextlib.nullcontext():
            loss, tokens = mean_loss(rm.model, tokenized)
            answers[name] = []
            for p in prompts:
                new = generate(rm, prompt_ids(rm.tokenizer, p["messages"]), sampling)
                answers[name].append(answer_text(rm, new))
                p.setdefault("finished", {})[name] = bool(new) and new[-1] in rm.stop_ids
        result[name + "_loss"] = {"loss": loss, "perplexity": math.exp(loss) if loss == loss else None,
                                  "tokens": tokens}
        log.info("%s: held-out loss %.4f, perplexity %.2f over %d tokens", name, loss, math.exp(loss), tokens)
    result["prompts"] = [{"prompt": p["messages"][-1]["content"], "messages": p["messages"],
                          "reference": p.get("reference"), "base": answers["base"][i],
                          "adapter": answers["adapter"][i], "finished": p["finished"]}
                         for i, p in enumerate(prompts)]
    result["seconds"] = round(time.time() - t0, 1)
    return result


def run_eval(output_dir: Path, run: str | None, data: str | None = None, prompts_file: str | None = None,
             n_prompts: int = DEFAULT_PROMPTS, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             max_examples: int = DEFAULT_MAX_EXAMPLES) -> Path:
    """Load the run, evaluate it, write outputs/<run>/eval.json; returns its path."""
    from training.chat import load_run_model
    from training.jsonio import write_json_atomic
    from training.runfiles import EVAL

    rm = load_run_model(output_dir, run)
    examples, source = held_out_examples(rm.run_dir, data)
    if prompts_file:
        prompts = [{"messages": [{"role": "user", "content": text}]} for text in read_prompts(prompts_file)]
    else:
        prompts = conversation_prompts(examples, n_prompts)
    result = evaluate_run(rm, examples, source, prompts, max_new_tokens, max_examples)
    path = rm.run_dir / EVAL
    write_json_atomic(path, result)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run name under --output-dir (default: the newest run with an adapter)")
    p.add_argument("--output-dir", default=os.environ.get("OUTPUT_DIR", "outputs"), help="default: %(default)s")
    p.add_argument("--logs-dir", default=os.environ.get("LOGS_DIR", "logs"),
                   help="where the run's metrics are, for the report (default: %(default)s)")
    p.add_argument("--data", help="held-out records (default: the run's own eval split)")
    p.add_argument("--prompts", help="a text file of prompts, one per line (default: from the held-out data)")
    p.add_argument("--n-prompts", type=int, default=DEFAULT_PROMPTS, help="default: %(default)s")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="default: %(default)s")
    p.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES, help="default: %(default)s")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from training.console import quiet_libraries
    from training.errors import UserError
    from training.report import write_run_report
    from training.runfiles import RunPaths

    quiet_libraries()
    try:
        path = run_eval(Path(args.output_dir), args.run, args.data, args.prompts, args.n_prompts,
                        args.max_new_tokens, args.max_examples)
    except UserError as exc:  # bad data, no adapter, a model that does not load: the message says what to do
        log.error("%s", exc)
        return 2
    print(f"eval: {path}")
    paths = RunPaths.of(path.parent.name, path.parent, logs_root=args.logs_dir)
    if paths.logs_dir.is_dir():
        write_run_report(paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
