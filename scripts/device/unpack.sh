#!/usr/bin/env bash
# On the device, at the start of every call: gather the carried wheels (scripts/device/build_site.sh) into /tmp/site.
# build/site.tgz is unpacked once. FlashAttention 4 comes in parts over several calls (64 MiB a call): each call's
# parts wait in /tmp/fa4parts until build/fa4.sha256's list is complete and checks, then they are unpacked once.
# Then: export PYTHONPATH=$(bash scripts/device/unpack.sh --path):REPO
SRC=$(cd "$(dirname "$0")/../.." && pwd)
if [ "${1:-}" = "--path" ]; then echo "/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages"; exit 0; fi
mkdir -p /tmp/fa4parts
if [ ! -d /tmp/site/bitsandbytes ] && [ -f "$SRC/build/site.tgz" ]; then
  tar -C /tmp -xzf "$SRC/build/site.tgz" && echo "unpacked site.tgz"
fi
cp "$SRC"/build/fa4.part-* "$SRC"/build/fa4.sha256 /tmp/fa4parts/ 2>/dev/null
if [ ! -d /tmp/site/flash_attn ] && [ -f /tmp/fa4parts/fa4.sha256 ]; then
  if (cd /tmp/fa4parts && sha256sum -c --quiet fa4.sha256 2>/dev/null); then
    cat /tmp/fa4parts/fa4.part-* | xz -d | tar -C /tmp -x && echo "unpacked FlashAttention 4"
  else
    echo "FlashAttention 4: parts so far: $(cd /tmp/fa4parts && ls fa4.part-* 2>/dev/null | tr '\n' ' ')"
  fi
fi
ls -d /tmp/site/bitsandbytes /tmp/site/flash_attn 2>/dev/null
