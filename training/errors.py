"""The one base class for errors that are the user's to fix.

An entry point catches `UserError`, prints its message (what, where, how to fix) and exits with status 2, without
a traceback. Anything else is a bug or a fault of the machine: exit 1 with the traceback in the log.
"""


class UserError(Exception):
    """A bad input, setting, file or resource limit that the message tells the user how to fix (exit 2)."""
