#!/usr/bin/env bash
# Queue a second driver run behind the one running now, so the card never idles between them:
#   VARIANTS=... setsid nohup bash scripts/device/queue.sh > /tmp/queue.log 2>&1 < /dev/null &
# Waits until /tmp/bench-out/progress.txt says "all done", moves /tmp/bench-out to /tmp/bench-out.<n> (wait.sh brings
# those back too), then runs scripts/device/bench_driver.sh with the same environment.
SRC=$(cd "$(dirname "$0")/../.." && pwd)
touch /tmp/queue.pending  # wait.sh keeps following while this exists
while [ -d /tmp/bench-out ] && ! grep -q "all done" /tmp/bench-out/progress.txt 2>/dev/null; do sleep 3; done
n=1; while [ -e /tmp/bench-out.$n ]; do n=$((n + 1)); done
[ -d /tmp/bench-out ] && mv /tmp/bench-out /tmp/bench-out.$n
rm -f /tmp/queue.pending
exec bash "$SRC/scripts/device/bench_driver.sh"
