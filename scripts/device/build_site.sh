#!/usr/bin/env bash
# Build what the GPU device lacks (see ../shared/docs/ENVIRONMENT.md), unpacked into one folder `site` and packed:
#   build/site.tgz        bitsandbytes, trl, datasets, liger-kernel, unsloth, ... (18.7 MB), and site-project
#   build/fa4.part-*      FlashAttention 4 (flash-attn-4) and the CUTLASS DSL it compiles with, xz-compressed and
#                         split into parts under 40 MB: one call carries at most 64 MiB (the DSL alone is ~70 MB)
# scripts/device/unpack.sh puts them together in /tmp/site on the device; `FA4_ONLY=1` / `SITE_ONLY=1` build one of the two.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d)
cd "$WORK"
download() {
  pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 -d "$@"
}
mkdir -p "$REPO/build"
if [ -z "${FA4_ONLY:-}" ]; then
  download whl bitsandbytes==0.50.2 trl==1.15.0 datasets==4.8.5 dill multiprocess xxhash liger-kernel==0.8.5 \
    unsloth==2026.10.9 unsloth_zoo==2026.10.9 torchao cut_cross_entropy tyro docstring_parser shtab typeguard \
    msgspec hf_transfer json5 nest-asyncio structlog
  for w in whl/*.whl; do unzip -q -o "$w" -d site; done
  rm -f site/bitsandbytes/libbitsandbytes_cuda1{18,21,24,26,28,32}.so site/bitsandbytes/libbitsandbytes_rocm*.so
  rm -rf site/studio
  # site-project: what the default GPU image resolves to and unsloth's pins forbid (trl 1.16: its collator hands the
  # model packed samples' boundaries); scripts/benchmark.py puts it first for the project and recipe rows only
  download whl-project trl==1.16.0
  for w in whl-project/*.whl; do unzip -q -o "$w" -d site-project; done
  tar -czf "$REPO/build/site.tgz" site site-project
  rm -rf site site-project
fi
[ -n "${SITE_ONLY:-}" ] && { ls -la "$REPO"/build/; rm -rf "$WORK"; exit 0; }
# FA4: the versions of the fa4 extra (pyproject.toml); the device has torch 2.11+cu130, cuda-bindings, einops, protobuf
download fa4 --pre flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
  apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
for w in fa4/*.whl; do unzip -q -o "$w" -d site; done
rm -f "$REPO"/build/fa4.part-*
tar -cf - site | xz -T0 -7 | split -b 40M - "$REPO/build/fa4.part-"
(cd "$REPO/build" && sha256sum fa4.part-* > fa4.sha256)
ls -la "$REPO"/build/
rm -rf "$WORK"
