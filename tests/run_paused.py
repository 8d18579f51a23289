"""The recipe's CLI with a test pause: `python tests/run_paused.py POINT@STEP:SECONDS ARGS...`.

The trainer's CheckpointCallback pauses once at POINT (step | eval | save | final) of STEP for SECONDS and drops
`.test-paused-POINT-STEP` in the run folder, so that a test can send a signal or fill the disk right there
(training/checkpoint_callback.py, PauseAt). The pause is given to the callback's constructor; production code reads
no test switch.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.checkpoint_callback import PauseAt  # noqa: E402
from training.qlora_finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[2:], pause=PauseAt.parse(sys.argv[1])))
