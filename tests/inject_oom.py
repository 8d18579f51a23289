"""The recipe's CLI with a CUDA out-of-memory error injected: `python tests/inject_oom.py LIMIT STEP ARGS...`.

A TrainerCallback raises torch.cuda.OutOfMemoryError (the real exception type, from inside trainer.train() where a
real one comes from) at the start of optimizer step STEP and later ones while the micro-batch is above LIMIT. There
is no GPU here: this is how the CPU tests reach the recipe's OOM handling; scripts/oom_check.py makes a real one.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from training.qlora_finetune import main  # noqa: E402


class OutOfMemoryAbove(TrainerCallback):
    def __init__(self, limit: int, step: int):
        self.limit, self.step = limit, step

    def on_step_begin(self, args, state, control, **kwargs):
        if args.per_device_train_batch_size > self.limit and state.global_step + 1 >= self.step:
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.52 GiB of which "
                "1.10 GiB is free. (injected by tests/inject_oom.py)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[3:], callbacks=[OutOfMemoryAbove(int(sys.argv[1]), int(sys.argv[2]))]))
