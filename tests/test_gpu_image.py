"""The GPU image ships the fast path: on a GPU host `make build` adds docker-compose.gpu.yml, whose build arguments
install the `gpu` extra (Liger) and `fa4` (FlashAttention 4; FA4=0 leaves it out) and, with UNSLOTH=1, `fast`
(unsloth); and those dependency sets resolve for the GPU image's platform the way the Dockerfile installs them
(scripts/check_gpu_deps.py, against the package index)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("GPU_EXTRAS", "UNSLOTH")}  # `make test` exports them


def make_value(var: str, *assignments: str) -> str:
    out = subprocess.run(["make", "-s", "--eval", f"print-var: ; @echo $({var})", "print-var", *assignments],
                         cwd=REPO, capture_output=True, text=True, timeout=60, env=clean_env())
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_make_build_on_a_gpu_host_passes_the_fast_path_extras():
    assert make_value("GPU_EXTRAS", "GPU=1") == "notebook,gpu,fa4"
    assert make_value("GPU_EXTRAS", "GPU=1", "UNSLOTH=1") == "notebook,gpu,fa4,fast"
    assert make_value("GPU_EXTRAS", "GPU=1", "FA4=0") == "notebook,gpu"  # NVIDIA's licence for its compiler: opt-out
    build = subprocess.run(["make", "-s", "-n", "build", "GPU=1"], cwd=REPO, capture_output=True, text=True, timeout=60,
                           env=clean_env())
    assert "-f docker-compose.gpu.yml" in build.stdout and "build qlora-training" in build.stdout
    cpu = subprocess.run(["make", "-s", "-n", "build", "GPU=0"], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=clean_env())
    assert "docker-compose.gpu.yml" not in cpu.stdout  # CPU hosts keep the lean image


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker CLI with Compose v2")
def test_the_gpu_override_gives_every_image_service_the_same_extras():
    """Every service built from the training image gets the GPU extras (one image, one set of build args)."""
    out = subprocess.run(["docker", "compose", "-f", "docker-compose.training.yml", "-f", "docker-compose.gpu.yml",
                          "--profile", "training", "--profile", "training-dev", "--profile", "monitoring", "config"],
                         cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "GPU_EXTRAS": "notebook,gpu,fast"})
    if out.returncode != 0 and ("is not a docker command" in out.stderr or "unknown shorthand flag" in out.stderr):
        pytest.skip("docker compose v2 not installed")
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    built = {n: s["build"] for n, s in services.items() if s.get("build", {}).get("target") == "training"}
    assert {"qlora-training", "training-dev", "gpu-monitor", "training-backup"} <= set(built)
    assert {b["args"]["EXTRAS"] for b in built.values()} == {"notebook,gpu,fast"}


@pytest.mark.slow
def test_the_gpu_dependency_sets_resolve():
    """pip's resolver, for CPython 3.12 manylinux x86_64, torch first then the rest with it pinned: the default GPU
    image (notebook,gpu,fa4) and the one with unsloth (notebook,gpu,fa4,fast). Needs the package index (CI has it)."""
    out = subprocess.run([sys.executable, "scripts/check_gpu_deps.py"], cwd=REPO, capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(ln.startswith("EXTRAS=notebook,gpu,fa4: resolves") and "liger_kernel" in ln
               and "flash_attn_4 4.0.0b40" in ln and "nvidia_cutlass_dsl" in ln for ln in lines)
    assert any(ln.startswith("EXTRAS=notebook,gpu,fa4,fast: resolves") and "unsloth" in ln and "flash_attn_4" in ln
               for ln in lines)
