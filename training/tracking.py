"""Experiment tracking: TensorBoard always; W&B when asked (`--set report_to=tensorboard,wandb`).

W&B never blocks or fails training:
- no `wandb` package: a warning, and the run goes on with TensorBoard;
- no WANDB_API_KEY (environment, or the stack's /run/secrets/wandb_api_key) and no WANDB_BASE_URL: offline mode
  (WANDB_MODE=offline); sync later with `wandb sync DIR`;
- WANDB_BASE_URL set (the local server of the `monitoring` profile, http://training-monitor:8080 in the stack):
  checked first; if it does not answer, a warning and offline mode.
Offline runs are written under `logs/<run>/wandb/`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from training.runfiles import WANDB_DIR

log = logging.getLogger("training")
SERVER_CHECK_TIMEOUT_S = 3.0


def server_answers(url: str, timeout: float = SERVER_CHECK_TIMEOUT_S) -> bool:
    """Any HTTP answer counts (even 401/404): the server is up. A refused or timed-out connection does not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 - the user's own W&B server URL
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def resolve_report_to(report_to: str, run_logs_dir: Path) -> list[str]:
    """The Trainer's report_to list, with W&B configured (or dropped) so that it cannot stop the run."""
    targets = [t for t in (s.strip() for s in report_to.split(",")) if t and t != "none"]
    if "wandb" not in targets:
        return targets
    if importlib.util.find_spec("wandb") is None:
        log.warning("W&B asked for but the wandb package is missing (pip install '.[wandb]'); "
                    "continuing with TensorBoard only")
        return [t for t in targets if t != "wandb"]
    run_logs_dir.mkdir(parents=True, exist_ok=True)
    from training.secrets import read_secret

    key = read_secret("WANDB_API_KEY")  # the Compose secret file, else the environment
    if key and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_API_KEY"] = key  # this process (and wandb's own) only: not the container's environment
    for var, default in (("WANDB_DIR", str(run_logs_dir)), ("WANDB_PROJECT", "qlora-stack"), ("WANDB_SILENT", "true")):
        if not os.environ.get(var):  # unset or empty
            os.environ[var] = default
    base_url = os.environ.get("WANDB_BASE_URL")
    if os.environ.get("WANDB_MODE") == "offline":
        log.info("W&B offline (WANDB_MODE=offline): runs under %s, sync later with `wandb sync`", run_logs_dir / WANDB_DIR)
    elif base_url:
        if server_answers(base_url):
            log.info("W&B server %s answers: logging to it", base_url)
        else:
            os.environ["WANDB_MODE"] = "offline"
            log.warning("W&B server %s does not answer: logging offline to %s instead "
                        "(sync later with `wandb sync`)", base_url, run_logs_dir / WANDB_DIR)
    elif not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
        log.info("W&B: no WANDB_API_KEY, logging offline to %s (sync later with `wandb sync`)",
                 run_logs_dir / WANDB_DIR)
    return targets
