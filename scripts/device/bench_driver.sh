#!/usr/bin/env bash
# Usage on the device machine (from the repository root, with build/site.tgz carried: the wheels it lacks, see
# ../shared/docs/ENVIRONMENT.md): setsid nohup bash scripts/device/bench_driver.sh &  then  bash scripts/device/wait.sh 540
# Detached GPU driver: a smoke run, then the benchmark of record, then a real CUDA OOM through the recipe, from a
# frozen copy of the repo (later calls re-lay the working tree). VARIANTS= and STEPS= choose the rows;
# SKIP_SMOKE=1 skips the smoke run, SKIP_OOM=1 the OOM check, SKIP_BENCH=1 the benchmark; EXPLORE_FLEX=1 first
# runs scripts/device/explore_flex.py (flex attention's kernel options and autotuning; FLEX_ROWS= picks rows,
# FLEX_PROFILE= the rows to profile one step of); EXPLORE_FA4=1 first runs scripts/device/explore_fa4.py
# (FlashAttention 4 against flex and sdpa: exactness and kernel speed; FA4_ONLY_ROWS=exact,speed,selfcheck,paths,shapes;
# it runs the project's trl, as the recipe's self-check does).
set -u
SRC=$(cd "$(dirname "$0")/../.." && pwd)
rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/bench-out && cp -r "$SRC"/training "$SRC"/scripts "$SRC"/datasets "$SRC"/pyproject.toml /tmp/repo/
bash "$SRC/scripts/device/unpack.sh"
export PYTHONPATH=$(bash "$SRC/scripts/device/unpack.sh" --path):/tmp/repo UNSLOTH_COMPILE_DISABLE=1 TOKENIZERS_PARALLELISM=false
export QLORA_BENCH_PROJECT_SITE=/tmp/site-project  # the project's rows run the trl the default GPU image installs
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1  # FA4's compiled kernels are shared by the benchmark's processes
cd /tmp/repo
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > /tmp/bench-out/gpu.txt
rc=0
if [ -z "${SKIP_SMOKE:-}" ]; then
  echo "smoke $(date -u +%T)" >> /tmp/bench-out/progress.txt
  python scripts/benchmark.py --variants project-2b --steps 1 --warmup 1 \
    --out /tmp/bench-out/smoke.md --json-out /tmp/bench-out/smoke.json > /tmp/bench-out/smoke.log 2>&1 || rc=$?
  echo "smoke rc=$rc $(date -u +%T)" >> /tmp/bench-out/progress.txt
fi
if [ $rc != 0 ] || [ -f /tmp/bench-out/STOP ]; then echo "all done (smoke failed) $(date -u +%T)" >> /tmp/bench-out/progress.txt; exit 0; fi
echo "gated $(date -u +%T)" >> /tmp/bench-out/progress.txt  # the MLP's Triton kernels against PyTorch (seconds)
python -m training.gated_act --check > /tmp/bench-out/gated.log 2>&1
echo "gated rc=$? $(date -u +%T)" >> /tmp/bench-out/progress.txt
if [ -n "${EXPLORE_FA4:-}" ]; then
  echo "fa4 $(date -u +%T)" >> /tmp/bench-out/progress.txt
  PYTHONPATH=$QLORA_BENCH_PROJECT_SITE:$PYTHONPATH timeout 540 python scripts/device/explore_fa4.py ${FA4_ONLY_ROWS:+--only "$FA4_ONLY_ROWS"} > /tmp/bench-out/fa4.log 2>&1
  echo "fa4 rc=$? $(date -u +%T)" >> /tmp/bench-out/progress.txt
fi
if [ -n "${EXPLORE_FLEX:-}" ]; then
  echo "flex $(date -u +%T)" >> /tmp/bench-out/progress.txt
  timeout 900 python scripts/device/explore_flex.py ${FLEX_ROWS:+--only "$FLEX_ROWS"} ${FLEX_PROFILE:+--profile "$FLEX_PROFILE"} > /tmp/bench-out/flex.log 2>&1
  echo "flex rc=$? $(date -u +%T)" >> /tmp/bench-out/progress.txt
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  python scripts/benchmark.py ${VARIANTS:+--variants "$VARIANTS"} --steps "${STEPS:-6}" --warmup 2 --out /tmp/bench-out/benchmarks.md \
    --json-out /tmp/bench-out/results.json --variant-timeout 420 > /tmp/bench-out/bench.log 2>&1
  echo "bench rc=$? $(date -u +%T)" >> /tmp/bench-out/progress.txt
fi
if [ -z "${SKIP_OOM:-}" ]; then
  echo "oom $(date -u +%T)" >> /tmp/bench-out/progress.txt
  timeout 300 python scripts/oom_check.py --root /tmp/oom_check > /tmp/bench-out/oom.log 2>&1
  echo "oom rc=$? $(date -u +%T)" >> /tmp/bench-out/progress.txt
fi
echo "all done $(date -u +%T)" >> /tmp/bench-out/progress.txt
