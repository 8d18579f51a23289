#!/usr/bin/env bash
# On the device (one call, carrying build/site.tgz): the default path's packed chat row (flex attention) twice, with
# the caching allocator's defaults and with expandable segments (the GPU image's setting), results in $OUT.
# 2026-12-06: 30,049 against 30,020 tokens/s: the allocator setting changed nothing there. The same row ran 17,982 in
# a driver call of the next lease (docs/benchmarks.md, third lease): what made the difference is not isolated yet.
set -u
bash scripts/device/unpack.sh >/dev/null
export PYTHONPATH=/tmp/site:$PWD UNSLOTH_COMPILE_DISABLE=1 TOKENIZERS_PARALLELISM=false QLORA_BENCH_PROJECT_SITE=/tmp/site-project
python scripts/benchmark.py --variants project-2b-chat-flex --steps 6 --warmup 2 --out $OUT/a.md --json-out $OUT/plain.json > $OUT/plain.log 2>&1
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python scripts/benchmark.py --variants project-2b-chat-flex --steps 6 --warmup 2 --out $OUT/b.md --json-out $OUT/expandable.json > $OUT/exp.log 2>&1
python -c "
import json
for f in ('plain','expandable'):
    for r in json.load(open('$OUT/'+f+'.json')): print(f, r.get('tokens_per_s'), r.get('real_tokens_per_s'), r.get('peak_gib'), r.get('step_times'), r.get('error'))
"
