"""What a person sees: log lines on stderr and in train.log, quiet libraries, durations as h:mm:ss."""

from __future__ import annotations

import logging
import math
import sys
import warnings
from pathlib import Path


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def rough_duration(seconds: float) -> str:
    """An estimate in words: 'under 1 s', '40 s', '12 minutes', '3.5 hours'."""
    if seconds < 1:
        return "under 1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"


def setup_logging(log_file: Path | None, rank: int = 0) -> None:
    """Plain lines to stderr (and so to the container log) and to logs/<run>/train.log.

    The other ranks of a several-process run (rank > 0, log_file None) print only warnings and errors, prefixed
    with their rank: rank 0 tells the story once."""
    prefix = f"[rank {rank}] " if rank else ""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    stream = logging.StreamHandler(sys.stderr)
    for h in (stream, *handlers):
        h.setFormatter(fmt)
    root = logging.getLogger("training")
    root.setLevel(logging.WARNING if rank else logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(stream)
    for h in handlers:
        root.addHandler(h)
    root.propagate = False
    file_only = logging.getLogger("training.file")  # progress lines a tqdm bar already shows on the terminal
    file_only.setLevel(logging.INFO)
    for h in list(file_only.handlers):
        file_only.removeHandler(h)
    for h in handlers:
        file_only.addHandler(h)
    file_only.propagate = False


def quiet_libraries() -> None:
    """Deprecation chatter from the libraries is not the user's business; progress bars only on a terminal."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*kernels-community.*")
    # bitsandbytes on CPUs with AVX512-BF16 tries a hub kernel at import and logs how to "fix" the refusal; its own
    # CPU kernel runs instead, and nothing needs doing. (Before bitsandbytes is imported: it logs at import.)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "kernels-community" not in r.getMessage())
    if not sys.stderr.isatty():
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
