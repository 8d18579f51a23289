"""The Docker Compose stack on a real engine: the Makefile verbs, the image, the services, the security rules.

Needs a Docker engine and Compose v2 (scripts/ci_install_docker.sh sets both up). Without them these tests skip
locally and FAIL when CI=true. They never touch a real stack on the same host: containers, volumes, the compose
project, the image tag, the ports and the Jupyter token file all get names of their own.

The image is (re)built from the working tree first (`make build`, warm cache: seconds). On a host with the
debootstrap base image (`local/debian:bookworm`) and the CPU torch wheel in wheelhouse/ (CI), the build uses them.
The engine tests share one stack (module fixture) and run in file order: train-tiny first, clean last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
DOCKER = os.environ.get("DOCKER", "docker")
TEST_IMAGE = os.environ.get("DOCKER_TEST_IMAGE", "qlora-training:test")
VERBS = ["build", "train-gemma-2b", "train-gemma-9b", "train-tiny", "train-dev", "train-monitor", "train-status",
         "train-logs", "train-stop", "train-clean", "train-export", "train-chat", "doctor"]


def _engine_problem() -> str | None:
    """Why the Docker tests cannot run here, or None when an engine and Compose v2 answer."""
    if shutil.which(DOCKER) is None:
        return f"no `{DOCKER}` client on PATH"
    try:
        info = subprocess.run([DOCKER, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=20)
        compose = subprocess.run([DOCKER, "compose", "version", "--short"], capture_output=True, text=True,
                                 timeout=20)
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer (timeout)"
    if info.returncode != 0 or not info.stdout.strip():
        return f"no Docker engine answers: {info.stderr.strip()[-200:]}"
    if compose.returncode != 0:
        return "Docker Compose v2 is missing (`docker compose version` failed)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make(env: dict[str, str], *args: str, timeout: float = 900, stdin: str | None = None
          ) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, input=stdin)


def _docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)


def _inspect(name: str) -> dict | None:
    p = _docker("inspect", name)
    return json.loads(p.stdout)[0] if p.returncode == 0 else None


def _in_volume(env: dict[str, str], volume: str, script: str) -> str:
    """Run a shell snippet in a throwaway container of the test image with the volume at /v."""
    p = _docker("run", "--rm", "-v", f"{env['VOLUME_PREFIX']}_{volume}:/v", "--entrypoint", "sh", env["IMAGE"],
                "-c", script)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _http(url: str, headers: dict[str, str] | None = None, timeout: float = 5) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, ""


def _wait_http(url: str, headers: dict[str, str] | None = None, timeout: float = 180) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    last: Exception | tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        try:
            status, body = _http(url, headers)
            if status < 500:
                return status, body
            last = (status, body)
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last = e
        time.sleep(2)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s: {last}")


# ---------------------------------------------------------------------------------------------------------------
# Without an engine: the Makefile's docker verbs still parse and print their commands
# ---------------------------------------------------------------------------------------------------------------
def test_every_docker_verb_dry_runs_without_docker(tmp_path):
    env = {**os.environ, "DOCKER": str(tmp_path / "no-docker-here"), "GPU": "auto"}
    for verb in VERBS:
        p = _make(env, "-n", verb, timeout=60)
        assert p.returncode == 0, f"make -n {verb}: {p.stderr}"
        assert env["DOCKER"] in p.stdout or verb == "doctor", verb  # the recipe is printed, not run
    help_text = _make(env, "help", timeout=60).stdout
    for verb in VERBS + ["train-custom"]:
        assert re.search(rf"^\s*(\x1b\[[0-9;]*m)?{re.escape(verb)}\b", help_text, re.M), f"{verb} not in make help"


def test_train_custom_without_model_or_data_says_what_to_pass():
    for args in ([], ["MODEL=google/gemma-2-2b"], ["DATA=datasets/sample"]):
        p = _make({**os.environ, "DOCKER": "/nonexistent/docker"}, "train-custom", *args, timeout=60)
        assert p.returncode != 0
        assert "train-custom needs MODEL and DATA" in p.stderr, p.stderr
        assert "compose" not in p.stdout  # nothing was started


def test_gpu_override_follows_gpu_variable():
    env = {**os.environ, "DOCKER": "/nonexistent/docker"}
    assert "docker-compose.gpu.yml" in _make({**env, "GPU": "1"}, "-n", "train-tiny", timeout=60).stdout
    assert "docker-compose.gpu.yml" not in _make({**env, "GPU": "0"}, "-n", "train-tiny", timeout=60).stdout


def test_host_paths_for_data_and_model_are_mounted_read_only(tmp_path):
    data = tmp_path / "my data"
    data.mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"text": "hi"}\n')
    model = tmp_path / "base"
    model.mkdir()
    env = {**os.environ, "DOCKER": "/nonexistent/docker", "GPU": "0"}
    out = _make(env, "-n", "train-custom", f"MODEL={model}", f"DATA={tmp_path / 'corpus.jsonl'}", timeout=60).stdout
    assert f"DATASETS_DIR={tmp_path}" in out and "--data /app/datasets/corpus.jsonl" in out
    assert f"BASE_MODEL_DIR={model}" in out and "--model /app/base-model" in out
    hub = _make(env, "-n", "train-custom", "MODEL=google/gemma-2-2b", "DATA=/app/datasets/chat", timeout=60).stdout
    assert "--model google/gemma-2-2b --data /app/datasets/chat" in hub and "DATASETS_DIR=" not in hub
    for verb in ("train-custom", "train-gemma-2b"):  # data the host lacks is refused before any container starts
        p = _make(env, verb, "MODEL=google/gemma-2-2b", f"DATA={tmp_path / 'typo.jsonl'}", timeout=60)
        assert p.returncode == 2 and f"DATA={tmp_path / 'typo.jsonl'}: no such file or folder on this host" in p.stderr
        assert "compose" not in p.stdout
    p = _make(env, "train-custom", f"MODEL={tmp_path / 'no-model'}", f"DATA={tmp_path / 'corpus.jsonl'}", timeout=60)
    assert p.returncode == 2 and f"MODEL={tmp_path / 'no-model'}: no such folder on this host" in p.stderr
    assert "compose" not in p.stdout


# ---------------------------------------------------------------------------------------------------------------
# With a real engine
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    problem = _engine_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"CI=true but the Docker tests cannot run: {problem}. Run scripts/ci_install_docker.sh first.")
        pytest.skip(f"Docker tests skipped: {problem}")
    tmp = tmp_path_factory.mktemp("docker-stack")
    prefix = f"qt{os.getpid()}"
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": prefix, "CONTAINER_PREFIX": prefix, "VOLUME_PREFIX": prefix, "IMAGE": TEST_IMAGE,
        "EXPORT_IMAGE": TEST_IMAGE.replace("qlora-training", "qlora-training-export", 1),
        "JUPYTER_PORT": str(_free_port()), "TENSORBOARD_PORT": str(_free_port()), "WANDB_PORT": str(_free_port()),
        "JUPYTER_TOKEN_FILE": str(tmp / "jupyter_token"), "GPU": os.environ.get("DOCKER_TEST_GPU", "0"),
        "BACKUP_INTERVAL": "5",  # the backup sidecar copies the tiny run's checkpoints during the test
        "STOP_GRACE": "30s",
    }
    for key in ("JUPYTER_TOKEN", "BIND_ADDRESS", "PRESET", "MODEL", "DATA", "ARGS"):
        env.pop(key, None)
    # Compose secrets from the environment: the Makefile exports them empty when unset; direct compose calls too.
    env.update(HF_TOKEN="", WANDB_API_KEY="")
    if _docker("image", "inspect", "local/debian:bookworm").returncode == 0 and "BASE_IMAGE" not in os.environ:
        env["BASE_IMAGE"] = "local/debian:bookworm"  # no registry here: the debootstrap-made base (CI)
    wheels = sorted((REPO / "wheelhouse").glob("torch-*.whl"))
    if wheels and "TORCH_SPEC" not in os.environ:
        env["TORCH_INDEX_URL"] = ""
        env["TORCH_SPEC"] = "torch==" + wheels[-1].name.split("-")[1].split("+")[0]
    env["APP_UID_EXPECTED"] = str(os.getuid() or 1000)
    build = _make(env, "build", timeout=1800)
    assert build.returncode == 0, f"make build failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    yield env
    _make(env, "train-clean", "FORCE=1", "BACKUP=1", timeout=300)
    for suffix in ("models_cache", "models_gguf", "checkpoints", "logs", "backup", "wandb"):
        _docker("volume", "rm", "-f", f"{prefix}_{suffix}")
    # Each rebuild after a code change leaves the previous test image untagged: drop those (layers stay cached).
    for title in ("qlora-training", "qlora-training-export"):
        _docker("image", "prune", "-f", "--filter", f"label=org.opencontainers.image.title={title}")


@pytest.mark.docker
def test_architecture_check_passes_its_non_gpu_checks_on_the_repo(stack):
    """The repo passes; the free-disk bar is the host's, so it is set here: 1 GiB passes, more than the disk fails."""
    def check(min_free_gb: float) -> subprocess.CompletedProcess:
        return subprocess.run(["python3", "scripts/test_docker_training.py", "--cpu-only", "--min-free-gb",
                               str(min_free_gb)], cwd=REPO, env=stack, capture_output=True, text=True, timeout=300)
    p = check(1)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SKIP  NVIDIA driver: --cpu-only" in p.stdout
    assert "PASS  free disk: repository" in p.stdout
    assert p.stdout.rstrip().endswith("All tests passed!")
    full = check(shutil.disk_usage(REPO).total / 2**30 + 1)
    assert full.returncode == 1, full.stdout
    assert re.search(r"FAIL  free disk: repository \(.*\) has [0-9.]+ GiB free, needs \d+", full.stdout), full.stdout
    assert "fix: free space: docker system prune" in full.stdout and "1 check(s) failed: free disk" in full.stdout


@pytest.mark.docker
def test_architecture_check_fails_with_the_fix_on_a_broken_compose_file(stack, tmp_path):
    good = (REPO / "docker-compose.training.yml").read_text()
    cases = {
        # the Jupyter port published on every interface
        "open-port.yml": (good.replace('"${BIND_ADDRESS:-127.0.0.1}:${JUPYTER_PORT:-8888}:8888"', '"8888:8888"'),
                          "FAIL  ports bound to 127.0.0.1", "bind each port to the loopback"),
        # a token written in the file
        "literal-token.yml": (good.replace("      JUPYTER_TOKEN:  ", "      JUPYTER_TOKEN: agent-dev-2024  "),
                              "FAIL  no token or password in the files", "pass secrets from the caller only"),
        # a token passed as an environment variable again (docker inspect would show it)
        "env-token.yml": (good.replace("  HF_TOKEN_PATH: /run/secrets/hf_token\n",
                                       "  HF_TOKEN_PATH: /run/secrets/hf_token\n  HF_TOKEN:\n"),
                          "passes HF_TOKEN as an environment variable", "pass secrets from the caller only"),
        # not YAML any more
        "broken.yml": (good.replace("services:\n", "services:\n  - :\n", 1), "FAIL  compose config", "fix the file"),
    }
    for name, (text, failure, fix) in cases.items():
        assert text != good, name
        path = tmp_path / name
        path.write_text(text)
        p = subprocess.run(["python3", "scripts/test_docker_training.py", "--cpu-only", "--compose-file", str(path),
                            "--dockerfile", str(REPO / "Dockerfile"), "--gpu-file", str(tmp_path / "none.yml")],
                           cwd=REPO, env=stack, capture_output=True, text=True, timeout=300)
        assert p.returncode == 1, f"{name}: {p.stdout}"
        assert failure in p.stdout, f"{name}: {p.stdout}"
        assert f"fix: {fix}" in p.stdout, f"{name}: {p.stdout}"
        assert "All tests passed!" not in p.stdout
    exposed = subprocess.run(["python3", "scripts/test_docker_training.py", "--cpu-only"], cwd=REPO,
                             env={**stack, "BIND_ADDRESS": "0.0.0.0"}, capture_output=True, text=True, timeout=300)
    assert "WARN  ports bound to 127.0.0.1: BIND_ADDRESS=0.0.0.0 exposes Jupyter, TensorBoard" in exposed.stdout
    assert "TensorBoard has no authentication" in exposed.stdout, exposed.stdout
    # The export image drops back to root for its installs: it must end as the app user like the training image.
    dockerfile = (REPO / "Dockerfile").read_text()
    rooted = dockerfile.replace("ENV LLAMA_CPP_CONVERTER_DIR=/opt/llama-cpp-converter\nUSER app\n",
                                "ENV LLAMA_CPP_CONVERTER_DIR=/opt/llama-cpp-converter\n")
    assert rooted != dockerfile
    (tmp_path / "Dockerfile").write_text(rooted)
    p = subprocess.run(["python3", "scripts/test_docker_training.py", "--cpu-only", "--dockerfile",
                        str(tmp_path / "Dockerfile")], cwd=REPO, env=stack, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "FAIL  non-root containers" in p.stdout, p.stdout
    assert "stage 'export' runs as USER root" in p.stdout, p.stdout


HF_SENTINEL = "hf_test_sentinel_7f3a9c"  # not a real token: checks that it arrives and that it never leaks


def _project_containers(stack) -> list[str]:
    return _docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={stack['COMPOSE_PROJECT_NAME']}"
                   ).stdout.split()


def _assert_secret_only_in_secret_files(stack, container: str) -> None:
    """The token is in /run/secrets/hf_token of a running container and in no process's environment there."""
    secret = _docker("exec", container, "cat", "/run/secrets/hf_token")
    assert secret.returncode == 0 and secret.stdout == HF_SENTINEL, secret.stderr
    environs = _docker("exec", container, "sh", "-c", "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'")
    assert "HF_TOKEN_PATH=/run/secrets/hf_token" in environs.stdout  # the processes were read
    assert HF_SENTINEL not in environs.stdout


@pytest.mark.docker
def test_train_tiny_through_compose_writes_the_adapter_as_the_host_user(stack):
    # Few steps, a checkpoint every 5: enough for the adapter and for the backup sidecar to copy something.
    p = _make({**stack, "HF_TOKEN": HF_SENTINEL}, "train-tiny",
              "ARGS=--max-steps 10 --set save_steps=5 --set eval_steps=5", timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    # HF_TOKEN is a Compose secret: the trainer found it (the file huggingface_hub reads), yet no container's
    # inspect, no log, no image layer holds it.
    assert "Hugging Face token: the file /run/secrets/hf_token" in p.stdout + p.stderr, p.stdout[-3000:]
    assert HF_SENTINEL not in p.stdout + p.stderr
    ids = _project_containers(stack)
    assert ids
    for cid in ids:
        assert HF_SENTINEL not in _docker("inspect", cid).stdout
        logs = _docker("logs", cid)
        assert HF_SENTINEL not in logs.stdout + logs.stderr
    layers = subprocess.run(f"{DOCKER} save {stack['IMAGE']} | grep -a -c {HF_SENTINEL}", shell=True,
                            capture_output=True, text=True, timeout=600)
    assert layers.stdout.strip() == "0", layers.stderr
    container = _inspect(f"{stack['CONTAINER_PREFIX']}-qlora-training")
    assert container["State"]["ExitCode"] == 0
    listing = _in_volume(stack, "checkpoints", "find /v/tiny -type f -printf '%U:%G %p\\n'")
    files = dict(line.split(" ", 1)[::-1] for line in listing.splitlines())
    assert "/v/tiny/adapter/adapter_model.safetensors" in files and "/v/tiny/adapter/adapter_config.json" in files
    expected = stack["APP_UID_EXPECTED"]
    owners = {owner.split(":")[0] for owner in files.values()}
    # Every file the run wrote belongs to the host user's uid (1000 for a root host): the process was not root.
    assert owners == {expected}, owners
    assert expected != "0"
    summary = json.loads(_in_volume(stack, "checkpoints", "cat /v/tiny/run_summary.json"))
    assert summary["status"] == "finished" and summary["steps"] == 10
    logs = _make(stack, "train-logs", timeout=120)  # the run has ended, so following stops at once
    assert logs.returncode == 0 and "adapter in outputs/tiny/adapter" in logs.stdout + logs.stderr, logs.stderr[-2000:]


@pytest.mark.docker
def test_the_same_command_again_follows_only_its_own_log(stack):
    """The run is finished: the same command reuses the container and says so; make shows this start's log, not
    the first attempt's again (docker logs --since the container's start)."""
    p = _make({**stack, "HF_TOKEN": HF_SENTINEL}, "train-tiny",
              "ARGS=--max-steps 10 --set save_steps=5 --set eval_steps=5", timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    first = _docker("logs", f"{stack['CONTAINER_PREFIX']}-qlora-training")
    assert "step 5/10" in first.stdout + first.stderr  # the same container: its log holds the first attempt
    assert "already finished at step 10" in p.stdout + p.stderr, p.stdout[-3000:]
    assert "step 5/10" not in p.stdout + p.stderr, p.stdout[-3000:]


@pytest.mark.docker
def test_train_export_turns_the_tiny_run_into_a_checked_gguf_in_the_gguf_volume(stack):
    """`make train-export` on the run the compose test above trained: the export image (the training image plus
    llama-cpp-python and llama.cpp's converter) merges, converts to q8_0, checks the GGUF against the merged model
    and leaves it with its Modelfile and a passed report in the models_gguf volume, as the host user. The training
    image stays without the export tools. A run that does not exist is refused with the runs there are."""
    p = _make(stack, "train-export", "RUN=tiny", "QUANT=q8_0", timeout=2400)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "ollama create tiny -f /app/models/gguf/tiny-q8_0/Modelfile" in out
    listing = _in_volume(stack, "models_gguf", "find /v -type f -printf '%U %p\\n'")
    files = dict(line.split(" ", 1)[::-1] for line in listing.splitlines())
    assert {"/v/tiny-q8_0/tiny-q8_0.gguf", "/v/tiny-q8_0/Modelfile", "/v/tiny-q8_0/export_report.json"} <= set(files)
    assert set(files.values()) == {stack["APP_UID_EXPECTED"]}, listing
    assert not [f for f in files if "/.tmp-" in f], listing
    report = json.loads(_in_volume(stack, "models_gguf", "cat /v/tiny-q8_0/export_report.json"))
    assert report["passed"] and report["quant"] == "q8_0", report
    assert all(check["passed"] for check in report["checks"].values()), report["checks"]
    assert report["checks"]["logits_vs_merged"]["top1_agreement"] >= 0.9
    assert "FROM ./tiny-q8_0.gguf" in _in_volume(stack, "models_gguf", "cat /v/tiny-q8_0/Modelfile")

    lean = _docker("run", "--rm", stack["IMAGE"], "python", "-c", "import llama_cpp")
    assert lean.returncode != 0 and "No module named 'llama_cpp'" in lean.stderr

    p = _make(stack, "train-export", "RUN=nope", timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "run 'nope': /app/outputs/nope does not exist" in out and "runs with an adapter in /app/outputs: tiny" in out
    assert "Traceback" not in out


@pytest.mark.docker
def test_training_process_in_the_container_is_not_root(stack):
    p = _docker("run", "--rm", stack["IMAGE"], "python", "-c", "import os; print(os.getuid(), os.getgid())")
    uid, gid = p.stdout.split()
    assert uid == stack["APP_UID_EXPECTED"] and uid != "0" and gid != "0"


@pytest.mark.docker
def test_sidecars_start_and_stay_up_on_a_cpu_only_host(stack):
    names = [f"{stack['CONTAINER_PREFIX']}-gpu-monitor", f"{stack['CONTAINER_PREFIX']}-training-backup"]
    deadline = time.monotonic() + 60
    while True:  # the backup sidecar (every 5 s here) copies the tiny run's complete checkpoints
        backups = _in_volume(stack, "backup", "ls /v/tiny 2>/dev/null || true").split()
        if any(b.startswith("checkpoint-") for b in backups) or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert any(b.startswith("checkpoint-") for b in backups), backups
    for name in names:
        info = _inspect(name)
        assert info and info["State"]["Running"], f"{name} is not running"
        assert info["RestartCount"] == 0, f"{name} restarted {info['RestartCount']} times"
    gpu_log = _in_volume(stack, "logs", "cat /v/gpu_metrics.jsonl")
    events = [json.loads(line) for line in gpu_log.splitlines() if line.strip()]
    assert any(e.get("event") in ("no_nvml", "no_gpu") for e in events), events[:3]


@pytest.mark.docker
def test_backup_verify_exit_status_says_whether_a_copy_is_damaged(stack):
    """`make backup-verify` exits 0 on intact copies and non-zero once one byte changed: the exit status is the
    command's own, not `docker compose run`'s (which returned 0 on some Compose versions whatever happened)."""
    p = _make(stack, "backup-verify", timeout=300)
    assert p.returncode == 0 and ": 0 damaged" in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
    copy = _in_volume(stack, "backup", "ls -d /v/tiny/checkpoint-*/trainer_state.json | head -1").strip()
    assert copy, "the sidecar test above leaves a backed-up checkpoint"
    _in_volume(stack, "backup", f"chmod u+w {copy} && printf ' ' >> {copy}")
    try:
        p = _make(stack, "backup-verify", timeout=300)
        assert p.returncode != 0 and ": 1 damaged" in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
    finally:
        _in_volume(stack, "backup", f"truncate -s -1 {copy}")
    assert _make(stack, "backup-verify", timeout=300).returncode == 0


@pytest.mark.docker
def test_train_status_shows_the_run(stack):
    p = _make(stack, "train-status", timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{stack['CONTAINER_PREFIX']}-gpu-monitor" in p.stdout
    assert "run tiny" in p.stdout and "finished" in p.stdout
    as_json = _make(stack, "-s", "train-status", "ARGS=--json", timeout=300)  # stdout: the JSON alone, for scripts
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["run"]["name"] == "tiny", as_json.stdout[-2000:]
    unknown = _make(stack, "train-status", "RUN=nope", timeout=300)  # the status module's own exit code, not Compose's
    assert unknown.returncode != 0 and "no run 'nope'" in unknown.stdout, unknown.stdout[-2000:]
    assert "train-status] Error 1" in unknown.stderr  # training.status's exit code, passed on


@pytest.mark.docker
def test_train_custom_mounts_the_host_model_and_data_read_only(stack, tmp_path):
    # A local base model: the tiny model that train-tiny built in the models volume, copied out to the host.
    cid = _docker("create", "-v", f"{stack['VOLUME_PREFIX']}_models_cache:/app/models", stack["IMAGE"]).stdout.strip()
    try:
        assert _docker("cp", f"{cid}:/app/models/tiny-gemma2", str(tmp_path / "model")).returncode == 0
    finally:
        _docker("rm", "-f", cid)
    # `docker cp` hands the files to the host user with their 0600 modes; a downloaded model is world-readable.
    for path in (tmp_path / "model").rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    (tmp_path / "data").mkdir()
    shutil.copy(REPO / "datasets/sample/chat.jsonl", tmp_path / "data/chat.jsonl")
    p = _make(stack, "train-custom", f"MODEL={tmp_path / 'model'}/", f"DATA={tmp_path / 'data/chat.jsonl'}",
              "RUN=custom-e2e", "ARGS=--max-steps 2 --set save_steps=2 --set allow_cpu=true", timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    mounts = {m["Destination"]: m for m in _inspect(f"{stack['CONTAINER_PREFIX']}-qlora-training")["Mounts"]}
    assert mounts["/app/datasets"]["Source"] == str(tmp_path / "data") and not mounts["/app/datasets"]["RW"]
    assert mounts["/app/base-model"]["Source"] == str(tmp_path / "model") and not mounts["/app/base-model"]["RW"]
    summary = json.loads(_in_volume(stack, "checkpoints", "cat /v/custom-e2e/run_summary.json"))
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert _in_volume(stack, "checkpoints", "ls /v/custom-e2e/adapter").split().count("adapter_config.json") == 1


@pytest.mark.docker
def test_train_chat_answers_once_from_the_run_in_the_volume(stack):
    """`make train-chat PROMPT=...` on the run train-tiny wrote: the adapter and its base from the volumes."""
    p = _make(stack, "train-chat", "RUN=tiny", "PROMPT=Name the four seasons.", "ARGS=--greedy --max-new-tokens 8",
              timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "loading builtin:tiny-gemma2" in p.stderr and "Traceback" not in p.stderr
    p = _make(stack, "train-chat", "RUN=nope", "PROMPT=hi", timeout=600)
    assert p.returncode == 2 and "run 'nope'" in p.stdout + p.stderr, p.stdout[-2000:] + p.stderr[-2000:]


@pytest.mark.docker
def test_train_dev_jupyter_needs_the_token_and_tensorboard_lists_the_run(stack):
    hf_sentinel = HF_SENTINEL
    p = _make({**stack, "HF_TOKEN": hf_sentinel}, "train-dev", timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert hf_sentinel not in p.stdout + p.stderr
    token_file = Path(stack["JUPYTER_TOKEN_FILE"])
    token = token_file.read_text().strip()
    assert len(token) >= 32 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    jport, tport = stack["JUPYTER_PORT"], stack["TENSORBOARD_PORT"]
    assert f"http://127.0.0.1:{jport}/lab?token={token}" in p.stdout
    assert f"http://127.0.0.1:{tport}/" in p.stdout

    status, _ = _wait_http(f"http://127.0.0.1:{jport}/api/contents")
    assert status == 403  # no token: refused
    status, body = _http(f"http://127.0.0.1:{jport}/api/contents", {"Authorization": f"token {token}"})
    assert status == 200 and "outputs" in body
    status, _ = _http(f"http://127.0.0.1:{jport}/api/contents", {"Authorization": "token wrong-token"})
    assert status == 403
    status, body = _http(f"http://127.0.0.1:{jport}/api/contents/notebooks/quickstart.ipynb",
                         {"Authorization": f"token {token}"})
    assert status == 200 and "run_eval" in body  # the starter notebook, bind-mounted from ./notebooks

    status, body = _wait_http(f"http://127.0.0.1:{tport}/data/plugin/scalars/tags")
    assert status == 200
    tags = json.loads(body)
    tiny_runs = [run for run in tags if run.startswith("tiny")]
    assert tiny_runs, tags
    assert any("loss" in tag for run in tiny_runs for tag in tags[run]), tags

    # Published on the loopback only: the container's port map, and a refused connection on another host address.
    ports = _inspect(f"{stack['CONTAINER_PREFIX']}-training-dev")["NetworkSettings"]["Ports"]
    for container_port in ("8888/tcp", "6006/tcp"):
        assert {b["HostIp"] for b in ports[container_port]} == {"127.0.0.1"}, ports
    # HF_TOKEN reaches the container as a Compose secret file, which huggingface_hub reads; it is in no process's
    # environment, not in docker inspect, not in the image or any log. Jupyter's own log shows `token=...`.
    dev = f"{stack['CONTAINER_PREFIX']}-training-dev"
    _assert_secret_only_in_secret_files(stack, dev)
    seen = _docker("exec", dev, "python", "-c", "from huggingface_hub import get_token; print(len(get_token() or ''))")
    assert seen.stdout.strip() == str(len(hf_sentinel)), seen.stderr
    assert hf_sentinel not in _docker("inspect", dev).stdout
    assert hf_sentinel not in _docker("image", "inspect", stack["IMAGE"]).stdout
    assert hf_sentinel not in _docker("history", "--no-trunc", stack["IMAGE"]).stdout
    dev_log = _docker("logs", dev)
    assert token not in dev_log.stdout + dev_log.stderr and hf_sentinel not in dev_log.stdout + dev_log.stderr
    gateway = _docker("network", "inspect", "bridge", "--format", "{{(index .IPAM.Config 0).Gateway}}").stdout.strip()
    if gateway:
        for port in (jport, tport):
            with socket.socket() as s:
                s.settimeout(3)
                assert s.connect_ex((gateway, int(port))) != 0, f"port {port} answers on {gateway}"


@pytest.mark.docker
def test_jupyter_refuses_to_start_without_a_token(stack):
    env = {k: v for k, v in stack.items() if k != "JUPYTER_TOKEN"}
    name = f"{stack['CONTAINER_PREFIX']}-no-token"
    # `compose run -d` + `docker wait`: Compose 2.40's `run` exits 0 whatever the container's status.
    p = subprocess.run([DOCKER, "compose", "-f", "docker-compose.training.yml", "run", "-d", "--name", name,
                        "--no-deps", "training-dev"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    try:
        assert p.returncode == 0, p.stderr
        assert _docker("wait", name).stdout.strip() == "64"
        assert "JUPYTER_TOKEN is empty" in _docker("logs", name).stderr
    finally:
        _docker("rm", "-f", name)


@pytest.mark.docker
def test_train_stop_during_a_run_saves_a_complete_checkpoint_first(stack):
    """SIGTERM travels make -> compose -> tini -> python; the trainer finishes its step and checkpoints in time."""
    container = f"{stack['CONTAINER_PREFIX']}-qlora-training"
    run = subprocess.Popen(["make", "--no-print-directory", "train-tiny", "RUN=stoptest",
                            "ARGS=--max-steps 2000 --resume never --set save_steps=1000"],
                           cwd=REPO, env={**stack, "HF_TOKEN": HF_SENTINEL}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        steps = []
        while time.monotonic() < deadline and run.poll() is None:
            p = _docker("exec", container, "cat", "/app/logs/stoptest/metrics.jsonl")
            steps = [json.loads(ln)["step"] for ln in p.stdout.splitlines() if '"loss"' in ln and ln.endswith("}")]
            if steps and max(steps) >= 5:
                break
            time.sleep(2)
        assert steps and max(steps) >= 5, f"the run did not reach step 5: {run.poll()}"
        _assert_secret_only_in_secret_files(stack, container)  # the trainer's python and tini (PID 1)
        stop = _make(stack, "train-stop", timeout=300)
        assert stop.returncode == 0, stop.stderr
        out, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    # make passes on the run's own status: 143 = stopped by SIGTERM after its checkpoint, not SIGKILLed (137)
    assert run.returncode != 0 and "Error 143" in out, out[-3000:]
    assert _inspect(container)["State"]["ExitCode"] == 143
    events = [json.loads(ln) for ln in _in_volume(stack, "logs", "cat /v/stoptest/metrics.jsonl").splitlines()
              if ln.strip().endswith("}")]
    stopped = [e for e in events if e.get("event") == "stopped"]
    assert stopped and stopped[-1]["signal"] == "SIGTERM", events[-3:]
    step = stopped[-1]["step"]
    assert 5 <= step < 2000
    marker = json.loads(_in_volume(stack, "checkpoints", f"cat /v/stoptest/checkpoint-{step}/COMPLETE"))
    assert marker["step"] == step and marker["files"]


@pytest.mark.docker
def test_train_stop_then_clean_remove_everything_but_backups_unless_asked(stack):
    prefix = stack["CONTAINER_PREFIX"]
    p = _make(stack, "train-stop", timeout=300)
    assert p.returncode == 0, p.stderr
    running = _docker("ps", "-q", "--filter", f"label=com.docker.compose.project={stack['COMPOSE_PROJECT_NAME']}")
    assert running.stdout.strip() == ""

    p = _make(stack, "train-clean", stdin="no\n", timeout=120)  # asks, and a "no" deletes nothing
    assert p.returncode != 0 and "Nothing deleted" in p.stdout
    assert _docker("volume", "inspect", f"{prefix}_checkpoints").returncode == 0

    p = _make(stack, "train-clean", "FORCE=1", timeout=300)
    assert p.returncode == 0, p.stderr
    left = _docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={stack['COMPOSE_PROJECT_NAME']}")
    assert left.stdout.strip() == ""
    for suffix in ("models_cache", "models_gguf", "checkpoints", "logs"):
        assert _docker("volume", "inspect", f"{prefix}_{suffix}").returncode != 0, suffix
    assert _docker("volume", "inspect", f"{prefix}_backup").returncode == 0  # backups survive a clean

    p = _make(stack, "train-clean", "FORCE=1", "BACKUP=1", timeout=300)
    assert p.returncode == 0, p.stderr
    assert _docker("volume", "inspect", f"{prefix}_backup").returncode != 0
