#!/usr/bin/env bash
# Several GPUs, measured through the product's own launch path (`make train-native GPUS=N`, i.e. accelerate launch):
#   1. the tiny preset on N GPUs (NCCL DDP), end to end;
#   2. the gemma-2b preset on a random-init Gemma-2-2B-shape model (no download), 1 GPU then N GPUs, same tokens
#      per optimizer step, sequences of 2048 tokens: throughput scaling from metrics.jsonl (median of steps >= 3).
#   3. with FSDP_SHAPE=9b: the gemma-9b preset on a 9B-shape model sharded over the N GPUs (FSDP=1); not run yet.
# Needs N CUDA GPUs and the package importable by python3 (PYTHONPATH or an installed venv: VENV_PYTHON).
# Usage: GPUS=2 STEPS=6 OUT=/tmp/multi_gpu bash scripts/multi_gpu_check.sh     (results in $OUT/summary.txt)
# SCALE_PRESET=tiny SCALE_MODEL= runs part 2 on the tiny model (a dry run of this script on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-2}; STEPS=${STEPS:-6}; OUT=${OUT:-/tmp/multi_gpu}; ROOT=${ROOT:-/tmp/multi_gpu_work}
SCALE_PRESET=${SCALE_PRESET:-gemma-2b}; SCALE_MODEL=${SCALE_MODEL-$ROOT/gemma2-2b}
PY=${VENV_PYTHON:-$(command -v python3)}
mkdir -p "$OUT" "$ROOT/venv/bin"
# The Makefile runs $(VENV)/bin/python and $(VENV)/bin/accelerate: point a venv-shaped folder at this interpreter.
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" >"$ROOT/venv/bin/python" && chmod +x "$ROOT/venv/bin/python"  # a link would lose the venv
ln -sf "$(dirname "$PY")/accelerate" "$ROOT/venv/bin/accelerate"
touch "$ROOT/venv/.installed"
MAKE_RUN=(make --no-print-directory VENV="$ROOT/venv")
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
summary "# multi-GPU check $(date -u +%FT%TZ): GPUS=$GPUS STEPS=$STEPS; $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c | xargs)"

# 1. tiny preset on N GPUs ------------------------------------------------------------------------------------
"${MAKE_RUN[@]}" train-native PRESET=tiny GPUS="$GPUS" RUN=ddp-tiny \
  ARGS="--max-steps 30 --resume never --output-dir $ROOT/outputs/ddp-tiny --logs-dir $ROOT/logs" \
  >"$OUT/ddp-tiny.log" 2>&1
summary "ddp-tiny: rc=$? $("$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); print('steps', s['steps'], 'processes', s['processes'], 'loss', s['train_loss_first'], '->', s['train_loss_last'], 'adapter', s['adapter_dir'])" "$ROOT/outputs/ddp-tiny/run_summary.json" 2>&1)"

# 2. scaling: 1 GPU vs N GPUs, same global batch --------------------------------------------------------------
"$PY" - "$ROOT" "$SCALE_MODEL" <<'EOF' >>"$OUT/prepare.log" 2>&1 || summary "prepare failed: see prepare.log"
import json, random, sys
from pathlib import Path
sys.path.insert(0, "scripts")
root, model = Path(sys.argv[1]), sys.argv[2]
if model:
    from benchmark import model_dir
    print("model:", model_dir("2b", root))
words = [w.strip() for w in Path("datasets/sample/chat.jsonl").read_text().split() if w.isalpha()] or ["token"]
rng = random.Random(0)
with open(root / "long.jsonl", "w") as f:  # long records: every sequence is truncated at max_seq_length
    for _ in range(400):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(3000))}) + "\n")
print("data:", root / "long.jsonl")
EOF
report() {  # $1: run name; tokens/s (median of steps >= 3) and the loss curve from its metrics.jsonl
  "$PY" - "$ROOT/logs/$1/metrics.jsonl" <<'EOF' 2>&1
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [r for r in recs if "loss" in r and "event" not in r and r["step"] >= 3 and r.get("tokens_per_s")]
start = next((r for r in recs if r.get("event") == "start"), {})
print(f"processes {start.get('processes')} global_batch {start.get('global_batch')} "
      f"tokens_per_s_median {statistics.median(r['tokens_per_s'] for r in steps):.0f} over {len(steps)} steps; "
      f"loss {[round(r['loss'], 4) for r in recs if 'loss' in r and 'event' not in r]}")
EOF
}
COMMON_ARGS="--resume never --set backend=hf --set eval_fraction=0 --set save_steps=100000 --set logging_steps=1"
for n in 1 "$GPUS"; do
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) "${MAKE_RUN[@]}" train-native PRESET="$SCALE_PRESET" GPUS="$n" \
    RUN="scale-$n" MODEL="$SCALE_MODEL" DATA="$ROOT/long.jsonl" \
    ARGS="--max-steps $STEPS $COMMON_ARGS --output-dir $ROOT/outputs/scale-$n --logs-dir $ROOT/logs" \
    >"$OUT/scale-$n.log" 2>&1
  rc=$?
  summary "scale-$n: rc=$rc $(report "scale-$n")"
  grep -h "planner\|processes (DDP)\|INFO backend " "$OUT/scale-$n.log" | head -3 | sed "s/^/  scale-$n | /" | tee -a "$OUT/summary.txt"
done

# 3. FSDP (optional): the gemma-9b preset on a model of FSDP_SHAPE, sharded over the N GPUs ----------------------
if [ -n "${FSDP_SHAPE:-}" ]; then
  "$PY" -c "import sys; sys.path.insert(0, 'scripts'); from benchmark import model_dir; from pathlib import Path; \
print('model:', model_dir('$FSDP_SHAPE', Path('$ROOT')))" >>"$OUT/prepare.log" 2>&1 || summary "FSDP model failed: prepare.log"
  "${MAKE_RUN[@]}" train-native PRESET=gemma-9b GPUS="$GPUS" FSDP=1 RUN="fsdp-$GPUS" MODEL="$ROOT/gemma2-$FSDP_SHAPE" \
    DATA="$ROOT/long.jsonl" ARGS="--max-steps $STEPS $COMMON_ARGS --output-dir $ROOT/outputs/fsdp-$GPUS --logs-dir $ROOT/logs" \
    >"$OUT/fsdp-$GPUS.log" 2>&1
  rc=$?
  summary "fsdp-$GPUS ($FSDP_SHAPE): rc=$rc $(report "fsdp-$GPUS"); adapter: $(ls "$ROOT/outputs/fsdp-$GPUS/adapter" 2>&1 | xargs)"
fi
