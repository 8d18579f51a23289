"""Check that the GPU image's dependency set resolves, the way the Dockerfile installs it, without a GPU.

The Dockerfile installs torch first (pyproject's torch requirement, or TORCH_SPEC), then the dependencies plus the
image's EXTRAS with that torch pinned. This does the same with `pip install --dry-run --report` for CPython 3.12 on
manylinux x86_64 (the GPU image's platform), against the package index pip is configured for, and prints the
versions that matter. Exit status 0 when every extras set resolves, 1 otherwise.

    python scripts/check_gpu_deps.py                      # EXTRAS notebook,gpu,fa4 (the GPU image) and +fast (UNSLOTH=1)
    python scripts/check_gpu_deps.py --extras notebook,gpu --torch 'torch==2.11.*'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pip's vendored copy on 3.10
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + [
    a for tag in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                  "linux_x86_64") for a in ("--platform", tag)]
SHOWN = ("torch", "triton", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "liger_kernel",
         "flash_attn_4", "nvidia_cutlass_dsl", "unsloth", "unsloth_zoo", "xformers")


def requirements(extras: list[str]) -> list[str]:
    """What the Dockerfile's requirements stage writes: dependencies + the extras' requirements."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + [r for e in extras for r in project["optional-dependencies"][e]]


def resolve(reqs: list[str]) -> dict[str, str]:
    """pip's resolution for the GPU platform: {name: version}; raises RuntimeError with pip's last lines."""
    with tempfile.TemporaryDirectory() as tmp:
        req_file, report = Path(tmp) / "requirements.txt", Path(tmp) / "report.json"
        req_file.write_text("\n".join(reqs) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--no-cache-dir",
               "--dry-run", "--ignore-installed", "--target", str(Path(tmp) / "unused"), "--report", str(report),
               *PLATFORM, "-r", str(req_file)]
        # fast-deps reads each wheel's metadata with HTTP range requests (whole wheels where the index refuses them):
        # resolving the CUDA torch stack then peaks at ~3 GB of disk, not ~9.5 GB (CI's disk ran out). An
        # experimental pip feature: a pip without it resolves the same, downloading whole wheels.
        proc = subprocess.run([*cmd, "--use-feature=fast-deps"], capture_output=True, text=True)
        if proc.returncode != 0 and "fast-deps" in proc.stderr:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or proc.stderr.splitlines()
            raise RuntimeError("\n".join(errors[-6:]))
        installs = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower().replace("-", "_"): i["metadata"]["version"] for i in installs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extras", action="append", help="comma-separated extras (repeatable); default: the GPU image "
                   "(notebook,gpu,fa4) and the GPU image with unsloth (notebook,gpu,fa4,fast)")
    p.add_argument("--torch", help="torch requirement of the first install step (default: pyproject's, as the "
                   "Dockerfile's empty TORCH_SPEC)")
    args = p.parse_args(argv)
    failed = 0
    for extras in args.extras or ["notebook,gpu,fa4", "notebook,gpu,fa4,fast"]:
        names = [e for e in extras.split(",") if e]
        reqs = requirements(names)
        torch_req = args.torch or next(r for r in reqs if r.replace(" ", "").lower().startswith("torch>"))
        try:
            torch_version = resolve([torch_req])["torch"]  # the Dockerfile's first step
            found = resolve(reqs + [f"torch=={torch_version}"])  # then everything, that torch kept
        except RuntimeError as exc:
            failed += 1
            print(f"EXTRAS={extras}: does NOT resolve\n{exc}")
            continue
        print(f"EXTRAS={extras}: resolves ({len(found)} packages): "
              + ", ".join(f"{n} {found[n]}" for n in SHOWN if n in found))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
