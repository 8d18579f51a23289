"""The export's two ways to fail: bad input (exit 2) and a check the exported model did not pass (exit 3)."""

from __future__ import annotations

from training.errors import UserError


class ExportError(UserError):
    """Bad input or an unfit machine: the message says what, where and what to do. Exit 2, no traceback."""


class CheckFailed(Exception):
    """The exported model does not say what the trained one says. Exit 3; nothing is left in the GGUF folder."""
