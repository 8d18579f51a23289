#!/usr/bin/env bash
# Build build/site.tgz: the wheels the GPU device lacks (see ../shared/docs/ENVIRONMENT.md), unpacked into one
# folder and packed as one tarball to carry (scripts/device/bench_driver.sh unpacks it to /tmp/site).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d)
cd "$WORK"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d whl \
  bitsandbytes==0.50.2 trl==1.15.0 datasets==4.8.5 dill multiprocess xxhash liger-kernel==0.8.5 \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 torchao cut_cross_entropy tyro docstring_parser shtab typeguard \
  msgspec hf_transfer json5 nest-asyncio structlog
for w in whl/*.whl; do unzip -q -o "$w" -d site; done
rm -f site/bitsandbytes/libbitsandbytes_cuda1{18,21,24,26,28,32}.so site/bitsandbytes/libbitsandbytes_rocm*.so
rm -rf site/studio
mkdir -p "$REPO/build"
tar -czf "$REPO/build/site.tgz" site
ls -la "$REPO/build/site.tgz"
rm -rf "$WORK"
