#!/usr/bin/env bash
# On the device, at the start of every call: gather the carried wheels (scripts/device/build_site.sh) into /tmp/site.
# build/site.tgz is unpacked once. FlashAttention 4 comes in parts over several calls (64 MiB a call): each call's
# parts wait in /tmp/fa4parts until the parts build/fa4.sha256 lists are all there and check, then exactly those are
# joined and unpacked, into a temporary folder first, so a broken stream leaves nothing half-unpacked behind.
# Then: export PYTHONPATH=$(bash scripts/device/unpack.sh --path):REPO
set -o pipefail
SRC=$(cd "$(dirname "$0")/../.." && pwd)
if [ "${1:-}" = "--path" ]; then echo "/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages"; exit 0; fi
mkdir -p /tmp/fa4parts
if [ ! -d /tmp/site/bitsandbytes ] && [ -f "$SRC/build/site.tgz" ]; then
  tar -C /tmp -xzf "$SRC/build/site.tgz" && echo "unpacked site.tgz"
fi
cp "$SRC"/build/fa4.part-* "$SRC"/build/fa4.sha256 /tmp/fa4parts/ 2>/dev/null
if [ ! -d /tmp/site/flash_attn ] && [ -f /tmp/fa4parts/fa4.sha256 ]; then
  if (cd /tmp/fa4parts && sha256sum -c --quiet fa4.sha256 2>/dev/null); then
    rm -rf /tmp/fa4-unpack && mkdir -p /tmp/fa4-unpack /tmp/site
    if (cd /tmp/fa4parts && cat $(awk '{print $2}' fa4.sha256)) | xz -d | tar -C /tmp/fa4-unpack -x; then
      cp -a /tmp/fa4-unpack/site/. /tmp/site/ && rm -rf /tmp/fa4-unpack && echo "unpacked FlashAttention 4"
    else
      echo "FlashAttention 4: the joined parts did not unpack"
    fi
  else
    echo "FlashAttention 4: parts so far: $(cd /tmp/fa4parts && ls fa4.part-* 2>/dev/null | tr '\n' ' ')"
  fi
fi
ls -d /tmp/site/bitsandbytes /tmp/site/flash_attn 2>/dev/null
true
