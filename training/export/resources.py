"""RAM and disk: refuse an export the machine cannot hold before anything is loaded, and say how much it needs."""

from __future__ import annotations

import shutil
from pathlib import Path

from training.export.errors import ExportError
from training.export.quants import DTYPES, GIB, QUANTS


def available_ram_bytes() -> tuple[int, str]:
    """Free memory for this process: the smaller of the host's available RAM and a container (cgroup) limit."""
    import psutil

    avail, where = psutil.virtual_memory().available, "host RAM available"
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60 and int(limit) - usage < avail:
            avail, where = int(limit) - usage, f"container memory limit ({limit_file})"
        break
    return avail, where


def ram_needed_bytes(model_bytes: int) -> int:
    """One copy of the model, a safetensors shard being written, and ~1.5 GiB for torch/transformers themselves."""
    return int(model_bytes * 1.2 + 1.5 * GIB)


def check_resources(params: int, dtype: str, quant: str | None, merged_dir: Path, gguf_dir: Path,
                    reuse_merged: bool, vocab_size: int = 0) -> dict:
    """Refuse before loading anything when RAM or disk cannot hold the export; say how much is needed."""
    model_bytes = params * DTYPES[dtype]
    need_ram = ram_needed_bytes(model_bytes)
    have_ram, ram_where = available_ram_bytes()
    plan = {"parameters": params, "merge_dtype": dtype, "model_bytes": model_bytes, "ram_needed_bytes": need_ram,
            "ram_available_bytes": have_ram}
    if need_ram > have_ram:
        raise ExportError(
            f"not enough memory: merging {params / 1e9:.2f}B parameters in {dtype} needs about "
            f"{need_ram / GIB:.1f} GiB, {ram_where}: {have_ram / GIB:.1f} GiB.\n-> close other programs (a training "
            "run?), raise the container's memory limit, or run the export on a machine with more RAM")
    disk: dict[int, list] = {}  # st_dev -> [bytes needed, a path on it]

    def need(path: Path, nbytes: int) -> None:
        probe = path
        while not probe.exists():
            probe = probe.parent
        entry = disk.setdefault(probe.stat().st_dev, [0, probe])
        entry[0] += nbytes

    if not reuse_merged:
        need(merged_dir, int(model_bytes * 1.02) + 50 * 2**20)  # two copies briefly: the new one, then the rename
    if quant:
        q = QUANTS[quant]
        out = params * q.bytes_per_param
        tmp = params * DTYPES[dtype] if q.ftype else 0  # the converter's lossless file, then quantised
        ref = 512 * vocab_size * 4  # the reference logits of the check prompts (< 512 positions), float32
        need(gguf_dir, int(out + tmp + ref) + 50 * 2**20)
    plan["disk"] = []
    for nbytes, path in disk.values():
        free = shutil.disk_usage(path).free
        plan["disk"].append({"path": str(path), "needed_bytes": nbytes, "free_bytes": free})
        if nbytes > free:
            raise ExportError(f"not enough disk space on {path}: the export needs about {nbytes / GIB:.2f} GiB, "
                              f"{free / GIB:.2f} GiB is free.\n-> free space there, or point --gguf-dir / "
                              "--output-dir at a larger disk")
    return plan


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
