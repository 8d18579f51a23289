"""The sidecars' stop flag: SIGTERM during a tight wait loop always ends the process (no lock in the handler)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# wait(0) keeps the main thread inside the flag's wait() nearly all the time. With threading.Event this loop hangs
# on SIGTERM in about half the runs: the handler's set() blocks on the lock that wait() holds (measured: 35 of 60).
LOOP = ("import sys; from training.stop_signal import StopSignal; stop = StopSignal().install(); "
        "print('ready', flush=True)\n"
        "while not stop.wait(0): pass\n"
        "sys.exit(128 + stop.signum)")


def test_sigterm_inside_wait_always_ends_the_loop():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for attempt in range(20):
        proc = subprocess.Popen([sys.executable, "-c", LOOP], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"attempt {attempt}: SIGTERM did not end the wait loop within 5 s (a handler "
                                 "blocked on a lock?)")
        assert rc == 128 + signal.SIGTERM


def test_wait_times_out_unset_and_wakes_at_once_when_set_from_a_thread():
    import threading

    from training.stop_signal import StopSignal

    stop = StopSignal()
    started = time.monotonic()
    assert stop.wait(0.05) is False and time.monotonic() - started >= 0.04
    threading.Timer(0.05, stop.set).start()
    started = time.monotonic()
    assert stop.wait(10) is True
    assert time.monotonic() - started < 5
    assert stop() and stop.is_set()
    stop.close()
