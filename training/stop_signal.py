"""A stop flag that a signal handler may set: SIGTERM/SIGINT for the sidecars' sleep loops.

`threading.Event` is not safe here. Its `set()` takes the lock that `wait()` holds between waking up and
returning, and a signal handler runs in the main thread between two bytecodes, possibly inside that `wait()`:
the handler then blocks on a lock its own thread holds, and `docker stop` ends in a SIGKILL ten seconds later.
This flag takes no lock: the handler sets a plain attribute and writes one byte to a pipe, and `wait()` sleeps
in `select()` on the pipe's other end, so a signal wakes it at once.
"""

from __future__ import annotations

import os
import select
import signal
from typing import Any


class StopSignal:
    """Set by SIGTERM/SIGINT (after `install()`) or by `set()` from any thread; `wait(t)` sleeps up to t seconds."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._set = False
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    def install(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> "StopSignal":
        for sig in signals:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self.set()

    def set(self) -> None:
        self._set = True
        try:
            os.write(self._write_fd, b"x")
        except BlockingIOError:  # the pipe is full of earlier wake-ups: the waiter will wake anyway
            pass

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Sleep until set or `timeout` seconds passed; True when set."""
        if not self._set and timeout > 0:
            select.select([self._read_fd], [], [], timeout)
        return self._set

    def __call__(self) -> bool:
        return self._set

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
