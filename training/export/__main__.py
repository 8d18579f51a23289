"""`python -m training.export ...`: the export's command line (training/export/cli.py)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python training/export`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.export.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
