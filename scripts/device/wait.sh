#!/usr/bin/env bash
# Follow the detached driver (scripts/device/bench_driver.sh), and a run queued behind it (queue.sh), for up to $1
# seconds, copying what they have written into $OUT every few seconds (a call cut by its time limit still brings
# back the rows done so far).
end=$((SECONDS + ${1:-540}))
bring_back() {
  cp -r /tmp/bench-out/. "$OUT"/ 2>/dev/null
  for d in /tmp/bench-out.*; do [ -d "$d" ] && cp -r "$d" "$OUT"/; done 2>/dev/null
}
while [ $SECONDS -lt $end ]; do
  bring_back
  grep -q "all done" /tmp/bench-out/progress.txt 2>/dev/null && [ ! -e /tmp/queue.pending ] && break
  sleep 8
done
cat /tmp/bench-out.*/progress.txt /tmp/bench-out/progress.txt 2>/dev/null
grep -h "^== \|failed" /tmp/bench-out/bench.log 2>/dev/null | tail -20
grep -h "^RESULT" /tmp/bench-out/flex.log 2>/dev/null | cut -c1-300
grep -h "^RESULT\|^gpu" /tmp/bench-out/fa4.log 2>/dev/null | cut -c1-400
tail -c 1500 /tmp/bench-out/oom.log 2>/dev/null
bring_back; true
