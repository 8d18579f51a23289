#!/usr/bin/env bash
# Follow the detached driver (scripts/device/bench_driver.sh) for up to $1 seconds, copying what it has written into
# $OUT every few seconds, and a run queued behind it (queue.sh) too (a call cut by its time limit still brings back the rows done so far).
end=$((SECONDS + ${1:-540}))
while [ $SECONDS -lt $end ]; do
  cp -r /tmp/bench-out/. "$OUT"/ 2>/dev/null
  grep -q "all done" /tmp/bench-out/progress.txt 2>/dev/null && [ ! -e /tmp/queue.pending ] && break
  sleep 8
done
cat /tmp/bench-out/progress.txt
grep -h "^== \|failed" /tmp/bench-out/bench.log 2>/dev/null | tail -20
grep -h "^RESULT" /tmp/bench-out/flex.log 2>/dev/null | cut -c1-300
grep -h "^RESULT\|^gpu" /tmp/bench-out/fa4.log 2>/dev/null | cut -c1-400
tail -c 1500 /tmp/bench-out/oom.log 2>/dev/null
cp -r /tmp/bench-out/. "$OUT"/ 2>/dev/null
for d in /tmp/bench-out.*; do [ -d "$d" ] && cp -r "$d" "$OUT"/ && cat "$d/progress.txt"; done 2>/dev/null; true
